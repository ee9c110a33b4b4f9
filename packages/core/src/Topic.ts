/**
 * `Topic` — a named channel and the Schema of its payload.
 *
 * Publishing and handling are typed by the topic: `Publisher.publish(topic, payload)`
 * only accepts the topic's payload type, and a consumer of the topic receives
 * decoded values. A payload that fails its Schema on the consuming side is a
 * permanent error (it goes to the dead-letter queue, never retried).
 *
 * @example
 * ```ts
 * import { Schema } from "effect"
 * import { Topic } from "@converge/core"
 *
 * const OrderPlaced = Schema.Struct({ orderId: Schema.String, total: Schema.Number })
 * export const orders = Topic.make("orders", OrderPlaced, { key: (o) => o.orderId })
 * ```
 *
 * On the wire a payload is the JSON text of its Schema-encoded value. A Schema
 * whose encoded side is already JSON (strings, numbers, booleans, null,
 * literals, arrays, structs, records, unions of these: most payloads) is used
 * as it is. One that encodes to values JSON cannot carry — a `Date`, a
 * `bigint`, a `Map`, a class instance — goes through
 * `Schema.toCodecJson(schema)` instead (a `Date` travels as its ISO string, a
 * `bigint` as a decimal string), so what is published decodes on the other
 * side. That derivation costs about a third more per payload; spell the wire
 * form out (`Schema.DateFromString`, `Schema.BigIntFromString`, ...)
 * where it matters. JSON has no `NaN` or `Infinity`: use `Schema.Finite` for
 * numbers that must arrive as they left.
 *
 * A topic has a size limit (`maxBytes`, default 1 MiB of UTF-8 JSON text,
 * Kafka's default): a larger payload fails the publish with a typed error,
 * and a consumer refuses one that arrives anyway (written by another client)
 * without parsing it — it goes to the dead-letter queue with reason
 * `oversized`. Brokers keep messages in memory (Redis) or in rows read in
 * batches of hundreds (the outbox): one 200 MB payload should not take
 * either down.
 *
 * @since 0.1.0
 */
import { Buffer } from "node:buffer"
import { Effect, Result, Schema, SchemaAST } from "effect"
import { SchemaJITCompiler } from "effect/schema"
import * as Name from "./Name.ts"

const TypeId = "~@converge/core/Topic" as const

/**
 * A topic carrying payloads of type `A`, encoded as `I` on the wire.
 *
 * @since 0.1.0
 */
export interface Topic<A, I = A> {
  readonly [TypeId]: typeof TypeId
  /** The validated topic name. */
  readonly name: string
  /** The payload Schema. Must not need services to encode or decode. */
  readonly schema: Schema.Codec<A, I>
  /** The CloudEvents `type` written on every message (default: the topic name). */
  readonly type: string
  /** Derives the ordering key of a payload (its CloudEvents `subject`). */
  readonly key: ((payload: A) => string) | undefined
  /** The largest payload, in UTF-8 bytes of its JSON text, this topic carries. */
  readonly maxBytes: number
  /**
   * Encodes a payload to its JSON text. Compiled once per topic. `JsonSyntaxError`: the encoded value
   * cannot be written as JSON text (a cycle, say); `PayloadTooLarge`: the text exceeds `maxBytes`.
   */
  readonly encode: (payload: A) => Result.Result<string, Schema.SchemaError | JsonSyntaxError | PayloadTooLarge>
  /** Decodes JSON text to a payload (text over `maxBytes` is refused unparsed). Compiled once per topic. */
  readonly decode: (data: string) => Result.Result<A, Schema.SchemaError | JsonSyntaxError | PayloadTooLarge>
}

/**
 * Options of {@link make}.
 *
 * @since 0.1.0
 */
