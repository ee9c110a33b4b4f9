/**
 * `Envelope` — what travels: one message with its identity and metadata.
 *
 * - `id`: the application message id, a UUIDv7 made at publish time. It is the
 *   identity used for dedupe (inbox), audit and the dead-letter queue, and it
 *   survives redelivery, delayed retry and replay. It is never a broker entry id.
 * - `topic`, `type` (CloudEvents `type`), `source` (CloudEvents `source`),
 *   `key` (ordering key, CloudEvents `subject`), `time` (from `Clock`),
 *   `attempt` (1 on first publish; grows on broker-level redelivery).
 * - `headers`: `traceparent`, `correlationid`, `causationid`, `replyto`, and
 *   any user header (names: lowercase letters and digits, see `Name`).
 *
 * Three representations:
 * - {@link Envelope}: decoded, with the typed payload.
 * - {@link Encoded}: what the `Broker` sees — all strings except `attempt`;
 *   `data` is the JSON text of the Schema-encoded payload.
 * - {@link Fields}: a flat string map, the layout brokers store (see
 *   {@link toFields}); it mirrors the CloudEvents Kafka binary binding so any
 *   client can read and write Converge messages.
 *
 * Plus {@link toCloudEvent} / {@link fromCloudEvent}: CloudEvents 1.0 JSON,
 * structured mode.
 *
 * @since 0.1.0
 */
import { Clock, DateTime, Effect, Option, Result, Schema, Tracer } from "effect"
import * as HttpTraceContext from "effect/http/HttpTraceContext"
import { uuidv7 } from "./internal/uuid.ts"
import * as Name from "./Name.ts"
import type * as Topic from "./Topic.ts"

/**
 * Well-known header names.
 *
 * @since 0.1.0
 */
export const Headers = {
  /** W3C trace context of the span that published the message. */
  traceparent: "traceparent",
  /** Groups every message of one business flow (a saga, a request and its effects). */
  correlationId: "correlationid",
  /** The id of the message that caused this one. */
  causationId: "causationid",
  /** Where a confirmation or reply should be sent (a topic name). */
  replyTo: "replyto",
  /** Set on a message re-published from the dead-letter queue: the replay's reason/operator note. */
  replay: "convergereplay"
} as const

/**
 * A decoded message.
 *
 * @since 0.1.0
 */
export interface Envelope<A> {
  readonly id: string
  readonly topic: string
  readonly type: string
  readonly source: string
  readonly key: string | undefined
  readonly time: DateTime.Utc
  readonly attempt: number
  readonly headers: Readonly<Record<string, string>>
  readonly payload: A
}

/**
 * The wire form of a message: what every `Broker` stores and delivers.
 *
 * @since 0.1.0
 */
export interface Encoded {
  readonly id: string
  readonly topic: string
  readonly type: string
  readonly source: string
  readonly key: string | undefined
  /** RFC 3339 timestamp, UTC. */
  readonly time: string
  readonly attempt: number
  readonly headers: Readonly<Record<string, string>>
  /** JSON text of the Schema-encoded payload. */
  readonly data: string
}

/**
 * Flat string fields, the storage layout of a message in a broker.
 *
 * @since 0.1.0
 */
export type Fields = Readonly<Record<string, string>>

const NonEmpty = Schema.String.check(Schema.isMinLength(1))

/**
 * Schema of {@link Encoded}, for validating envelopes from untrusted input.
 * Every field is required except `key`.
 *
 * @since 0.1.0
 */
export const EncodedSchema = Schema.Struct({
  id: NonEmpty.check(Schema.isMaxLength(200)),
  topic: NonEmpty,
  type: NonEmpty,
  source: NonEmpty,
  key: Schema.optional(Schema.String),
  time: NonEmpty,
  attempt: Schema.Int.check(Schema.isGreaterThanOrEqualTo(1)),
  headers: Schema.Record(Schema.String, Schema.String),
  data: Schema.String
})

/**
 * An envelope (or a broker entry) is missing a required field or has one of
 * the wrong form. `message` names the field. Permanent: such entries go to
 * the dead-letter queue at once.
 *
 * @since 0.1.0
 */
export class MalformedEnvelope extends Schema.TaggedError<MalformedEnvelope>(
  "@converge/core/Envelope/MalformedEnvelope"
)("MalformedEnvelope", { message: Schema.String }) {}

/**
 * A payload failed its topic's Schema (on publish: encode; on consume:
 * decode). Permanent.
 *
 * @since 0.1.0
 */
