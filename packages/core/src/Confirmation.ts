/**
 * `Confirmation` — stage 5's answer to the publisher: what became of its message.
 *
 * A publisher that wants to know sets `replyTo` (a topic name) when it publishes; a consumer made with
 * `confirm: true` then sends a typed {@link Confirmation} to that topic: `processed` once the handler
 * succeeded (before the message is acknowledged: a message whose confirmation could not be published is
 * not acknowledged, and comes back), or `dead-lettered` with the reason and the error once it went to the
 * dead-letter queue. Confirmations are messages on the broker, so they work on every broker layer, and they
 * are at-least-once like every message.
 *
 * The publisher side is {@link layer}: a subscription of a consumer group of its own to the reply topic,
 * and {@link await} for one message's confirmation. It is **durable**: a confirmation stays pending in the
 * broker until it was handed to an `await` (or kept unawaited for `keepUnawaited`), so one that arrives
 * while the publisher is down is received after it restarts. Every group of the reply topic receives every
 * confirmation: give each publishing process a group of its own, with a name that survives its restarts.
 *
 * ```ts
 * const receipt = yield* Publisher.publish(orders, order, { replyTo: "shop.confirmations" })
 * const confirmation = yield* Confirmation.await(receipt.id, "30 seconds")
 * // { outcome: "processed", group: "billing", ... } or { outcome: "dead-lettered", reason, error, ... }
 * ```
 *
 * @since 0.1.0
 */
import { Context, Deferred, Duration, Effect, Layer, Option, PubSub, Result, Schema, type Scope, Stream } from "effect"
import * as Broker from "./Broker.ts"
import type { BrokerError } from "./BrokerError.ts"
import * as Envelope from "./Envelope.ts"
import * as Name from "./Name.ts"
import * as Retry from "./Retry.ts"
import * as Topic from "./Topic.ts"

/**
 * What became of a message, as its consumer reports it.
 *
 * @since 0.1.0
 */
export const Confirmation = Schema.Struct({
  /** The confirmed message's id. */
  messageId: Schema.String,
  /** The topic it was consumed from. */
  topic: Schema.String,
  /** The consumer group that confirms. */
  group: Schema.String,
  /** `processed`: the handler succeeded. `dead-lettered`: it went to the dead-letter queue. */
  outcome: Schema.Literals(["processed", "dead-lettered"]),
  /** The dead-letter reason (`permanent`, `exhausted`, `decode`, ...). */
  reason: Schema.optional(Schema.String),
  /** The last error, encoded. */
  error: Schema.optional(Schema.String),
  /** Handler attempts made. */
  attempts: Schema.Int
})

/**
 * A confirmation's value.
 *
 * @since 0.1.0
 */
export type Confirmation = typeof Confirmation.Type

/**
 * The CloudEvents type of confirmation messages.
 *
 * @since 0.1.0
 */
export const type = "converge.confirmation"

/**
 * A reply topic: the topic confirmations are sent to (keyed by the confirmed message's id).
 *
 * @since 0.1.0
 */
export const topic = (name: string): Topic.Topic<Confirmation, typeof Confirmation.Encoded> =>
  Topic.make(name, Confirmation, { key: (c) => c.messageId, type })

/**
 * The encoded confirmation messages for confirmations of deliveries (what the `Consumer` publishes): each
 * to its delivery's `replyto` topic, correlated with the delivery's correlation id (or its id), caused by
 * it. Deliveries without a `replyto` get none.
 *
 * @since 0.1.0
 */
export const encodeFor = (
  items: ReadonlyArray<{ readonly delivery: Broker.Delivery; readonly confirmation: Confirmation }>,
  now: number
): Array<{ readonly delivery: Broker.Delivery; readonly encoded: Result.Result<Envelope.Encoded, unknown> }> => {
  const out: Array<{ readonly delivery: Broker.Delivery; readonly encoded: Result.Result<Envelope.Encoded, unknown> }> =
    []
  for (const { delivery, confirmation } of items) {
    const replyTo = delivery.envelope.headers[Envelope.Headers.replyTo]
    if (replyTo === undefined || replyTo === "") continue
    const reply = replyTopic(replyTo)
    out.push({
      delivery,
      encoded: Result.flatMap(reply, (t) =>
        Envelope.makeEncodedResult(t, confirmation, now, {
          correlationId: delivery.envelope.headers[Envelope.Headers.correlationId] ?? delivery.envelope.id,
          causationId: delivery.envelope.id
        })
      )
    })
  }
  return out
}

