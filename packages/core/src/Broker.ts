/**
 * `Broker` — the low-level, pluggable contract every broker layer implements.
 *
 * A broker sees encoded envelopes only (`Envelope.Encoded`); Schema decoding,
 * retry policy and error classification live above it (`Publisher`,
 * `Consumer`). Layers: `@converge/broker-memory` (tests, demos) and
 * `@converge/broker-redis-streams` (production). Anyone can implement it; the
 * conformance suite `BrokerTest.suite` from `@converge/core/testing` says
 * whether an implementation honours the semantics below.
 *
 * ## Semantics (every implementation must honour them)
 *
 * - **Publish** appends a batch to a topic, in order; when the effect
 *   succeeds every message of the batch is stored at the broker's
 *   confirmation level. On failure, some of the batch may have been stored:
 *   publishing again is safe because consumers dedupe by message id.
 *   `publish` is safe to call from many fibers at once.
 * - **Consumer groups**: every group of a topic receives every message
 *   (fan-out across groups); within a group, each message goes to one
 *   consumer at a time (competing consumers). A new group starts at the
 *   oldest retained message.
 * - **Pending list**: a delivered message stays pending, owned by the consumer
 *   it went to, until it is settled. Pending messages survive consumer close
 *   and restart: a consumer that subscribes again under the same name gets its
 *   own pending messages first, then new ones. Pending messages of another
 *   consumer that stayed unsettled longer than `claimIdle` are claimed (a
 *   crashed consumer); of two concurrent claimers, exactly one wins.
 * - **Delivery count**: every delivery carries how many times this message
 *   was delivered to this group, this one included (1 on first delivery). It
 *   grows on every redelivery, claim and delayed retry.
 * - **Settlement from the exit of the handler**: the `Consumer` runtime (the
 *   one way applications settle) acks on success (one `ackAll` per read),
 *   nacks with a delay or dead-letters a failure per its retry policy, and
 *   settles nothing on interruption: the message stays pending and is
 *   redelivered (to this consumer on resubscribe, or claimed by another).
 *   A delivery settles at most once: a second ack, nack or dead-letter, or
 *   one after the message was redelivered, claimed by another consumer or
 *   lost, fails with `BrokerError` reason `DeliveryClosed` (or, where the
 *   broker cannot tell, is a no-op) and never touches another entry. One
 *   exception a layer may make: a late *ack* of a message another consumer
 *   claimed may be accepted (its handler succeeded, so the message is done;
 *   the claimer's own settlement then fails) — the Redis layer does so
 *   outside ordered mode, where fencing acks cost throughput. Nacks and
 *   dead-letters after a claim always fail. Settling after the subscription
 *   closed is allowed while the message is still pending and not delivered
 *   again.
 * - **Ordered layers fence by ownership**: where one consumer owns a
 *   partition at a time, a settlement by a consumer that no longer owns it
 *   fails with `DeliveryClosed` and changes nothing.
 * - **Nack with delay**: the message is redelivered to the group no earlier
 *   than the delay (by the broker's `Clock`), keeping its message id and
 *   attempt.
 * - **Dead-letter**: the message leaves the pending list and is appended to
 *   the topic's dead-letter queue with the reason, the last error and the
 *   delivery count. Entries that cannot even be read as an envelope
 *   (malformed) are dead-lettered by the broker itself, reported as a
 *   `Malformed` event, and the subscription continues.
 * - **Lost in broker**: pending entries deleted under the subscription (a
 *   trimmed stream) are reported as a `LostInBroker` event naming their ids;
 *   they are never acknowledged silently.
 * - **Recovery**: if the topic or group disappears (key deleted, eviction),
 *   the subscription recreates the group from the oldest retained message,
 *   with backoff (never a hot loop), and reports `GroupRecreated`.
 * - **Closing** the subscription stream (its scope) stops reading; unsettled
 *   deliveries stay pending.
 * - **Per-key order** (where the layer supports it): within a group, a message
 *   is not delivered while an earlier message with the same key is pending,
 *   including while that one is backing off after a nack.
 *
 * Delivery is at-least-once: a handler can see a message more than once.
 * Make effects idempotent with the inbox.
 *
 * @since 0.1.0
 */