export class PayloadError extends Schema.TaggedError<PayloadError>("@converge/core/Envelope/PayloadError")(
  "PayloadError",
  {
    topic: Schema.String,
    messageId: Schema.String,
    direction: Schema.Literals(["encode", "decode"]),
    message: Schema.String
  }
) {}

const payloadError = (topic: string, messageId: string, direction: "encode" | "decode", message: string) =>
  Result.fail(new PayloadError({ topic, messageId, direction, message }))

/**
 * Options of {@link make}.
 *
 * @since 0.1.0
 */
export interface MakeOptions {
  /**
   * Message id; default: a fresh UUIDv7. Pass one to make a publish idempotent. It names one message:
   * a `publishAll` of several payloads with an `id` fails with `MalformedEnvelope`.
   */
  readonly id?: string | undefined
  /** Ordering key; default: the topic's key function, if any. */
  readonly key?: string | undefined
  /** CloudEvents `source`; default: `"urn:converge"`. Must not be empty. */
  readonly source?: string | undefined
  readonly correlationId?: string | undefined
  readonly causationId?: string | undefined
  readonly replyTo?: string | undefined
  readonly traceparent?: string | undefined
  /** User headers. Names: lowercase letters and digits, at most 20 (see `Name`). */
  readonly headers?: Readonly<Record<string, string>> | undefined
}

/**
 * The options with `traceparent` set from the current span (W3C trace context, written by Effect's own
 * `HttpTraceContext`), unless they name one already, no span is current, or propagation is disabled
 * (`Tracer.DisablePropagation`): a consumer's handler then runs in the publisher's trace. `Publisher` and
 * `Outbox` apply it to what they publish.
 *
 * @since 0.1.0
 */
export const withTraceContext = (options: MakeOptions | undefined): Effect.Effect<MakeOptions | undefined> =>
  options?.traceparent !== undefined
    ? Effect.succeed(options)
    : // read from the fiber's cached span (no service lookup): this runs on every publish
      Effect.withFiber((fiber) => {
        const span = fiber.cache.span
        return Effect.succeed(
          span === undefined || span._tag !== "Span" || fiber.getRef(Tracer.DisablePropagation)
            ? options
            : { ...options, traceparent: HttpTraceContext.toHeaders(span).traceparent! }
        )
      })

/**
 * The span a message's publisher ran in, read from its `traceparent` (by Effect's own `HttpTraceContext`),
 * if it carries a valid one.
 *
 * @since 0.1.0
 */
export const traceParentOf = (headers: Readonly<Record<string, string>>): Option.Option<Tracer.ExternalSpan> =>
  headers.traceparent === undefined ? Option.none() : HttpTraceContext.w3c(headers as never)

/**
 * The default CloudEvents `source`.
 *
 * @since 0.1.0
 */
export const defaultSource = "urn:converge"

const validateHeaders = (
  headers: Readonly<Record<string, string>>
): Result.Result<Readonly<Record<string, string>>, Name.InvalidName> => {
  for (const name in headers) {
    const checked = Name.check("header", name)
    if (Result.isFailure(checked)) return Result.fail(checked.failure)
  }
  return Result.succeed(headers)
}

/**
 * Builds a new envelope for `payload` on `topic`: a UUIDv7 id and the time,
 * both from `Clock`. Fails with `InvalidName` for a bad header name.
 *
 * @since 0.1.0
 */
export const make = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  options?: MakeOptions
): Effect.Effect<Envelope<A>, Name.InvalidName | MalformedEnvelope> =>
  Effect.flatMap(Clock.currentTimeMillis, (now) => {
    const result = makeUnsafeResult(topic, payload, now, options)
    return Result.isSuccess(result) ? Effect.succeed(result.success) : Effect.fail(result.failure)
  })

/**
 * {@link make} with an explicit time, without effects. For hot paths that
 * read the clock once per batch.
 *
 * @since 0.1.0
 */
export const makeUnsafeResult = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  nowMillis: number,
  options?: MakeOptions
): Result.Result<Envelope<A>, Name.InvalidName | MalformedEnvelope> => {
  const headers = buildHeaders(options)
  if (Result.isFailure(headers)) return Result.fail(headers.failure)
  const source = resolveSource(options, undefined)
  if (Result.isFailure(source)) return Result.fail(source.failure)
  return Result.succeed({
    id: options?.id ?? uuidv7(nowMillis),
    topic: topic.name,
    type: topic.type,
    source: source.success,
    key: options?.key ?? (topic.key === undefined ? undefined : topic.key(payload)),
    time: DateTime.makeUnsafe(nowMillis),
    attempt: 1,
    headers: headers.success,
    payload
  })
}