/** Reply topics by name (a confirmation's topic is made once per name). */
const replyTopics = new Map<string, Topic.Topic<Confirmation, typeof Confirmation.Encoded>>()

/** The reply topic of a name, or why the name is not one. */
const replyTopic = (name: string): Result.Result<Topic.Topic<Confirmation, typeof Confirmation.Encoded>, unknown> => {
  const known = replyTopics.get(name)
  if (known !== undefined) return Result.succeed(known)
  try {
    const made = topic(name)
    replyTopics.set(name, made)
    return Result.succeed(made)
  } catch (error) {
    return Result.fail(error)
  }
}

/**
 * No confirmation arrived in time.
 *
 * @since 0.1.0
 */
export class ConfirmationTimeout extends Schema.TaggedError<ConfirmationTimeout>(
  "@converge/core/Confirmation/ConfirmationTimeout"
)("ConfirmationTimeout", { messageId: Schema.String, timeout: Schema.String }) {
  /** Names the message and the wait. */
  override get message(): string {
    return `no confirmation of message ${this.messageId} within ${this.timeout}`
  }
}

/**
 * The publisher side: confirmations of the reply topic, awaited by message id.
 *
 * @since 0.1.0
 */
export class Confirmations extends Context.Service<
  Confirmations,
  {
    /** Waits for the confirmation of a message (one that arrived before the call counts). */
    readonly await: (messageId: string, timeout: Duration.Input) => Effect.Effect<Confirmation, ConfirmationTimeout>
    /** Every confirmation as it arrives (live; for a durable wait use `await`). */
    readonly stream: Stream.Stream<Confirmation>
  }
>()("@converge/core/Confirmation/Confirmations") {}

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** The reply topic (what publishers pass as `replyTo`). */
  readonly topic: string
  /** This publisher's consumer group on it: one per publishing process, stable across its restarts. */
  readonly group: string
  /** The consumer name within the group (default: the group's name). */
  readonly consumer?: string | undefined
  /** How long a confirmation nobody awaits is kept (unacknowledged) before it is dropped (default 1 hour). */
  readonly keepUnawaited?: Duration.Input | undefined
}

/**
 * The publisher's confirmations as a Layer over the `Broker`: subscribes to the reply topic for as long as
 * the layer lives. A confirmation is acknowledged once an `await` received it, or once it was kept
 * `keepUnawaited`; until then it stays pending in the broker (durable across restarts).
 *
 * @since 0.1.0
 */
export const layer = (options: Options): Layer.Layer<Confirmations, Name.InvalidName, Broker.Broker> =>
  Layer.effect(Confirmations, make(options))

/**
 * The service of {@link layer}, in the current scope.
 *
 * @since 0.1.0
 */
