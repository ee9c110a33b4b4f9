/**
 * `BrokerError` — the one error every `Broker` operation fails with.
 *
 * A broker can fail for many causes; callers should not have to know a list of
 * names to decide whether to retry. The error carries a `reason` (a tagged
 * union), and every reason declares `isRetryable`, exactly like `SqlError` in
 * `effect/sql`. A retry policy asks `error.isRetryable`.
 *
 * @since 0.1.0
 */
import { Predicate, Schema } from "effect"

const ReasonTypeId = "~@converge/core/BrokerError/Reason" as const

const ReasonFields = {
  message: Schema.String,
  cause: Schema.optional(Schema.Defect())
}

/**
 * The broker could not be reached, or the connection dropped mid-operation.
 * Retryable: the same call may succeed once the connection is back.
 *
 * @since 0.1.0
 */
export class ConnectionLost extends Schema.TaggedError<ConnectionLost>("@converge/core/BrokerError/ConnectionLost")(
  "ConnectionLost",
  ReasonFields
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** Always `true`: a lost connection is transient. */
  get isRetryable(): boolean {
    return true
  }
}

/**
 * The broker answered but refused or failed the command. `retryable` says
 * whether the same command may succeed later: `true` for load or failover
 * states (out of memory, loading, a read-only replica during a failover),
 * `false` for a refusal that will recur (a script error, a wrong key type, a
 * missing permission, an entry the broker cannot store, a command the server
 * does not have). A refusal is not retried forever: the outbox relay moves a
 * refused row aside with its reason.
 *
 * @since 0.1.0
 */
export class CommandFailed extends Schema.TaggedError<CommandFailed>("@converge/core/BrokerError/CommandFailed")(
  "CommandFailed",
  { ...ReasonFields, command: Schema.String, retryable: Schema.Boolean }
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** The broker's own verdict (`retryable`). */
  get isRetryable(): boolean {
    return this.retryable
  }
}

/**
 * The broker did not confirm a write at the requested durability level in
 * time (for example `WAITAOF` reached fewer replicas than asked). The write may
 * or may not have happened: the caller must publish again (consumers dedupe
 * by message id).
 *
 * @since 0.1.0
 */
export class NotConfirmed extends Schema.TaggedError<NotConfirmed>("@converge/core/BrokerError/NotConfirmed")(
  "NotConfirmed",
  ReasonFields
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** Always `true`. */
  get isRetryable(): boolean {
    return true
  }
}

/**
 * A name (topic, group, consumer) or an argument was rejected before anything
 * was sent. Never retryable: the same call fails the same way.
 *
 * @since 0.1.0
 */
export class InvalidArgument extends Schema.TaggedError<InvalidArgument>("@converge/core/BrokerError/InvalidArgument")(
  "InvalidArgument",
  { ...ReasonFields, argument: Schema.String }
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** Always `false`. */
  get isRetryable(): boolean {
    return false
  }
}

/**
 * The delivery was already settled (acked, nacked or dead-lettered), or its
 * subscription is closed. Settling it again does nothing; in particular it
 * never acknowledges another entry. Not retryable.
 *
 * @since 0.1.0
 */
export class DeliveryClosed extends Schema.TaggedError<DeliveryClosed>("@converge/core/BrokerError/DeliveryClosed")(
  "DeliveryClosed",
  { ...ReasonFields, entryId: Schema.String }
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** Always `false`. */
  get isRetryable(): boolean {
    return false
  }
}

/**
 * The broker layer was shut down while the operation was in progress.
 * Not retryable on this instance.
 *
 * @since 0.1.0
 */
export class BrokerClosed extends Schema.TaggedError<BrokerClosed>("@converge/core/BrokerError/BrokerClosed")(
  "BrokerClosed",
  ReasonFields
) {
  /** @internal */
  readonly [ReasonTypeId] = ReasonTypeId
  /** Always `false`. */
  get isRetryable(): boolean {
    return false
  }
}

/**
 * Every cause a `BrokerError` can have.
 *
 * @since 0.1.0
 */
export const BrokerErrorReason = Schema.Union([
  ConnectionLost,
  CommandFailed,
  NotConfirmed,
  InvalidArgument,
  DeliveryClosed,
  BrokerClosed
])

/**
 * The type of {@link BrokerErrorReason}.
 *
 * @since 0.1.0
 */
export type BrokerErrorReason = typeof BrokerErrorReason.Type

/**
 * True for any reason instance (useful when a reason is caught on its own).
 *
 * @since 0.1.0
 */
export const isBrokerErrorReason = (u: unknown): u is BrokerErrorReason => Predicate.hasProperty(u, ReasonTypeId)

const TypeId = "~@converge/core/BrokerError" as const

/**
 * The error of every `Broker` operation. Inspect `reason._tag` for the cause,
 * or `isRetryable` to decide whether to try again.
 *
 * @example
 * ```ts
 * publish.pipe(Effect.retry({ while: (e) => e.isRetryable, schedule: Schedule.exponential("50 millis") }))
 * ```
 *
 * @since 0.1.0
 */
export class BrokerError extends Schema.TaggedError<BrokerError>("@converge/core/BrokerError")("BrokerError", {
  reason: BrokerErrorReason
}) {
  /** @internal */
  readonly [TypeId] = TypeId

  /** The reason is the cause. */
  override readonly cause = this.reason

  /** The reason's message, prefixed with its tag. */
  override get message(): string {
    return `${this.reason._tag}: ${this.reason.message}`
  }

  /** Whether trying the same operation again may succeed. */
  get isRetryable(): boolean {
    return this.reason.isRetryable
  }
}

/**
 * True when `u` is a {@link BrokerError}.
 *
 * @since 0.1.0
 */
export const isBrokerError = (u: unknown): u is BrokerError => Predicate.hasProperty(u, TypeId)

/**
 * Shorthand: a `BrokerError` with the given reason.
 *
 * @since 0.1.0
 */
export const make = (reason: BrokerErrorReason): BrokerError => new BrokerError({ reason })