/**
 * {@link make} and {@link encode} in one step, straight to the wire form:
 * the publishing hot path. `timeIso` is the RFC 3339 form of `nowMillis`;
 * pass it when encoding a batch, so it is formatted once.
 *
 * @since 0.1.0
 */
export const makeEncodedResult = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  nowMillis: number,
  options?: MakeOptions,
  timeIso: string = new Date(nowMillis).toISOString()
): Result.Result<Encoded, Name.InvalidName | MalformedEnvelope | PayloadError> =>
  Result.map(encodeAll(topic, [payload], nowMillis, timeIso, options, undefined), (encoded) => encoded[0]!)

/**
 * {@link makeEncodedResult} for many payloads of one topic at one time (read
 * once from `Clock` by the caller): what `Publisher` and `Outbox` publish.
 * `publisherSource` (a publisher's configured source) applies when `options`
 * names none. The options apply to every message (their headers are built
 * once and shared); an explicit `id` names one message, so it is refused
 * with more than one payload. Fails with the first payload's error.
 *
 * @since 0.1.0
 */
export const makeEncodedAllResult = <A, I>(
  topic: Topic.Topic<A, I>,
  payloads: Iterable<A>,
  nowMillis: number,
  options?: MakeOptions,
  publisherSource?: string
): Result.Result<Array<Encoded>, Name.InvalidName | MalformedEnvelope | PayloadError> =>
  encodeAll(topic, payloads, nowMillis, new Date(nowMillis).toISOString(), options, publisherSource)

/** The one place messages are made in their wire form: options checked once, then each payload encoded. */
const encodeAll = <A, I>(
  topic: Topic.Topic<A, I>,
  payloads: Iterable<A>,
  nowMillis: number,
  timeIso: string,
  options: MakeOptions | undefined,
  publisherSource: string | undefined
): Result.Result<Array<Encoded>, Name.InvalidName | MalformedEnvelope | PayloadError> => {
  const headers = buildHeaders(options)
  if (Result.isFailure(headers)) return Result.fail(headers.failure)
  const resolved = resolveSource(options, publisherSource)
  if (Result.isFailure(resolved)) return Result.fail(resolved.failure)
  const source = resolved.success
  const givenId = options?.id
  const givenKey = options?.key
  const keyOf = topic.key
  const encoded: Array<Encoded> = []
  for (const payload of payloads) {
    if (givenId !== undefined && encoded.length > 0) {
      return Result.fail(
        new MalformedEnvelope({ message: "the id option names one message: give each payload its own publish and id" })
      )
    }
    const id = givenId ?? uuidv7(nowMillis)
    const data = topic.encode(payload)
    if (Result.isFailure(data)) return payloadError(topic.name, id, "encode", data.failure.message)
    encoded.push({
      id,
      topic: topic.name,
      type: topic.type,
      source,
      key: givenKey ?? (keyOf === undefined ? undefined : keyOf(payload)),
      time: timeIso,
      attempt: 1,
      headers: headers.success,
      data: data.success
    })
  }
  return Result.succeed(encoded)
}

const buildHeaders = (
  options: MakeOptions | undefined
): Result.Result<Readonly<Record<string, string>>, Name.InvalidName | MalformedEnvelope> => {
  if (options === undefined) return okEmptyHeaders
  if (options.id !== undefined && (options.id.length === 0 || options.id.length > 200)) {
    return Result.fail(new MalformedEnvelope({ message: "id must be 1 to 200 characters" }))
  }
  let headers: Record<string, string> | undefined
  if (options.headers !== undefined) {
    const checked = validateHeaders(options.headers)
    if (Result.isFailure(checked)) return Result.fail(checked.failure)
    headers = { ...options.headers }
  }
  const wellKnown: ReadonlyArray<readonly [string, string | undefined]> = [
    [Headers.traceparent, options.traceparent],
    [Headers.correlationId, options.correlationId],
    [Headers.causationId, options.causationId],
    [Headers.replyTo, options.replyTo]
  ]
  for (const [name, value] of wellKnown) {
    if (value === undefined) continue
    if (headers === undefined) headers = {}
    headers[name] = value
  }
  return headers === undefined ? okEmptyHeaders : Result.succeed(headers)
}

/**
 * The CloudEvents `source` of a new message: the option, else the publisher's, else {@link defaultSource}.
 * Every reader refuses an envelope without one (CloudEvents requires it), so an empty one is refused here.
 */