import { Context, type Duration, Effect, Result, Schema, type Stream } from "effect"
import type { BrokerError } from "./BrokerError.ts"
import * as BrokerErrors from "./BrokerError.ts"
import type * as Envelope from "./Envelope.ts"
import * as Name from "./Name.ts"

/**
 * What a consumer gets from a subscription: one message and its settlement.
 * Applications do not settle by hand: the `Consumer` runtime calls these
 * from the handler's exit. A broker layer implements them.
 *
 * @since 0.1.0
 */
export interface Delivery {
  /** The broker's id of this entry (opaque; never the message id). */
  readonly entryId: string
  /** The message. */
  readonly envelope: Envelope.Encoded
  /** How many times this message was delivered to this group, this time included. */
  readonly deliveryCount: number
  readonly topic: string
  readonly group: string
  readonly consumer: string
  /** Remove the message from the pending list: it was processed. */
  readonly ack: Effect.Effect<void, BrokerError>
  /**
   * Give the message back, to be redelivered no earlier than `delay`. With
   * `attempt`, the redelivered envelope carries that attempt number (so a
   * retry schedule continues where it left off); without it, the attempt is
   * kept.
   */
  readonly nack: (delay: Duration.Input, options?: NackOptions) => Effect.Effect<void, BrokerError>
  /** Move the message to the topic's dead-letter queue. */
  readonly deadLetter: (reason: DeadLetterReason) => Effect.Effect<void, BrokerError>
}

/**
 * Options of `Delivery.nack`.
 *
 * @since 0.1.0
 */
export interface NackOptions {
  /** The attempt number the redelivered envelope carries (>= 1). */
  readonly attempt?: number | undefined
}

/**
 * Why a message was dead-lettered.
 *
 * @since 0.1.0
 */
export interface DeadLetterReason {
  /**
   * A short category: `malformed`, `decode`, `unknown-type`, `oversized`, `permanent`, `exhausted`,
   * `defect`, `too-many-deliveries`, or your own.
   */
  readonly reason: string
  /** The last error, encoded as text (JSON where it helps). */
  readonly error?: string | undefined
  /** How many handler attempts were made (default: the envelope's attempt). */
  readonly attempts?: number | undefined
}

/**
 * An entry of a topic's dead-letter queue.
 *
 * @since 0.1.0
 */
export interface DeadLetter {
  /** Id of the dead-letter entry itself. */
  readonly id: string
  readonly topic: string
  /** The group whose consumer dead-lettered it (empty when the broker did, before any group). */
  readonly group: string
  /** The broker entry id the message had in its topic. */
  readonly originalEntryId: string
  readonly reason: string
  readonly error: string | undefined
  /** Handler attempts made before it was dead-lettered. */
  readonly attempts: number
  readonly deliveryCount: number
  /** When it was dead-lettered, RFC 3339. */
  readonly time: string
  /** The stored fields as they were (kept even when they cannot be read). */
  readonly fields: Envelope.Fields
  /** The message, when the fields could be read as an envelope. */
  readonly envelope: Envelope.Encoded | undefined
}

/**
 * Options of `Broker.deadLetters`: a page of a topic's dead-letter queue.
 *
 * @since 0.1.0
 */
export interface DeadLettersOptions {
  /** At most this many entries. */
  readonly limit?: number | undefined
  /** Start at this entry id (inclusive). */
  readonly from?: string | undefined
  /** Start after this entry id (exclusive): the last id of the previous page. */
  readonly after?: string | undefined
}

/**
 * Something a subscription noticed that is not a delivery.
 *
 * @since 0.1.0
 */
export type SubscriptionEvent =
  | {
      readonly _tag: "LostInBroker"
      readonly topic: string
      readonly group: string
      readonly entryIds: ReadonlyArray<string>
    }
  | { readonly _tag: "GroupRecreated"; readonly topic: string; readonly group: string }
  | { readonly _tag: "Malformed"; readonly topic: string; readonly entryId: string; readonly reason: string }

/**
 * Options of `subscribe`.
 *
 * @since 0.1.0
 */
export interface SubscribeOptions {
  readonly topic: string
  readonly group: string
  /** This consumer's name within the group; keep it stable across restarts to get its pending messages back. */
  readonly consumer: string
  /** Most deliveries read at once (default 100). */
  readonly batchSize?: number | undefined
  /** Claim another consumer's pending message after it was idle this long (default 30 seconds). */
  readonly claimIdle?: Duration.Input | undefined
  /** Called for lost entries, recreated groups and malformed entries (default: a warning log). */
  readonly onEvent?: ((event: SubscriptionEvent) => Effect.Effect<void>) | undefined
}

