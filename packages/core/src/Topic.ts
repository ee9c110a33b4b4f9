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
 * @since 0.1.0
 */
import { Effect, Result, Schema } from "effect"
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
  /** Encodes a payload to its JSON text. Compiled once per topic. */
  readonly encode: (payload: A) => Result.Result<string, Schema.SchemaError>
  /** Decodes JSON text to a payload. Compiled once per topic. */
  readonly decode: (data: string) => Result.Result<A, Schema.SchemaError | JsonSyntaxError>
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
  const encodePayload = Schema.encodeUnknownResult(schema)
  const decodePayload = Schema.decodeUnknownResult(schema)
  return {
    [TypeId]: TypeId,
    name,
    schema,
    type,
    key: options?.key,
    encode: (payload) => {
      const encoded = encodePayload(payload)
      return Result.isFailure(encoded) ? Result.fail(encoded.failure) : Result.succeed(JSON.stringify(encoded.success))
    },
    decode: (data) => {
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