const resolveSource = (
  options: MakeOptions | undefined,
  publisherSource: string | undefined
): Result.Result<string, MalformedEnvelope> => {
  const source = options?.source ?? publisherSource ?? defaultSource
  return source === ""
    ? Result.fail(new MalformedEnvelope({ message: "source must not be empty (CloudEvents requires one)" }))
    : Result.succeed(source)
}

const emptyHeaders: Readonly<Record<string, string>> = Object.freeze({})
const okEmptyHeaders = Result.succeed(emptyHeaders)

/**
 * Encodes an envelope's payload with its topic's Schema (to JSON text).
 *
 * @since 0.1.0
 */
export const encodeResult = <A, I>(
  topic: Topic.Topic<A, I>,
  envelope: Envelope<A>
): Result.Result<Encoded, PayloadError> => {
  const data = topic.encode(envelope.payload)
  if (Result.isFailure(data)) {
    return payloadError(topic.name, envelope.id, "encode", data.failure.message)
  }
  return Result.succeed({
    id: envelope.id,
    topic: envelope.topic,
    type: envelope.type,
    source: envelope.source,
    key: envelope.key,
    time: DateTime.formatIso(envelope.time),
    attempt: envelope.attempt,
    headers: envelope.headers,
    data: data.success
  })
}

/**
 * Effectful {@link encodeResult}.
 *
 * @since 0.1.0
 */
export const encode = <A, I>(topic: Topic.Topic<A, I>, envelope: Envelope<A>): Effect.Effect<Encoded, PayloadError> =>
  Effect.fromResult(encodeResult(topic, envelope))

/**
 * Decodes an encoded envelope's payload with its topic's Schema.
 *
 * @since 0.1.0
 */
export const decodeResult = <A, I>(
  topic: Topic.Topic<A, I>,
  encoded: Encoded
): Result.Result<Envelope<A>, PayloadError | MalformedEnvelope> => {
  const payload = topic.decode(encoded.data)
  if (Result.isFailure(payload)) {
    return payloadError(topic.name, encoded.id, "decode", payload.failure.message)
  }
  const millis = Date.parse(encoded.time)
  if (Number.isNaN(millis)) {
    return Result.fail(
      new MalformedEnvelope({ message: `time ${JSON.stringify(encoded.time)} is not an RFC 3339 timestamp` })
    )
  }
  return Result.succeed({
    id: encoded.id,
    topic: encoded.topic,
    type: encoded.type,
    source: encoded.source,
    key: encoded.key,
    time: DateTime.makeUnsafe(millis),
    attempt: encoded.attempt,
    headers: encoded.headers,
    payload: payload.success
  })
}

/**
 * Effectful {@link decodeResult}.
 *
 * @since 0.1.0
 */
export const decode = <A, I>(
  topic: Topic.Topic<A, I>,
  encoded: Encoded
): Effect.Effect<Envelope<A>, PayloadError | MalformedEnvelope> => Effect.fromResult(decodeResult(topic, encoded))

const decodeEncodedSchema = Schema.decodeUnknownResult(EncodedSchema)

/**
 * Validates an unknown value as an {@link Encoded} envelope; the error names
 * every field that is missing or wrong.
 *
 * @since 0.1.0
 */
export const decodeEncoded = (u: unknown): Effect.Effect<Encoded, MalformedEnvelope> => {
  const result = decodeEncodedSchema(u, { errors: "all" })
  return Result.isSuccess(result)
    ? Effect.succeed({ ...result.success, key: result.success.key })
    : Effect.fail(new MalformedEnvelope({ message: result.failure.message }))
}

// ---------------------------------------------------------------------------
// Storage fields (mirrors the CloudEvents Kafka binary binding)
// ---------------------------------------------------------------------------

/**
 * The field names of the storage layout. One field per CloudEvents attribute
 * (`ce_` prefix, as in the Kafka binary binding), headers as `ce_<name>`
 * extension fields, and the payload's JSON text in `data`:
 *
 * | field | meaning | required |
 * | --- | --- | --- |
 * | `ce_specversion` | always `1.0` | yes |
 * | `ce_id` | message id (UUIDv7) | yes |
 * | `ce_type` | CloudEvents type | yes |
 * | `ce_source` | CloudEvents source | yes |
 * | `ce_time` | RFC 3339 time | yes |
 * | `ce_topic` | topic name (extension) | yes |
 * | `ce_attempt` | attempt, integer >= 1 (extension) | no, default 1 |
 * | `ce_subject` | ordering key | no |
 * | `ce_<header>` | one field per header | no |
 * | `content-type` | `application/json` | no |
 * | `data` | payload JSON text | yes |
 *
 * @since 0.1.0
 */