/**
 * The broker contract. See the module documentation for the semantics.
 *
 * @since 0.1.0
 */
export class Broker extends Context.Service<
  Broker,
  {
    /** Appends messages to their topics (each envelope names its topic); returns the entry ids, in order. */
    readonly publish: (messages: ReadonlyArray<Envelope.Encoded>) => Effect.Effect<ReadonlyArray<string>, BrokerError>
    /**
     * Appends messages and reports each one's outcome, in order (see {@link PublishOutcome}): a message the
     * broker refuses for good fails alone, the others are stored; after a retryable failure, the later
     * messages of the same partition are not attempted (they fail, retryable), so per-key order holds. It
     * fails as a whole only when nothing is known of the batch (then some of it may have been stored). The
     * outbox relay publishes this way, so one refused row never holds back, or duplicates, the rest of its
     * batch. {@link publishEachBySplitting} derives it from `publish` for a broker that cannot tell.
     */
    readonly publishEach: (
      messages: ReadonlyArray<Envelope.Encoded>
    ) => Effect.Effect<ReadonlyArray<PublishOutcome>, BrokerError>
    /**
     * Subscribes a consumer of a group to a topic. The subscription is open
     * while the stream runs; deliveries arrive in batches of at most
     * `batchSize`.
     */
    readonly subscribe: (options: SubscribeOptions) => Stream.Stream<Delivery, BrokerError>
    /**
     * Acknowledges several deliveries in one broker round trip (XACK with
     * many ids, a batch commit). Deliveries that can no longer be settled
     * (already settled, redelivered, claimed, lost) are skipped, never
     * confused with another entry; returns how many were acknowledged.
     */
    readonly ackAll: (deliveries: ReadonlyArray<Delivery>) => Effect.Effect<number, BrokerError>
    /**
     * Reads a topic's dead-letter queue, oldest first: at most `limit` entries (all when omitted), starting
     * at the entry `from` (inclusive) or after the entry `after` (exclusive), so a large queue is read page
     * by page and one entry is found without reading the others.
     */
    readonly deadLetters: (
      topic: string,
      options?: DeadLettersOptions
    ) => Effect.Effect<ReadonlyArray<DeadLetter>, BrokerError>
    /** Deletes dead-letter entries by id (all of the topic's when `ids` is omitted); returns how many. */
    readonly purgeDeadLetters: (
      topic: string,
      ids?: ReadonlyArray<string> | undefined
    ) => Effect.Effect<number, BrokerError>
    /**
     * Optional: how far a group is behind on a topic — `pending` (delivered, not settled) and `lag` (not
     * yet delivered, delayed retries included). Read by `Metrics.sampleGroups`; a broker that cannot tell
     * leaves it out.
     */
    readonly groupStats?: ((topic: string, group: string) => Effect.Effect<GroupStats, BrokerError>) | undefined
    /**
     * Optional: the topics the broker holds, each with its consumer groups and the size of its dead-letter
     * queue, by name. What operator tools (`converge status`, the dashboard) list; a broker that cannot
     * tell leaves it out, and the tools then ask for topic names.
     */
    readonly topics?: Effect.Effect<ReadonlyArray<TopicInfo>, BrokerError> | undefined
  }
>()("@converge/core/Broker") {}

/**
 * A topic as the broker holds it (see `Broker.topics`).
 *
 * @since 0.1.0
 */
export interface TopicInfo {
  readonly name: string
  /** Its consumer groups, by name. */
  readonly groups: ReadonlyArray<string>
  /** Entries in its dead-letter queue. */
  readonly deadLetters: number
}

/**
 * A group's position on a topic (see `Broker.groupStats`).
 *
 * @since 0.1.0
 */
export interface GroupStats {
  /** Delivered to a consumer of the group and not settled yet. */
  readonly pending: number
  /** Not delivered to the group yet (delayed retries included). */
  readonly lag: number
}

/**
 * The outcome of one message of `publishEach`: stored (at the broker's confirmation level), or failed with
 * an error that says whether trying it again may succeed.
 *
 * @since 0.1.0
 */