export interface Options<A> {
  /** CloudEvents `type` of the messages (default: the topic name), e.g. `com.acme.order.placed`. */
  readonly type?: string | undefined
  /** Derives the ordering key from a payload; a key passed to `publish` wins. */
  readonly key?: ((payload: A) => string) | undefined
  /**
   * The largest payload, in UTF-8 bytes of its JSON text (default {@link defaultMaxBytes}, 1 MiB). A
   * larger one fails the publish (`PayloadError`); a consumer dead-letters one that arrives anyway, with
   * reason `oversized`, without parsing it. Publishers and consumers of a topic should agree on it.
   */
  readonly maxBytes?: number | undefined
  /**
   * Compile the payload codec with Effect's Schema JIT (`effect/schema` `SchemaJITCompiler`; default
   * `true`). Encoding and decoding a plain struct take a sixth to a fourteenth of the interpreter's time; what
   * is accepted, what is produced and every error message stay the interpreter's (an input the
   * compiled code refuses is decoded again by the interpreter for its error). Where `new Function`
   * is not allowed, or a Schema cannot be compiled, the interpreter is used. The compiled codec is
   * registered on the Schema itself, so other code decoding the same Schema uses it too. `false`
   * leaves the Schema to the interpreter (unless something else compiled it).
   */
  readonly jit?: boolean | undefined
}

/**
 * The default size limit of a payload: 1 MiB (1 048 576 bytes) of UTF-8 JSON text.
 *
 * @since 0.1.0
 */
export const defaultMaxBytes = 1024 * 1024

/**
 * A payload is larger than its topic's `maxBytes`. `bytes` is its size in
 * UTF-8, or a lower bound (its length) when that alone is over the limit.
 *
 * @since 0.1.0
 */
export class PayloadTooLarge extends Schema.TaggedError<PayloadTooLarge>("@converge/core/Topic/PayloadTooLarge")(
  "PayloadTooLarge",
  { bytes: Schema.Number, maxBytes: Schema.Number, message: Schema.String }
) {}

/**
 * 0 when `text` takes at most `max` bytes in UTF-8; otherwise how many it takes (a lower bound, its
 * length, when that alone is over the limit). A UTF-16 code unit takes 1 to 3 bytes, so most texts are
 * decided by their length alone; the rest are measured natively.
 */
const excessBytes = (text: string, max: number): number => {
  const units = text.length
  if (units * 3 <= max) return 0
  if (units > max) return units
  const bytes = Buffer.byteLength(text, "utf8")
  return bytes > max ? bytes : 0
}

const tooLarge = (text: string, max: number): PayloadTooLarge | undefined => {
  const bytes = excessBytes(text, max)
  return bytes === 0
    ? undefined
    : new PayloadTooLarge({
        bytes,
        maxBytes: max,
        message: `the payload is at least ${bytes} bytes of JSON, over the topic's limit of ${max} (Topic option maxBytes)`
      })
}

/**
 * The data of a message is not valid JSON text.
 *
 * @since 0.1.0
 */
export class JsonSyntaxError extends Schema.TaggedError<JsonSyntaxError>("@converge/core/Topic/JsonSyntaxError")(
  "JsonSyntaxError",
  { message: Schema.String }
) {}

/**
 * Any topic, whatever its payload.
 *
 * @since 0.1.0
 */
// biome-ignore lint/suspicious/noExplicitAny: a topic of any payload
export type Any = Topic<any, any>

/**
 * The payload type of a topic.
 *
 * @since 0.1.0
 */
export type Payload<T> = T extends Topic<infer A, infer _I> ? A : never

const typePattern = /^[\x21-\x7e]{1,255}$/

/**
 * Whether every value of an encoded-side AST is a JSON value that
 * `JSON.stringify` / `JSON.parse` give back as it was (`undefined` counts: it
 * is an optional key left out).
 */
const isJsonSafe = (ast: SchemaAST.AST, seen: Set<SchemaAST.AST> = new Set()): boolean => {
  if (seen.has(ast)) return true // a recursive schema: its other branches decide
  seen.add(ast)
  switch (ast._tag) {
    case "String":
    case "Number":
    case "Boolean":
    case "Null":
    case "Undefined":
    case "Void":
    case "Never":
    case "Unknown":
    case "Any":
    case "Enum":
    case "TemplateLiteral":
      return true
    case "Literal":
      return typeof ast.literal !== "bigint"
    case "Arrays":
      return ast.elements.every((e) => isJsonSafe(e, seen)) && ast.rest.every((e) => isJsonSafe(e, seen))
    case "Objects":
      return (
        ast.propertySignatures.every((p) => typeof p.name === "string" && isJsonSafe(p.type, seen)) &&
        ast.indexSignatures.every((i) => isJsonSafe(i.parameter, seen) && isJsonSafe(i.type, seen))
      )
    case "Union":
      return ast.types.every((t) => isJsonSafe(t, seen))
    case "Suspend":
      return isJsonSafe(ast.thunk(), seen)
    default:
      // Declaration (Date, Map, class instances, ...), BigInt, Symbol, UniqueSymbol, ObjectKeyword
      return false
  }
}