export const FieldNames = {
  specversion: "ce_specversion",
  id: "ce_id",
  type: "ce_type",
  source: "ce_source",
  time: "ce_time",
  topic: "ce_topic",
  attempt: "ce_attempt",
  subject: "ce_subject",
  contentType: "content-type",
  data: "data",
  headerPrefix: "ce_"
} as const

const coreFieldNames: ReadonlySet<string> = new Set([
  FieldNames.specversion,
  FieldNames.id,
  FieldNames.type,
  FieldNames.source,
  FieldNames.time,
  FieldNames.topic,
  FieldNames.attempt,
  FieldNames.subject,
  FieldNames.contentType,
  FieldNames.data
])

/**
 * The storage fields of an encoded envelope.
 *
 * @since 0.1.0
 */
export const toFields = (e: Encoded): Record<string, string> => {
  const fields: Record<string, string> = {
    ce_specversion: "1.0",
    ce_id: e.id,
    ce_type: e.type,
    ce_source: e.source,
    ce_time: e.time,
    ce_topic: e.topic,
    ce_attempt: e.attempt === 1 ? "1" : String(e.attempt),
    "content-type": "application/json",
    data: e.data
  }
  if (e.key !== undefined) fields.ce_subject = e.key
  for (const name in e.headers) fields[`ce_${name}`] = e.headers[name]!
  return fields
}

const positiveInt = /^[1-9][0-9]{0,8}$/

/**
 * The last time text found valid: messages published in one burst share their millisecond, so a reader checks
 * a run of equal times once (`Date.parse` was a third of reading a compact entry).
 */
let lastValidTime = ""

/** Whether `time` parses as a time (`Date.parse`), remembering the last valid one. */
const isTime = (time: string): boolean => {
  if (time === lastValidTime) return true
  if (Number.isNaN(Date.parse(time))) return false
  lastValidTime = time
  return true
}

/**
 * Reads an encoded envelope from storage fields. Fails with a
 * `MalformedEnvelope` naming the first missing or invalid field; never
 * throws.
 *
 * @since 0.1.0
 */
export const fromFields = (fields: Fields): Result.Result<Encoded, MalformedEnvelope> => {
  const compact = fields[CompactFieldNames.attributes]
  if (compact !== undefined) return fromCompact(compact, fields[CompactFieldNames.data])
  const id = fields.ce_id
  const type = fields.ce_type
  const source = fields.ce_source
  const time = fields.ce_time
  const topic = fields.ce_topic
  const data = fields.data
  const missing = (name: string) => Result.fail(new MalformedEnvelope({ message: `missing or empty field ${name}` }))
  if (!id) return missing(FieldNames.id)
  if (id.length > 200)
    return Result.fail(new MalformedEnvelope({ message: "field ce_id is longer than 200 characters" }))
  if (!type) return missing(FieldNames.type)
  if (!source) return missing(FieldNames.source)
  if (!time) return missing(FieldNames.time)
  // refused here, on receipt, rather than when a handler reads `ctx.time` (it threw there)
  if (!isTime(time)) {
    return Result.fail(
      new MalformedEnvelope({ message: `field ce_time ${JSON.stringify(time)} is not an RFC 3339 time` })
    )
  }
  if (!topic) return missing(FieldNames.topic)
  if (data === undefined) return missing(FieldNames.data)
  const specversion = fields.ce_specversion
  if (specversion !== undefined && specversion !== "1.0") {
    return Result.fail(new MalformedEnvelope({ message: `unsupported ce_specversion ${JSON.stringify(specversion)}` }))
  }
  const attemptText = fields.ce_attempt
  let attempt = 1
  if (attemptText !== undefined && attemptText !== "1") {
    if (!positiveInt.test(attemptText)) {
      return Result.fail(
        new MalformedEnvelope({ message: `field ce_attempt ${JSON.stringify(attemptText)} is not an integer >= 1` })
      )
    }
    attempt = Number(attemptText)
  }
  let headers: Record<string, string> | undefined
  for (const name in fields) {
    if (coreFieldNames.has(name)) continue
    if (name.startsWith(FieldNames.headerPrefix)) {
      const header = name.slice(FieldNames.headerPrefix.length)
      if (Result.isFailure(Name.check("header", header))) {
        return Result.fail(
          new MalformedEnvelope({ message: `field ${JSON.stringify(name)} is not a valid header name` })
        )
      }
      if (headers === undefined) headers = {}
      headers[header] = fields[name]!
    }
    // other fields (written by foreign producers) are ignored
  }
  return Result.succeed({
    id,
    topic,
    type,
    source,
    key: fields.ce_subject,
    time,
    attempt,
    headers: headers ?? emptyHeaders,
    data
  })
}