export type PublishOutcome =
  | { readonly _tag: "Stored"; readonly entryId: string }
  | { readonly _tag: "Failed"; readonly error: BrokerError }

/**
 * `publishEach` for a broker whose `publish` cannot say which messages of a failed batch were stored: the
 * batch is published whole, and when that fails for good, one message at a time (a retryable failure of
 * the batch fails every message, retryable). Messages stored before a batch failed may be stored twice;
 * consumers dedupe by message id. A broker that knows per message does better (the Redis layer does).
 *
 * @since 0.1.0
 */
export const publishEachBySplitting =
  (publish: Broker["Service"]["publish"]) =>
  (messages: ReadonlyArray<Envelope.Encoded>): Effect.Effect<ReadonlyArray<PublishOutcome>, BrokerError> =>
    Effect.matchEffect(publish(messages), {
      onSuccess: (ids) => Effect.succeed(ids.map((entryId): PublishOutcome => ({ _tag: "Stored", entryId }))),
      onFailure: (error) =>
        error.isRetryable || messages.length === 1
          ? Effect.succeed(messages.map((): PublishOutcome => ({ _tag: "Failed", error })))
          : Effect.forEach(messages, (m) =>
              Effect.match(publish([m]), {
                onSuccess: (ids): PublishOutcome => ({ _tag: "Stored", entryId: ids[0]! }),
                onFailure: (error): PublishOutcome => ({ _tag: "Failed", error })
              })
            )
    })

// --- helpers for broker layers ----------------------------------------------------------------------------

const invalid = (argument: string, message: string) =>
  Effect.fail(BrokerErrors.make(new BrokerErrors.InvalidArgument({ argument, message })))

/**
 * For broker layers: fails with `InvalidArgument` naming `kind` when `value` is not a valid name of that kind
 * (the check every layer makes at its boundary: publish, subscribe, the dead-letter queue).
 *
 * @since 0.1.0
 */
export const checkName = (kind: Name.NameKind, value: string): Effect.Effect<void, BrokerError> => {
  const ok = Name.check(kind, value)
  return Result.isFailure(ok) ? invalid(kind, ok.failure.message) : Effect.void
}

/**
 * For broker layers: an option that must be an integer from `min` to `max`, or `InvalidArgument` naming it.
 *
 * @since 0.1.0
 */
export const checkInteger = (
  argument: string,
  value: number,
  min: number,
  max: number
): Effect.Effect<number, BrokerError> =>
  Number.isInteger(value) && value >= min && value <= max
    ? Effect.succeed(value)
    : invalid(argument, `${argument} must be an integer from ${min} to ${max}, got ${value}`)

/**
 * For broker layers: the names of a subscription (topic, group, consumer) and its `batchSize` (at most
 * `maxBatch`), checked; the first bad one fails with `InvalidArgument` naming it.
 *
 * @since 0.1.0
 */
export const checkSubscribe = (options: SubscribeOptions, maxBatch: number): Effect.Effect<void, BrokerError> =>
  Effect.gen(function* () {
    yield* checkName("topic", options.topic)
    yield* checkName("group", options.group)
    yield* checkName("consumer", options.consumer)
    if (options.batchSize !== undefined) yield* checkInteger("batchSize", options.batchSize, 1, maxBatch)
  })

/**
 * For broker layers: the envelope of a delivery made for a malformed entry, which is never handled (the layer
 * dead-letters it at once, with the entry's own fields).
 *
 * @since 0.1.0
 */
export const malformedEnvelope: Envelope.Encoded = {
  id: "malformed",
  topic: "malformed",
  type: "malformed",
  source: "malformed",
  key: undefined,
  time: "1970-01-01T00:00:00.000Z",
  attempt: 1,
  headers: {},
  data: "null"
}

/**
 * Default `onEvent`: logs the event as a warning.
 *
 * @since 0.1.0
 */
export const logEvent = (event: SubscriptionEvent): Effect.Effect<void> =>
  Effect.logWarning(`broker: ${event._tag}`).pipe(Effect.annotateLogs({ event: JSON.stringify(event) }))

/**
 * Schema of a dead-letter reason, for stores that persist it.
 *
 * @since 0.1.0
 */
export const DeadLetterReasonSchema = Schema.Struct({
  reason: Schema.String,
  error: Schema.optional(Schema.String),
  attempts: Schema.optional(Schema.Int)
})