/**
 * The Schema that puts a topic's payloads on the wire: `schema` itself when
 * its encoded side is JSON, else its canonical JSON codec.
 */
const wireSchema = <A, I>(schema: Schema.Codec<A, I>): Schema.Codec<A, unknown> =>
  isJsonSafe(SchemaAST.toEncoded(schema.ast)) ? schema : Schema.toCodecJson(schema)

const stringify = (encoded: unknown): Result.Result<string, JsonSyntaxError> => {
  try {
    const text: string | undefined = JSON.stringify(encoded)
    return text === undefined
      ? Result.fail(new JsonSyntaxError({ message: "the payload encodes to undefined, which JSON cannot carry" }))
      : Result.succeed(text)
  } catch (e) {
    return Result.fail(
      new JsonSyntaxError({ message: `cannot be written as JSON: ${e instanceof Error ? e.message : String(e)}` })
    )
  }
}

/** The ASTs this module handed to the JIT: enabling one again would drop its compiled code and compile it anew. */
const compiled = new WeakSet<SchemaAST.AST>()

/** Registers Effect's Schema JIT for decoding (the AST) and encoding (its flipped AST), once per AST. */
const compile = (ast: SchemaAST.AST): void => {
  if (compiled.has(ast)) return
  compiled.add(ast)
  SchemaJITCompiler.enable(ast)
  SchemaJITCompiler.enable(SchemaAST.flip(ast))
}

/**
 * Defines a topic. Throws {@link Name.InvalidName} for an invalid name or type
 * (see `Name` for the rules): topics are module-level constants, and a bad
 * name is a programming error that must stop the program at start-up. Use
 * {@link makeEffect} for names that come from input.
 *
 * @since 0.1.0
 */
export const make = <A, I>(name: string, schema: Schema.Codec<A, I>, options?: Options<A>): Topic<A, I> => {
  Name.validateSync("topic", name)
  const type = options?.type ?? name
  if (!typePattern.test(type)) {
    throw new Name.InvalidName({
      kind: "topic",
      name,
      rule: `type ${JSON.stringify(type)} must be 1-255 printable ASCII characters without spaces`
    })
  }
  const maxBytes = options?.maxBytes ?? defaultMaxBytes
  if (!Number.isSafeInteger(maxBytes) || maxBytes < 1) {
    throw new Name.InvalidName({ kind: "topic", name, rule: `maxBytes must be an integer >= 1 (got ${maxBytes})` })
  }
  const wire = wireSchema(schema)
  if (options?.jit !== false) compile(wire.ast)
  const encodePayload = Schema.encodeUnknownResult(wire)
  const decodePayload = Schema.decodeUnknownResult(wire)
  return {
    [TypeId]: TypeId,
    name,
    schema,
    type,
    key: options?.key,
    maxBytes,
    encode: (payload) => {
      const encoded = encodePayload(payload)
      if (Result.isFailure(encoded)) return Result.fail(encoded.failure)
      const text = stringify(encoded.success)
      if (Result.isFailure(text)) return text
      const large = tooLarge(text.success, maxBytes)
      return large === undefined ? text : Result.fail(large)
    },
    decode: (data) => {
      const large = tooLarge(data, maxBytes)
      if (large !== undefined) return Result.fail(large)
      let json: unknown
      try {
        json = JSON.parse(data)
      } catch (e) {
        return Result.fail(new JsonSyntaxError({ message: e instanceof Error ? e.message : String(e) }))
      }
      return decodePayload(json)
    }
  }
}

/**
 * Like {@link make}, with an invalid name in the error channel.
 *
 * @since 0.1.0
 */
export const makeEffect = <A, I>(
  name: string,
  schema: Schema.Codec<A, I>,
  options?: Options<A>
): Effect.Effect<Topic<A, I>, Name.InvalidName> =>
  Effect.try({
    try: () => make(name, schema, options),
    catch: (e) => e as Name.InvalidName
  })

/**
 * True when `u` is a topic.
 *
 * @since 0.1.0
 */
export const isTopic = (u: unknown): u is Any => typeof u === "object" && u !== null && TypeId in u