// ---------------------------------------------------------------------------
// Compact storage fields: the attributes as one JSON field, the payload in another
// ---------------------------------------------------------------------------

/**
 * The field names of the compact storage layout (the Redis layer's default): two fields per entry —
 * `ce`, the CloudEvents attributes as one JSON object, and `data`, the payload's JSON text. A reader
 * decodes a few small strings per entry instead of one per attribute, and the payload is still not
 * parsed before the consumer admits the message (type, size).
 *
 * | `ce` member | meaning | required |
 * | --- | --- | --- |
 * | `specversion` | `1.0` (not written: absent reads as 1.0) | no |
 * | `id` | message id | yes |
 * | `type` | CloudEvents type | yes |
 * | `source` | CloudEvents source | yes |
 * | `time` | RFC 3339 time | yes |
 * | `topic` | topic name (extension) | yes |
 * | `attempt` | attempt, integer >= 1 (extension) | no, default 1 |
 * | `subject` | ordering key | no |
 * | `headers` | an object of header name to string value | no |
 *
 * @since 0.1.0
 */
export const CompactFieldNames = {
  attributes: "ce",
  data: "data"
} as const

/**
 * The compact storage fields of an encoded envelope (see {@link CompactFieldNames}).
 *
 * @since 0.1.0
 */
export const toCompactFields = (e: Encoded): Record<string, string> => ({
  ce: compactAttributes(e, e.attempt),
  data: e.data
})

/** The `ce` JSON of an envelope at `attempt`. */
const compactAttributes = (e: Encoded, attempt: number): string => {
  // every byte of an entry counts (Redis stores it, a reader decodes it): what a reader can infer is left out —
  // specversion (1.0 is the only version), source when it is the default, topic when it equals the type
  const attributes: {
    id: string
    type: string
    source?: string
    time: string
    topic?: string
    attempt?: number
    subject?: string
    headers?: Readonly<Record<string, string>>
  } = { id: e.id, type: e.type, time: e.time }
  if (e.source !== defaultSource) attributes.source = e.source
  if (e.topic !== e.type) attributes.topic = e.topic
  if (attempt !== 1) attributes.attempt = attempt
  if (e.key !== undefined) attributes.subject = e.key
  for (const _ in e.headers) {
    attributes.headers = e.headers
    break
  }
  return JSON.stringify(attributes)
}

const malformed = (message: string) => Result.fail(new MalformedEnvelope({ message }))

const fromCompact = (text: string, data: string | undefined): Result.Result<Encoded, MalformedEnvelope> => {
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch {
    return malformed("field ce is not JSON")
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed))
    return malformed("field ce is not a JSON object")
  const a = parsed as {
    readonly id?: unknown
    readonly type?: unknown
    readonly source?: unknown
    readonly time?: unknown
    readonly topic?: unknown
    readonly specversion?: unknown
    readonly attempt?: unknown
    readonly subject?: unknown
    readonly headers?: unknown
  }
  const { id, type, time } = a
  const source = a.source === undefined ? defaultSource : a.source
  const topic = a.topic === undefined ? type : a.topic
  if (typeof id !== "string" || id === "") return malformed("missing or empty ce.id")
  if (id.length > 200) return malformed("ce.id is longer than 200 characters")
  if (typeof type !== "string" || type === "") return malformed("missing or empty ce.type")
  if (typeof source !== "string" || source === "") return malformed("missing or empty ce.source")
  if (typeof time !== "string" || time === "") return malformed("missing or empty ce.time")
  if (!isTime(time)) return malformed(`ce.time ${JSON.stringify(time)} is not an RFC 3339 time`)
  if (typeof topic !== "string" || topic === "") return malformed("missing or empty ce.topic")
  if (data === undefined) return malformed("missing field data")
  if (a.specversion !== undefined && a.specversion !== "1.0") {
    return malformed(`unsupported ce.specversion ${JSON.stringify(a.specversion)}`)
  }
  const attempt = a.attempt === undefined ? 1 : a.attempt
  if (typeof attempt !== "number" || !Number.isInteger(attempt) || attempt < 1 || attempt > 999_999_999) {
    return malformed(`ce.attempt ${JSON.stringify(a.attempt)} is not an integer >= 1`)
  }
  const subject = a.subject
  if (subject !== undefined && typeof subject !== "string") return malformed("ce.subject is not a string")
  let headers: Readonly<Record<string, string>> = emptyHeaders
  if (a.headers !== undefined) {
    if (a.headers === null || typeof a.headers !== "object" || Array.isArray(a.headers)) {
      return malformed("ce.headers is not an object")
    }
    for (const [name, value] of Object.entries(a.headers as Record<string, unknown>)) {
      if (typeof value !== "string") return malformed(`ce.headers.${name} is not a string`)
      if (Result.isFailure(Name.check("header", name)))
        return malformed(`${JSON.stringify(name)} is not a valid header name`)
    }
    headers = a.headers as Record<string, string>
  }
  return Result.succeed({ id, topic, type, source, key: subject, time, attempt, headers, data })
}