export const make = (
  options: Options
): Effect.Effect<Confirmations["Service"], Name.InvalidName, Broker.Broker | Scope.Scope> =>
  Effect.gen(function* () {
    const replies = yield* Topic.makeEffect(options.topic, Confirmation, { key: (c) => c.messageId, type })
    const group = yield* Name.validate("group", options.group)
    const consumer = yield* Name.validate("consumer", options.consumer ?? options.group)
    const keepMs = Duration.toMillis(Duration.fromInputUnsafe(options.keepUnawaited ?? "1 hour"))
    const broker = yield* Broker.Broker
    const waiting = new Map<string, Array<Deferred.Deferred<Confirmation>>>()
    const arrived = new Map<
      string,
      { readonly confirmation: Confirmation; readonly delivery: Broker.Delivery; readonly at: number }
    >()
    const live = yield* PubSub.unbounded<Confirmation>()

    const settle = (delivery: Broker.Delivery) =>
      Effect.catch(delivery.ack, (e: BrokerError) => Effect.logDebug("confirmation: ack failed; it will come again", e))

    const receive = (delivery: Broker.Delivery): Effect.Effect<void> =>
      Effect.gen(function* () {
        const decoded = replies.decode(delivery.envelope.data)
        if (Result.isFailure(decoded)) {
          yield* Effect.ignore(delivery.deadLetter({ reason: "decode", error: decoded.failure.message, attempts: 0 }))
          return
        }
        const confirmation = decoded.success
        yield* PubSub.publish(live, confirmation)
        const awaiting = waiting.get(confirmation.messageId)
        if (awaiting !== undefined) {
          waiting.delete(confirmation.messageId)
          for (const d of awaiting) yield* Deferred.succeed(d, confirmation)
          yield* settle(delivery)
          return
        }
        // a repeat of one already kept (confirmations are at-least-once): the kept one answers, this one is done
        if (arrived.has(confirmation.messageId)) {
          yield* settle(delivery)
          return
        }
        // nobody waits yet: keep it pending (durable) until an await takes it, or for keepUnawaited
        const now = yield* Effect.clockWith((c) => c.currentTimeMillis)
        arrived.set(confirmation.messageId, { confirmation, delivery, at: now })
      })

    // a sweep drops confirmations nobody awaited for keepUnawaited (they are acknowledged then)
    const sweep = Effect.gen(function* () {
      const now = yield* Effect.clockWith((c) => c.currentTimeMillis)
      for (const [id, kept] of arrived) {
        if (now - kept.at < keepMs) continue
        arrived.delete(id)
        yield* settle(kept.delivery)
      }
    })

    yield* broker.subscribe({ topic: replies.name, group, consumer }).pipe(
      Stream.runForEach(receive),
      Effect.retry({ schedule: Retry.exponential("100 millis", "5 seconds"), while: (e) => e.isRetryable }),
      // the broker shut down before this layer (the other scope order): a normal stop, not a failure
      Effect.catchIf(
        (e) => e.reason._tag === "BrokerClosed",
        () => Effect.logDebug("confirmation: subscription stopped: the broker was shut down")
      ),
      Effect.catchCause((cause) => Effect.logError("confirmation: subscription stopped", cause)),
      Effect.forkScoped
    )
    yield* Effect.forkScoped(Effect.forever(Effect.andThen(Effect.sleep(Math.max(1000, keepMs / 10)), sweep)))

    const awaitOne = (messageId: string, timeout: Duration.Input): Effect.Effect<Confirmation, ConfirmationTimeout> =>
      Effect.gen(function* () {
        const kept = arrived.get(messageId)
        if (kept !== undefined) {
          arrived.delete(messageId)
          yield* settle(kept.delivery)
          return kept.confirmation
        }
        const deferred = yield* Deferred.make<Confirmation>()
        const list = waiting.get(messageId)
        if (list === undefined) waiting.set(messageId, [deferred])
        else list.push(deferred)
        const got = yield* Effect.timeoutOption(Deferred.await(deferred), timeout)
        if (Option.isSome(got)) return got.value
        const rest = waiting.get(messageId)?.filter((d) => d !== deferred)
        if (rest === undefined || rest.length === 0) waiting.delete(messageId)
        else waiting.set(messageId, rest)
        return yield* new ConfirmationTimeout({
          messageId,
          timeout: Duration.format(Duration.fromInputUnsafe(timeout))
        })
      })

    return Confirmations.of({ await: awaitOne, stream: Stream.fromPubSub(live) })
  })

/**
 * Waits for the confirmation of a message with the {@link Confirmations} in context; fails with
 * {@link ConfirmationTimeout} when none arrives within `timeout` (by `Clock`: `TestClock` drives it).
 *
 * @since 0.1.0
 */
const awaitConfirmation = (
  messageId: string,
  timeout: Duration.Input
): Effect.Effect<Confirmation, ConfirmationTimeout, Confirmations> =>
  Confirmations.use((c) => c.await(messageId, timeout))

export {
  /**
   * Waits for the confirmation of a message with the {@link Confirmations} in context; fails with
   * {@link ConfirmationTimeout} when none arrives within `timeout` (by `Clock`: `TestClock` drives it).
   *
   * @since 0.1.0
   */
  awaitConfirmation as await
}