/**
 * The fields of a stored entry with its attempt changed, in the entry's own layout (a redelivery re-adds
 * the message with the next attempt).
 *
 * @since 0.1.0
 */
export const fieldsWithAttempt = (fields: Fields, envelope: Encoded, attempt: number): Record<string, string> => {
  const out: Record<string, string> = { ...fields }
  if (fields[CompactFieldNames.attributes] !== undefined) out.ce = compactAttributes(envelope, attempt)
  else out[FieldNames.attempt] = String(attempt)
  return out
}

/**
 * The ordering key of stored fields in either layout (`ce_subject`, or `subject` in `ce`); undefined when
 * there is none or the fields cannot be read.
 *
 * @since 0.1.0
 */
export const subjectOfFields = (fields: Fields): string | undefined => {
  const compact = fields[CompactFieldNames.attributes]
  if (compact === undefined) return fields[FieldNames.subject]
  try {
    const subject = (JSON.parse(compact) as { readonly subject?: unknown }).subject
    return typeof subject === "string" ? subject : undefined
  } catch {
    return undefined
  }
}

// ---------------------------------------------------------------------------
// CloudEvents 1.0, JSON structured mode
// ---------------------------------------------------------------------------

/**
 * A CloudEvents 1.0 event in JSON structured mode.
 *
 * @since 0.1.0
 */
export interface CloudEvent {
  readonly specversion: "1.0"
  readonly id: string
  readonly source: string
  readonly type: string
  readonly time?: string
  readonly subject?: string
  readonly datacontenttype?: string
  readonly data?: unknown
  readonly data_base64?: string
  readonly [extension: string]: unknown
}

/**
 * The CloudEvents structured-mode JSON of an encoded envelope. `data` is the
 * payload as a JSON value with `datacontenttype: application/json`; the
 * topic and attempt travel as the extension attributes `topic` and `attempt`,
 * the key as `subject`, and every header as an extension attribute of the
 * same name.
 *
 * @since 0.1.0
 */
export const toCloudEvent = (e: Encoded): CloudEvent => {
  const event: Record<string, unknown> = {
    specversion: "1.0",
    id: e.id,
    source: e.source,
    type: e.type,
    time: e.time,
    datacontenttype: "application/json",
    topic: e.topic,
    attempt: e.attempt
  }
  if (e.key !== undefined) event.subject = e.key
  for (const name in e.headers) event[name] = e.headers[name]
  event.data = JSON.parse(e.data)
  return event as unknown as CloudEvent
}

const cloudEventAttributes: ReadonlySet<string> = new Set([
  "specversion",
  "id",
  "source",
  "type",
  "time",
  "subject",
  "datacontenttype",
  "dataschema",
  "data",
  "data_base64",
  "topic",
  "attempt"
])

const isJsonContentType = (ct: string | undefined): boolean =>
  ct === undefined || /^application\/(?:[\w.+-]+\+)?json(?:\s*;.*)?$/i.test(ct) || /^text\/json\b/i.test(ct)

/**
 * Options of {@link fromCloudEvent}.
 *
 * @since 0.1.0
 */
export interface FromCloudEventOptions {
  /** Topic to use when the event has no `topic` extension attribute. */
  readonly topic?: string | undefined
}

/**
 * Reads a CloudEvents 1.0 structured-mode event (a parsed JSON object, or its
 * JSON text). The required attributes `specversion` (`"1.0"`), `id`,
 * `source` and `type` must be present; an event may carry `data` or
 * `data_base64`, never both. Without `time`, the current `Clock` time is used;
 * without a `topic` extension, the `topic` option. Extension attributes
 * become headers.
 *
 * @since 0.1.0
 */
export const fromCloudEvent = (
  input: unknown,
  options?: FromCloudEventOptions
): Effect.Effect<Encoded, MalformedEnvelope> =>
  Effect.suspend(() => {
    const fail = (message: string) => Effect.fail(new MalformedEnvelope({ message: `CloudEvent: ${message}` }))
    let event: unknown = input
    if (typeof input === "string") {
      try {
        event = JSON.parse(input)
      } catch (e) {
        return fail(`not JSON: ${e instanceof Error ? e.message : String(e)}`)
      }
    }
    if (typeof event !== "object" || event === null || Array.isArray(event)) return fail("not a JSON object")
    const ev = event as Record<string, unknown>
    if (ev.specversion !== "1.0") return fail(`specversion must be "1.0", got ${JSON.stringify(ev.specversion)}`)
    for (const required of ["id", "source", "type"] as const) {
      if (typeof ev[required] !== "string" || (ev[required] as string).length === 0) {
        return fail(`required attribute ${required} is missing or not a non-empty string`)
      }
    }
    const topic = typeof ev.topic === "string" ? ev.topic : options?.topic
    if (topic === undefined) return fail("no topic extension attribute and no topic option")
    const topicOk = Name.check("topic", topic)
    if (Result.isFailure(topicOk)) return fail(topicOk.failure.message)
    if (ev.subject !== undefined && typeof ev.subject !== "string") return fail("subject must be a string")
    if (ev.time !== undefined && (typeof ev.time !== "string" || Number.isNaN(Date.parse(ev.time)))) {
      return fail("time must be an RFC 3339 timestamp")
    }
    let attempt = 1
    if (ev.attempt !== undefined) {
      const n = typeof ev.attempt === "string" ? Number(ev.attempt) : ev.attempt
      if (typeof n !== "number" || !Number.isInteger(n) || n < 1) return fail("attempt must be an integer >= 1")
      attempt = n
    }
    const contentType = ev.datacontenttype
    if (contentType !== undefined && typeof contentType !== "string") return fail("datacontenttype must be a string")
    const json = isJsonContentType(contentType)
    let data: string
    if (ev.data !== undefined && ev.data_base64 !== undefined) return fail("has both data and data_base64")
    if (ev.data_base64 !== undefined) {
      if (typeof ev.data_base64 !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(ev.data_base64)) {
        return fail("data_base64 must be a base64 string")
      }
      const text = Buffer.from(ev.data_base64, "base64").toString("utf8")
      if (json) {
        try {
          JSON.parse(text)
        } catch {
          return fail("data_base64 does not hold JSON text although datacontenttype is JSON")
        }
        data = text
      } else {
        data = JSON.stringify(text)
      }
    } else if (ev.data === undefined) {
      data = "null"
    } else {
      data = JSON.stringify(ev.data)
    }
    let headers: Record<string, string> | undefined
    for (const name in ev) {
      if (cloudEventAttributes.has(name)) continue
      const checked = Name.check("header", name)
      if (Result.isFailure(checked)) return fail(`extension attribute ${JSON.stringify(name)}: ${checked.failure.rule}`)
      const value = ev[name]
      if (value === null || typeof value === "object") return fail(`extension attribute ${name} must be a scalar`)
      if (headers === undefined) headers = {}
      headers[name] = String(value)
    }
    const withTime = (time: string): Encoded => ({
      id: ev.id as string,
      topic,
      type: ev.type as string,
      source: ev.source as string,
      key: ev.subject as string | undefined,
      time,
      attempt,
      headers: headers ?? emptyHeaders,
      data
    })
    return typeof ev.time === "string"
      ? Effect.succeed(withTime(ev.time))
      : Effect.map(Clock.currentTimeMillis, (ms) => withTime(new Date(ms).toISOString()))
  })

/**
 * Runs a publish in a producer span (`<name> <topic>`, OpenTelemetry messaging attributes) when the caller
 * is inside a span, so the messages' `traceparent` names that span; an untraced publish starts none (it
 * stays as cheap as before tracing).
 *
 * @since 0.1.0
 */
export const producerSpan = <A, E, R>(
  topic: string,
  name: string,
  effect: Effect.Effect<A, E, R>
): Effect.Effect<A, E, R> =>
  Effect.withFiber((fiber) => {
    const span = fiber.cache.span
    return span === undefined || span._tag !== "Span"
      ? effect
      : Effect.withSpan(effect, `${name} ${topic}`, {
          kind: "producer",
          attributes: {
            "messaging.system": "converge",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic
          }
        })
  })
