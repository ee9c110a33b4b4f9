/**
 * `Consumer` — the consumer runtime: typed handlers on a consumer group, error
 * classification checked by the compiler, retries in two tiers, per-key order,
 * dead-lettering and graceful shutdown.
 *
 * ```ts
 * const billing = Consumer.layer(orders, {
 *   group: "billing",
 *   handle: (order, ctx) => charge(order), // Effect<void, PaymentDeclined | GatewayTimeout, Payments>
 *   errors: { PaymentDeclined: "dead-letter", GatewayTimeout: "retry" },
 *   retry: Schedule.exponential("200 millis").pipe(Schedule.jittered, Schedule.upTo({ times: 8 })),
 *   concurrency: 8,
 *   ordering: "per-key"
 * })
 * ```
 *
 * ## Handlers
 *
 * A handler receives the decoded, typed payload and a {@link MessageContext}
 * (message id, key, headers, attempt, delivery count). Its error channel must
 * be tagged errors (`Schema.TaggedError`, `Data.TaggedError`): each tag is
 * mapped to a `Retry.Outcome` in `errors`, and **a mapping that misses a tag
 * does not compile**. Errors that carry `isRetryable` (like `SqlError` and
 * `BrokerError`) may be left out: they are retried when `isRetryable` is true
 * and dead-lettered otherwise. Defects (thrown exceptions, `Effect.die`) are
 * retried by the same schedule, then dead-lettered with reason `defect`.
 *
 * Some messages never reach the handler; they are dead-lettered at once:
 * a type the consumer does not handle (`unknown-type`; see `types`), a
 * payload over the topic's `maxBytes` (`oversized`), both left unparsed,
 * and a payload its Schema refuses (`decode`).
 *
 * ## At-least-once
 *
 * A message is acknowledged only after its handler succeeded. A crash between
 * the handler's effect and the ack means the message is delivered again, so a
 * handler can run more than once for one message: make its effect idempotent
 * (the inbox records the message id in the same transaction as the handler's
 * writes). Replays from the dead-letter queue are such redeliveries too.
 *
 * ## Retries in two tiers
 *
 * A retryable failure steps the `retry` schedule. A short delay (at most
 * `inProcessDelayLimit`, and while fewer than `maxInProcessAttempts` attempts
 * were made in this delivery) is waited in process; a longer one, or any
 * delay once the in-process attempts are used up, becomes a delayed
 * redelivery through the broker (nack with delay), so a long backoff never
 * holds a consumer slot. The attempt number travels with the message, so the
 * schedule continues where it left off after a redelivery or a restart. When
 * the schedule ends, the message is dead-lettered with reason `exhausted` and
 * the last error.
 *
 * ## Order
 *
 * `ordering: "per-key"` handles the messages of one key one at a time, in
 * delivery order, and keeps a key whose head message is backing off in
 * process parked. Across delayed redeliveries the order is kept by the broker:
 * use a broker layer that orders per key (the memory broker with
 * `orderedPerKey: true`, partitioned Redis streams). Without it, up to
 * `concurrency` handlers run in parallel.
 *
 * ## Shutdown
 *
 * Closing the consumer's scope stops taking new deliveries, lets in-flight
 * handlers finish for up to `shutdownTimeout`, then interrupts them; an
 * interrupted handler's message stays pending (never acked) and is delivered
 * again later. The consumer reads nothing ahead of its handlers (a broker
 * may: the Redis broker keeps its next read on the wire, and what that read
 * got stays pending under this consumer's name after a shutdown, read first
 * when the name subscribes again, claimed by others after `claimIdle`
 * otherwise; on the memory broker nothing is left). A subscription that fails for a retryable reason is opened
 * again with backoff (100 ms doubling, at most 5 s); a permanent failure
 * (an invalid name, a closed broker) stops the consumer with an error log.
 *
 * @since 0.1.0
 */
import {
  Cause,
  Clock,
  DateTime,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  Layer,
  type Metric,
  Option,
  Result,
  type Schedule,
  Schema,
  type Scope,
  Stream,
  type Tracer
} from "effect"
import * as Audit from "./Audit.ts"
import * as Broker from "./Broker.ts"
import * as Confirmation from "./Confirmation.ts"
import * as Envelope from "./Envelope.ts"
import * as Metrics from "./Metrics.ts"
import * as Name from "./Name.ts"
import * as Retry from "./Retry.ts"
import type * as Topic from "./Topic.ts"

/**
 * Metadata of the message being handled.
 *
 * @since 0.1.0
 */
export interface MessageContext {
  /** The message id (UUIDv7): the identity for dedupe (inbox), audit and the dead-letter queue. */
  readonly id: string
  readonly topic: string
  readonly group: string
  readonly consumer: string
  readonly type: string
  readonly source: string
  readonly key: string | undefined
  readonly headers: Readonly<Record<string, string>>
  /** The attempt this handler call is (1 on the first), across redeliveries. */
  readonly attempt: number
  /** How many times the broker delivered this message to the group, this time included. */
  readonly deliveryCount: number
  /** The broker's id of the entry. */
  readonly entryId: string
  /** When the message was published (CloudEvents `time`). */
  readonly time: DateTime.Utc
  /** The message as the broker delivered it. */
  readonly encoded: Envelope.Encoded
}

/** The handler's context: a view over the delivery; `time` is computed on first use. */
class Context implements MessageContext {
  /** Set by `Audit.markHandled` when a store wrote the `handled` event in the handler's transaction. */
  [Audit.handledKey] = false
  readonly delivery: Broker.Delivery
  readonly names: { readonly group: string; readonly consumer: string }
  readonly attempt: number
  constructor(
    delivery: Broker.Delivery,
    names: { readonly group: string; readonly consumer: string },
    attempt: number
  ) {
    this.delivery = delivery
    this.names = names
    this.attempt = attempt
  }
  get encoded(): Envelope.Encoded {
    return this.delivery.envelope
  }
  get group(): string {
    return this.names.group
  }
  get consumer(): string {
    return this.names.consumer
  }
  get deliveryCount(): number {
    return this.delivery.deliveryCount
  }
  get entryId(): string {
    return this.delivery.entryId
  }
  get id(): string {
    return this.delivery.envelope.id
  }
  get topic(): string {
    return this.delivery.envelope.topic
  }
  get type(): string {
    return this.delivery.envelope.type
  }
  get source(): string {
    return this.delivery.envelope.source
  }
  get key(): string | undefined {
    return this.delivery.envelope.key
  }
  get headers(): Readonly<Record<string, string>> {
    return this.delivery.envelope.headers
  }
  get time(): DateTime.Utc {
    return DateTime.makeUnsafe(Date.parse(this.delivery.envelope.time))
  }
}

/**
 * One message of a read passed to `handleBatch`.
 *
 * @since 0.1.0
 */
export interface BatchItem<A> {
  readonly message: A
  readonly context: MessageContext
}

/**
 * Options common to every consumer.
 *
 * @since 0.1.0
 */
export interface BaseOptions<A, E, R> {
  /** The consumer group. Every group receives every message; consumers of a group share them. */
  readonly group: string
  /**
   * This consumer's name within the group (default: `<host>-<pid>`). Keep it
   * stable across restarts to get this consumer's pending messages back at
   * once; otherwise another consumer claims them after `claimIdle`.
   */
  readonly consumer?: string | undefined
  /** The handler. It must be idempotent (at-least-once delivery); see the module docs. */
  readonly handle: (message: A, context: MessageContext) => Effect.Effect<void, E, R>
  /**
   * Optional fast path: handles every decodable message of one read at once
   * (one SQL transaction for the whole read, say — see `Inbox.handlers`).
   * When it succeeds, the read is acked with one `ackAll`; when it fails (or
   * dies), nothing of it counts and the read falls back to `handle`, one
   * message at a time, with the usual classification, retries and
   * dead-lettering. Messages refused before decoding (unknown type,
   * oversized), undecodable ones, and messages delivered more than
   * `maxDeliveries` times, are settled first and never reach it. Messages
   * come in read order, so per-key order holds within the call.
   */
  readonly handleBatch?: ((messages: ReadonlyArray<BatchItem<A>>) => Effect.Effect<void, E, R>) | undefined
  /**
   * The retry schedule for retryable failures (input: the error), e.g.
   * `Schedule.exponential("100 millis").pipe(Schedule.jittered, Schedule.upTo({ times: 5 }))`.
   * Default: exponential from 100 ms, doubling, capped at 30 s per delay, 10 retries.
   */
  readonly retry?: Schedule.Schedule<unknown, NoInfer<Retry.RetryInput<E>>> | undefined
  /**
   * How many messages are handled at once (default 1). With `per-key`, how
   * many keys. With `handleBatch` (and no per-key order), how many reads.
   */
  readonly concurrency?: number | undefined
  /** `"per-key"`: one message of a key at a time, in order (default `"none"`). */
  readonly ordering?: "per-key" | "none" | undefined
  /** Retry delays up to this long are waited in process (default 1 second); longer ones go through the broker. */
  readonly inProcessDelayLimit?: Duration.Input | undefined
  /** In-process attempts per delivery before the next retry goes through the broker (default 3). */
  readonly maxInProcessAttempts?: number | undefined
  /**
   * A message delivered this many times without being settled (its handler
   * keeps crashing the process) is dead-lettered with reason
   * `too-many-deliveries` (default 25).
   */
  readonly maxDeliveries?: number | undefined
  /** How long in-flight handlers may run after the scope closes (default 30 seconds). */
  readonly shutdownTimeout?: Duration.Input | undefined
  /** Deliveries read at once (default 100). */
  readonly batchSize?: number | undefined
  /** Claim messages of crashed consumers after they were idle this long (default 30 seconds). */
  readonly claimIdle?: Duration.Input | undefined
  /** Broker events (lost entries, recreated groups, malformed entries); default: a warning log. */
  readonly onEvent?: ((event: Broker.SubscriptionEvent) => Effect.Effect<void>) | undefined
  /**
   * CloudEvents types this consumer handles besides the topic's own `type`
   * (default: none). A message of any other type is dead-lettered with
   * reason `unknown-type` and the handler never sees it: another producer's
   * messages, or a new version of the payload, are not decoded with a Schema
   * that was not written for them. List the older or newer types the Schema
   * also reads to accept them. (Define a topic once and share it between
   * publisher and consumers: a consumer whose topic names another type
   * dead-letters every message, each with this reason.)
   */
  readonly types?: ReadonlyArray<string> | undefined
  /**
   * Send a typed confirmation (see `Confirmation`) to the `replyto` topic of every message that names one:
   * `processed` once the handler succeeded (published before the ack: a message whose confirmation could
   * not be published is not acknowledged, and comes back), `dead-lettered` with the reason and the error
   * once it went to the dead-letter queue. An error classified `"ignore"` confirms as `processed` (the
   * message was acknowledged). Default `false`.
   */
  readonly confirm?: boolean | undefined
}

/**
 * The consumer's options: `errors` is required as soon as the handler can
 * fail with a tag that does not classify itself.
 *
 * @since 0.1.0
 */
export type Options<A, E, R> = BaseOptions<A, E, R> &
  ([Retry.RequiredTags<E>] extends [never]
    ? { readonly errors?: NoInfer<Retry.Classification<E>> | undefined }
    : { readonly errors: NoInfer<Retry.Classification<E>> })

/** At most 1 000 characters of `text`, for a log line. */
const truncate = (text: string): string =>
  text.length <= 1000 ? text : `${text.slice(0, 1000)}… (${text.length} chars)`

/** Backoff between subscription attempts after a retryable failure: 100 ms doubling, at most 5 s. */
const resubscribeBackoff = Retry.exponential("100 millis", "5 seconds")

let consumersMade = 0

/**
 * `<host>-<pid>-<n>`: unique per consumer of a process (two consumers of one group in one process must not
 * share a name: they would read each other's pending entries as their own), and per process on a host.
 */
const defaultConsumerName = (): string => {
  const host = (globalThis.process?.env?.HOSTNAME ?? "host").replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 120)
  return `${host}-${globalThis.process?.pid ?? 0}-${++consumersMade}`.replace(/^[^A-Za-z0-9]+/, "")
}

/**
 * An option of `Consumer.make` that cannot work (`concurrency: NaN`, a negative duration, ...), refused when
 * the consumer is made instead of handling nothing and saying nothing.
 *
 * @since 0.1.0
 */
export class InvalidOption extends Schema.TaggedError<InvalidOption>("@converge/core/Consumer/InvalidOption")(
  "InvalidOption",
  { option: Schema.String, message: Schema.String }
) {}

/** An integer option in `[min, max]` (its default when absent), or `InvalidOption`. */
const integerOption = (option: string, value: number | undefined, fallback: number, min: number, max: number) =>
  value === undefined
    ? Effect.succeed(fallback)
    : Number.isInteger(value) && value >= min && value <= max
      ? Effect.succeed(value)
      : Effect.fail(
          new InvalidOption({ option, message: `${option} must be an integer from ${min} to ${max}, got ${value}` })
        )

/** A duration option, finite and not negative (its default when absent), in milliseconds, or `InvalidOption`. */
const durationOption = (option: string, value: Duration.Input | undefined, fallback: Duration.Input) => {
  // Duration reads a NaN number as zero: refuse it here
  const d = typeof value === "number" && Number.isNaN(value) ? Option.none() : Duration.fromInput(value ?? fallback)
  const ms = Option.isSome(d) ? Duration.toMillis(d.value) : Number.NaN
  return Number.isFinite(ms) && ms >= 0
    ? Effect.succeed(ms)
    : Effect.fail(
        new InvalidOption({
          option,
          message: `${option} must be a finite duration of 0 or more, got ${JSON.stringify(String(value))}`
        })
      )
}

/** Per-key FIFO locks: one holder per key, waiters served in arrival order. */
class KeyLocks {
  readonly queues = new Map<string, Array<() => void>>()
  acquire(key: string): Effect.Effect<void> {
    return Effect.callback<void>((resume) => {
      const queue = this.queues.get(key)
      if (queue === undefined) {
        this.queues.set(key, [])
        resume(Effect.void)
        return
      }
      const go = () => resume(Effect.void)
      queue.push(go)
      return Effect.sync(() => {
        const at = queue.indexOf(go)
        if (at >= 0) queue.splice(at, 1)
      })
    })
  }
  release(key: string): void {
    const queue = this.queues.get(key)
    if (queue === undefined) return
    const next = queue.shift()
    if (next === undefined) this.queues.delete(key)
    else next()
  }
  withLock<A, E, R>(key: string | undefined, effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> {
    if (key === undefined) return effect
    return Effect.acquireUseRelease(
      this.acquire(key),
      () => effect,
      () => Effect.sync(() => this.release(key))
    )
  }
}

/**
 * Runs a consumer in the current scope: subscribes, handles messages in the
 * background until the scope closes (then shuts down gracefully). Fails at
 * once with `InvalidName` for an invalid group or consumer name.
 *
 * @since 0.1.0
 */
export const make = <A, I, E extends Retry.Tagged = never, R = never>(
  topic: Topic.Topic<A, I>,
  options: Options<A, E, R>
): Effect.Effect<void, Name.InvalidName | InvalidOption, Broker.Broker | R | Scope.Scope> =>
  Effect.gen(function* () {
    const group = yield* Name.validate("group", options.group)
    const consumer = yield* Name.validate("consumer", options.consumer ?? defaultConsumerName())
    const broker = yield* Broker.Broker
    const policy: Retry.Policy<E> = {
      errors: (options.errors ?? {}) as Retry.Classification<E>,
      retry: options.retry ?? Retry.defaultSchedule
    }
    const concurrency = yield* integerOption("concurrency", options.concurrency, 1, 1, 10_000)
    yield* integerOption("batchSize", options.batchSize, 100, 1, 100_000)
    yield* durationOption("claimIdle", options.claimIdle, "30 seconds")
    const perKey = options.ordering === "per-key"
    const inProcessLimit = yield* durationOption("inProcessDelayLimit", options.inProcessDelayLimit, "1 second")
    const maxInProcess = yield* integerOption("maxInProcessAttempts", options.maxInProcessAttempts, 3, 1, 1000)
    const maxDeliveries = yield* integerOption("maxDeliveries", options.maxDeliveries, 25, 1, 1_000_000)
    const shutdownTimeout = Duration.millis(
      yield* durationOption("shutdownTimeout", options.shutdownTimeout, "30 seconds")
    )
    const locks = new KeyLocks()
    const names = { group, consumer }
    const types = new Set([topic.type, ...(options.types ?? [])])
    const typeList = [...types].map((t) => JSON.stringify(t)).join(", ")

    /**
     * Decodes a delivery's payload, or says why it must be dead-lettered without reaching the handler:
     * a type this consumer does not handle, a payload over the topic's size limit, one its Schema refuses.
     */
    const decodeOrRefuse = (
      delivery: Broker.Delivery
    ): Result.Result<A, { readonly reason: "unknown-type" | "oversized" | "decode"; readonly error: string }> => {
      const type = delivery.envelope.type
      if (type !== topic.type && !types.has(type)) {
        return Result.fail({
          reason: "unknown-type",
          error: `type ${JSON.stringify(type)} is not one this consumer of topic ${JSON.stringify(topic.name)} handles: ${typeList} (the Consumer option types adds others)`
        })
      }
      const decoded = topic.decode(delivery.envelope.data)
      // a success carries no error: the same object serves (no allocation per message)
      if (Result.isSuccess(decoded)) return decoded as Result.Result<A, never>
      return Result.fail({
        reason: decoded.failure._tag === "PayloadTooLarge" ? "oversized" : "decode",
        error: decoded.failure.message
      })
    }

    const confirm = options.confirm === true
    // metrics, their attributes fixed once
    const labels = { topic: topic.name, group }
    const mDelivered = Metrics.tagged(Metrics.delivered)(labels)
    const mHandled = Metrics.tagged(Metrics.handled)(labels)
    const mRetried = Metrics.tagged(Metrics.retried)(labels)
    const mDuration = Metrics.tagged(Metrics.handlerDuration)(labels)
    const mLatency = Metrics.tagged(Metrics.publishToHandle)(labels)
    const mDeadLettered = Metrics.tagged(Metrics.deadLettered)
    const mLost = Metrics.tagged(Metrics.lostInBroker)(labels)
    /** Entries the broker lost while pending (a trim): their ids are broker entry ids, the messages are gone. */
    const lostInBroker = (event: Extract<Broker.SubscriptionEvent, { readonly _tag: "LostInBroker" }>) =>
      Effect.andThen(
        Effect.sync(() => count(mLost, event.entryIds.length)),
        !auditing
          ? Effect.void
          : Effect.flatMap(Audit.currentTime, (at) =>
              audit.enqueue(
                event.entryIds.map((entryId) => ({
                  kind: "lost-in-broker" as const,
                  messageId: entryId,
                  topic: topic.name,
                  group,
                  at,
                  process: Audit.processName,
                  detail: "broker entry id (the message was deleted from the broker while pending)"
                }))
              )
            )
      )
    /** Runs `effect` in a span of the message's trace (when it carries one): a retry, a dead-letter. */
    const messageSpan = <X, Y, Z>(
      envelope: Envelope.Encoded,
      name: string,
      attributes: Record<string, unknown>,
      effect: Effect.Effect<X, Y, Z>
    ): Effect.Effect<X, Y, Z> => {
      if (envelope.headers.traceparent === undefined) return effect
      const parent = Envelope.traceParentOf(envelope.headers)
      return Option.isNone(parent)
        ? effect
        : Effect.withSpan(effect, `${name} ${topic.name}`, {
            parent: parent.value,
            kind: "consumer",
            attributes: {
              "messaging.system": "converge",
              "messaging.destination.name": topic.name,
              "messaging.consumer.group.name": group,
              "messaging.message.id": envelope.id,
              ...attributes
            }
          })
    }
    // metrics are updated synchronously (no effect per message): the clock and the registry's context,
    // read once
    const clock = yield* Clock.Clock
    const metricsContext = yield* Effect.context<never>()
    const count = (metric: Metric.Metric<number, unknown>, n: number): void => {
      if (n > 0) metric.updateUnsafe(n, metricsContext)
    }
    /** A handleBatch call's time, spread over its messages. */
    const observeBatch = (n: number, startNanos: bigint): void => {
      const each = Number(clock.currentTimeNanosUnsafe() - startNanos) / 1e9 / Math.max(1, n)
      for (let i = 0; i < n; i++) mDuration.updateUnsafe(each, metricsContext)
    }
    // handler durations of single messages are sampled, one in 16: timing every call cost the consumer
    // benchmark 40% of its throughput (a clock read before and after, an effect around each handler)
    let calls = 0
    // publish-to-handle latency at the ack, sampled one in 16 too; messages published together share their
    // time text, so it is parsed once per run of equal texts
    let acked = 0
    let lastTime = ""
    let lastMillis = Number.NaN
    const observeLatency = (deliveries: ReadonlyArray<Broker.Delivery>): void => {
      const now = clock.currentTimeMillisUnsafe()
      for (const d of deliveries) {
        if ((++acked & 15) !== 0) continue
        const time = d.envelope.time
        if (time !== lastTime) {
          lastTime = time
          lastMillis = Date.parse(time)
        }
        if (!Number.isNaN(lastMillis)) mLatency.updateUnsafe(Math.max(0, (now - lastMillis) / 1000), metricsContext)
      }
    }
    // the audit sink, read once: off (the default) costs a boolean check per read
    const audit = yield* Audit.AuditSink
    const auditing = audit.enabled
    const audited = (
      kind: Audit.Kind,
      deliveries: ReadonlyArray<Broker.Delivery>,
      extra: (d: Broker.Delivery) => Partial<Audit.Event>
    ): Effect.Effect<void> =>
      Effect.suspend(() => {
        if (!auditing) return Effect.void
        const chosen = deliveries.filter((d) => audit.records(d.envelope.topic, d.envelope.id))
        if (chosen.length === 0) return Effect.void
        return Effect.flatMap(Audit.currentTime, (at) =>
          audit.enqueue(chosen.map((d) => Audit.eventOf(kind, d.envelope, at, { group, ...extra(d) })))
        )
      })

    /**
     * Publishes the confirmations of deliveries that name a `replyto` (one `publishEach`); returns those
     * whose confirmation could not be published (logged). A `replyto` that is not a valid topic name can
     * never be confirmed: logged, and not counted as failed.
     */
    const confirmAll = (
      deliveries: ReadonlyArray<Broker.Delivery>,
      confirmationOf: (d: Broker.Delivery) => Confirmation.Confirmation
    ): Effect.Effect<ReadonlySet<Broker.Delivery>> =>
      Effect.gen(function* () {
        const now = yield* Effect.clockWith((c) => c.currentTimeMillis)
        const made = Confirmation.encodeFor(
          deliveries.map((delivery) => ({ delivery, confirmation: confirmationOf(delivery) })),
          now
        )
        const ready: Array<{ readonly delivery: Broker.Delivery; readonly encoded: Envelope.Encoded }> = []
        for (const m of made) {
          if (Result.isSuccess(m.encoded)) ready.push({ delivery: m.delivery, encoded: m.encoded.success })
          else {
            yield* Effect.logWarning("consumer: a message's replyto cannot be confirmed", m.encoded.failure).pipe(
              Effect.annotateLogs({ topic: topic.name, group, messageId: m.delivery.envelope.id })
            )
          }
        }
        const failed = new Set<Broker.Delivery>()
        if (ready.length === 0) return failed
        const outcomes = yield* broker
          .publishEach(ready.map((r) => r.encoded))
          .pipe(
            Effect.catch((error) => Effect.succeed(ready.map((): Broker.PublishOutcome => ({ _tag: "Failed", error }))))
          )
        if (auditing) {
          const sent = ready.filter((_, i) => outcomes[i]?._tag !== "Failed" && outcomes[i] !== undefined)
          yield* audited(
            "confirmed",
            sent.map((r) => r.delivery),
            (d) => ({ reason: confirmationOf(d).outcome, attempt: confirmationOf(d).attempts })
          )
        }
        for (let i = 0; i < ready.length; i++) {
          const o = outcomes[i]
          if (o === undefined || o._tag === "Failed") {
            failed.add(ready[i]!.delivery)
            yield* Effect.logWarning(
              "consumer: publishing a confirmation failed",
              o === undefined ? "no outcome" : o.error
            ).pipe(Effect.annotateLogs({ topic: topic.name, group, messageId: ready[i]!.delivery.envelope.id }))
          }
        }
        return failed
      })

    /**
     * Acknowledges a read's successes with one `ackAll`; with `confirm`, their confirmations go out first, and
     * a message whose confirmation failed is not acknowledged (it comes back, and is confirmed then).
     */
    const confirmAndAck = (deliveries: ReadonlyArray<Broker.Delivery>): Effect.Effect<void> =>
      Effect.gen(function* () {
        let toAck = deliveries
        if (confirm) {
          const failed = yield* confirmAll(deliveries, (d) => ({
            messageId: d.envelope.id,
            topic: topic.name,
            group,
            outcome: "processed",
            attempts: attempts.get(d) ?? Math.max(1, d.envelope.attempt)
          }))
          if (failed.size > 0) toAck = deliveries.filter((d) => !failed.has(d))
        }
        if (toAck.length === 0) return
        count(mHandled, toAck.length)
        observeLatency(toAck)
        if (auditing) {
          // the inbox writes `handled` in the handler's transaction; the others are written here
          const unmarked = recordedByStore.size === 0 ? toAck : toAck.filter((d) => !recordedByStore.has(d))
          for (const d of deliveries) recordedByStore.delete(d)
          yield* audited("handled", unmarked, (d) => ({ attempt: attempts.get(d) ?? Math.max(1, d.envelope.attempt) }))
        }
        yield* broker.ackAll(toAck).pipe(
          Effect.catch((e) => Effect.logWarning("consumer: acking a read failed; its messages will be redelivered", e)),
          Effect.asVoid
        )
      })

    /** The attempt a delivery's handler succeeded at (for its confirmation). */
    const attempts = new WeakMap<Broker.Delivery, number>()
    /** Successes whose `handled` event a store wrote in the handler's transaction (`Audit.markHandled`). */
    const recordedByStore = new Set<Broker.Delivery>()

    /**
     * Dead-letters a delivery and logs it (a warning annotated with topic, group and message id, so an
     * operator sees it without reading the queue). A failure to dead-letter is logged too; the message
     * then stays pending and comes back.
     */
    const deadLetter = (delivery: Broker.Delivery, reason: Broker.DeadLetterReason): Effect.Effect<void> =>
      messageSpan(
        delivery.envelope,
        "converge.dead-letter",
        { "messaging.converge.dead_letter.reason": reason.reason, "messaging.converge.attempt": reason.attempts ?? 0 },
        deadLetterIn(delivery, reason)
      )
    const deadLetterIn = (delivery: Broker.Delivery, reason: Broker.DeadLetterReason): Effect.Effect<void> =>
      Effect.uninterruptible(delivery.deadLetter(reason)).pipe(
        Effect.tap(() =>
          Effect.sync(() => count(mDeadLettered({ topic: topic.name, group, reason: reason.reason }), 1))
        ),
        Effect.andThen(
          audited("dead-lettered", [delivery], () => ({
            reason: reason.reason,
            error: reason.error,
            attempt: reason.attempts ?? delivery.envelope.attempt
          }))
        ),
        Effect.andThen(
          Effect.logWarning(
            `consumer: message dead-lettered (${reason.reason})${reason.error === undefined ? "" : `: ${truncate(reason.error)}`}`
          )
        ),
        // the publisher learns of it (after the dead-letter: a failure there is logged, never repeated)
        Effect.andThen(
          confirm
            ? Effect.asVoid(
                confirmAll([delivery], (d) => ({
                  messageId: d.envelope.id,
                  topic: topic.name,
                  group,
                  outcome: "dead-lettered",
                  reason: reason.reason,
                  ...(reason.error === undefined ? {} : { error: reason.error }),
                  attempts: reason.attempts ?? d.envelope.attempt
                }))
              )
            : Effect.void
        ),
        Effect.catch((e) => Effect.logWarning("consumer: dead-lettering failed; the message will be redelivered", e)),
        Effect.annotateLogs({ topic: topic.name, group, messageId: delivery.envelope.id })
      )

    /** Handles one delivery; a success is not acked here but pushed to `acks` (acked per read). */
    const handleOne = (delivery: Broker.Delivery, acks: Array<Broker.Delivery>): Effect.Effect<void, never, R> => {
      const encoded = delivery.envelope
      const decoded = decodeOrRefuse(delivery)
      if (Result.isFailure(decoded)) {
        // refused or undecodable: permanent, no retries, no handler call (docs/reliability.md, trap 5)
        return deadLetter(delivery, { reason: decoded.failure.reason, error: decoded.failure.error, attempts: 0 })
      }
      const payload = decoded.success
      if (delivery.deliveryCount > maxDeliveries) {
        return deadLetter(delivery, {
          reason: "too-many-deliveries",
          error: `delivered ${delivery.deliveryCount} times without being settled`,
          attempts: encoded.attempt
        })
      }
      const settle = (effect: Effect.Effect<void, unknown>) =>
        Effect.uninterruptible(effect).pipe(
          Effect.catch((e) =>
            Effect.logWarning("consumer: settling a delivery failed; it will be redelivered", e).pipe(
              Effect.annotateLogs({ topic: topic.name, group, messageId: encoded.id })
            )
          )
        )
      // a message published inside a span carries its trace context: the handler continues that trace
      const parent = encoded.headers.traceparent === undefined ? undefined : Envelope.traceParentOf(encoded.headers)
      const call = (context: Context): Effect.Effect<void, E, R> => {
        const call = options.handle(payload, context)
        const handled =
          (++calls & 15) !== 0
            ? call
            : Effect.suspend(() => {
                const start = clock.currentTimeNanosUnsafe()
                return Effect.map(call, () => {
                  mDuration.updateUnsafe(Number(clock.currentTimeNanosUnsafe() - start) / 1e9, metricsContext)
                })
              })
        return parent === undefined || Option.isNone(parent)
          ? handled
          : Effect.withSpan(handled, `converge.handle ${topic.name}`, {
              parent: parent.value,
              kind: "consumer",
              attributes: {
                "messaging.system": "converge",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic.name,
                "messaging.consumer.group.name": group,
                "messaging.message.id": encoded.id,
                "messaging.converge.attempt": context.attempt
              }
            })
      }
      const loop = (attempt: number, inProcess: number): Effect.Effect<void, never, R> => {
        const context = new Context(delivery, names, attempt)
        return Effect.matchCauseEffect(call(context), {
          onSuccess: () => {
            acks.push(delivery)
            if (confirm || auditing) attempts.set(delivery, attempt)
            if (Audit.isMarkedHandled(context)) recordedByStore.add(delivery)
            return Effect.void
          },
          onFailure: (cause) => {
            if (Cause.hasInterruptsOnly(cause)) return Effect.failCause(cause as Cause.Cause<never>)
            return Effect.flatMap(Retry.decide(policy, cause, attempt), (decision): Effect.Effect<void, never, R> => {
              switch (decision._tag) {
                case "Ack":
                  acks.push(delivery)
                  return Effect.logDebug("consumer: error ignored by classification").pipe(
                    Effect.annotateLogs({ topic: topic.name, group, messageId: encoded.id })
                  )
                case "DeadLetter":
                  return deadLetter(delivery, { reason: decision.reason, error: decision.error, attempts: attempt })
                case "Retry": {
                  const delayMs = Duration.toMillis(decision.delay)
                  const retried = Effect.andThen(
                    Effect.sync(() => count(mRetried, 1)),
                    audited("retried", [delivery], () => ({ attempt, delayMs, error: decision.error }))
                  )
                  if (delayMs <= inProcessLimit && inProcess < maxInProcess) {
                    return Effect.andThen(
                      retried,
                      Effect.andThen(Effect.sleep(decision.delay), loop(attempt + 1, inProcess + 1))
                    )
                  }
                  return Effect.andThen(
                    retried,
                    messageSpan(
                      encoded,
                      "converge.retry",
                      { "messaging.converge.attempt": attempt, "messaging.converge.retry.delay_ms": delayMs },
                      settle(delivery.nack(decision.delay, { attempt: attempt + 1 }))
                    )
                  )
                }
              }
            })
          }
        })
      }
      const run = loop(Math.max(1, encoded.attempt), 1)
      return perKey ? locks.withLock(encoded.key, run) : run
    }

    /**
     * Handles one read: every delivery (up to `concurrency` at once), then
     * one `ackAll` for the successes — also when interrupted, so nothing that
     * completed is left unacked.
     */
    const handleRead = (batch: ReadonlyArray<Broker.Delivery>): Effect.Effect<void, never, R> =>
      options.handleBatch === undefined || batch.length < 2
        ? handleEach(batch)
        : handleAtOnce(batch, options.handleBatch)

    /**
     * The `handleBatch` path: settle what must not reach it, call it once for
     * the rest, ack all on success, fall back to `handleEach` on failure.
     */
    const handleAtOnce = (
      batch: ReadonlyArray<Broker.Delivery>,
      handleMany: (messages: ReadonlyArray<BatchItem<A>>) => Effect.Effect<void, E, R>
    ): Effect.Effect<void, never, R> =>
      Effect.gen(function* () {
        const items: Array<BatchItem<A>> = []
        const deliveries: Array<Broker.Delivery> = []
        const settleFirst: Array<Broker.Delivery> = []
        for (const delivery of batch) {
          const decoded = decodeOrRefuse(delivery)
          if (Result.isFailure(decoded) || delivery.deliveryCount > maxDeliveries) {
            settleFirst.push(delivery)
            continue
          }
          deliveries.push(delivery)
          items.push({
            message: decoded.success,
            context: new Context(delivery, names, Math.max(1, delivery.envelope.attempt))
          })
        }
        if (settleFirst.length > 0) yield* handleEach(settleFirst)
        if (items.length === 0) return
        const start = clock.currentTimeNanosUnsafe()
        // one span for the batch, linked to each message's publisher span
        const links: Array<Tracer.SpanLink> = []
        for (const d of deliveries) {
          if (d.envelope.headers.traceparent === undefined) continue
          const parent = Envelope.traceParentOf(d.envelope.headers)
          if (Option.isSome(parent))
            links.push({ span: parent.value, attributes: { "messaging.message.id": d.envelope.id } })
        }
        const exit = yield* Effect.exit(
          links.length === 0
            ? handleMany(items)
            : Effect.withSpan(handleMany(items), `converge.handle-batch ${topic.name}`, {
                kind: "consumer",
                links,
                attributes: {
                  "messaging.system": "converge",
                  "messaging.operation.type": "process",
                  "messaging.destination.name": topic.name,
                  "messaging.consumer.group.name": group,
                  "messaging.batch.message_count": items.length
                }
              })
        )
        if (Exit.isSuccess(exit)) {
          observeBatch(deliveries.length, start)
          if (auditing) {
            for (const item of items) {
              if (Audit.isMarkedHandled(item.context)) recordedByStore.add((item.context as Context).delivery)
            }
          }
          yield* confirmAndAck(deliveries).pipe(Effect.uninterruptible)
          return
        }
        if (Cause.hasInterruptsOnly(exit.cause)) return yield* Effect.failCause(exit.cause as Cause.Cause<never>)
        yield* Effect.logDebug(
          "consumer: handleBatch failed; handling the read one message at a time",
          exit.cause
        ).pipe(Effect.annotateLogs({ topic: topic.name, group }))
        yield* handleEach(deliveries)
      })

    const handleEach = (batch: ReadonlyArray<Broker.Delivery>): Effect.Effect<void, never, R> =>
      Effect.suspend(() => {
        const acks: Array<Broker.Delivery> = []
        const flush = Effect.suspend(() => (acks.length === 0 ? Effect.void : confirmAndAck(acks)))
        // up to `concurrency` lanes share one cursor over the read: a slow message holds its lane
        // only, and a fiber is forked per lane, not per message
        let next = 0
        const lane = Effect.whileLoop({
          while: () => next < batch.length,
          body: () => handleOne(batch[next++]!, acks),
          step: () => {}
        })
        const lanes = Math.min(concurrency, batch.length)
        const all =
          lanes <= 1
            ? lane
            : Effect.all(
                Array.from({ length: lanes }, () => lane),
                { concurrency: lanes, discard: true }
              )
        return Effect.ensuring(all, Effect.uninterruptible(flush))
      })

    const readsInFlight = options.handleBatch !== undefined && !perKey ? concurrency : 1
    // Shutdown. The subscription is pulled where its reads are handled (not through `Stream.interruptWhen`,
    // whose merge pulls in a fiber of its own, one read ahead of the handlers: a read that stayed pending,
    // unhandled, after every shutdown). Once stopping, no pull starts; with reads handled concurrently a
    // pull runs beside the handlers, and a pull that is waiting then ends too. `handling` counts the reads
    // being handled, and `idle` is completed when it drops to 0 while stopping.
    const stop = yield* Deferred.make<void>()
    const idle = yield* Deferred.make<void>()
    let stopping = false
    let handling = 0
    const handleTracked = (batch: ReadonlyArray<Broker.Delivery>): Effect.Effect<void, never, R> =>
      Effect.suspend(() => {
        // a read that completed after shutdown began (a pull that was waiting) is not handled: its messages
        // stay pending for this consumer name and come back as its history, or are claimed
        if (stopping) return Effect.void
        handling++
        return Effect.ensuring(
          Effect.andThen(
            Effect.sync(() => count(mDelivered, batch.length)),
            auditing && audit.deliveries === true
              ? Effect.andThen(
                  audited("delivered", batch, (d) => ({ attempt: Math.max(1, d.envelope.attempt) })),
                  handleRead(batch)
                )
              : handleRead(batch)
          ),
          Effect.suspend(() => (--handling === 0 && stopping ? Deferred.succeed(idle, undefined) : Effect.void))
        )
      })
    const stopped = Effect.andThen(Deferred.await(stop), Cause.done())
    const fiber = yield* broker
      .subscribe({
        topic: topic.name,
        group,
        consumer,
        batchSize: options.batchSize,
        claimIdle: options.claimIdle,
        // a loss the broker reports is counted and audited, then passed on (logged by default)
        onEvent: (event) =>
          Effect.andThen(
            event._tag === "LostInBroker" ? lostInBroker(event) : Effect.void,
            options.onEvent === undefined ? Broker.logEvent(event) : options.onEvent(event)
          )
      })
      .pipe(
        (reads) =>
          Stream.transformPull(reads, (pull) =>
            Effect.succeed(
              Effect.suspend(() =>
                stopping ? Cause.done() : readsInFlight === 1 ? pull : Effect.raceFirst(pull, stopped)
              )
            )
          ),
        // with handleBatch and no per-key order, `concurrency` reads are handled at once: the next read is
        // decoded while the previous one's transaction commits
        readsInFlight === 1
          ? Stream.runForEachArray(handleTracked)
          : (reads) =>
              reads.pipe(
                Stream.chunks,
                Stream.mapEffect(handleTracked, { concurrency: readsInFlight, unordered: true }),
                Stream.runDrain
              ),
        // a subscription that fails for a retryable reason (a lost connection, a killed consumer)
        // is opened again with backoff; its unsettled messages come back as this consumer's history
        Effect.tapError((e) =>
          e.isRetryable
            ? Effect.logWarning("consumer: subscription failed; subscribing again", e).pipe(
                Effect.annotateLogs({ topic: topic.name, group, consumer })
              )
            : Effect.void
        ),
        Effect.retry({ schedule: resubscribeBackoff, while: (e) => e.isRetryable }),
        // the broker layer closed before this consumer's scope (`Effect.provide(layer)` inside the scope
        // that runs the consumer): a normal shutdown in the other order, not a failure; what was read and
        // not settled stays pending in the broker
        Effect.catchIf(
          (e) => e.reason._tag === "BrokerClosed",
          () =>
            Effect.logInfo("consumer stopped: the broker was shut down").pipe(
              Effect.annotateLogs({ topic: topic.name, group, consumer })
            )
        ),
        Effect.tapCause((cause) =>
          Cause.hasInterruptsOnly(cause)
            ? Effect.void
            : Effect.logError("consumer stopped", cause).pipe(
                Effect.annotateLogs({ topic: topic.name, group, consumer })
              )
        ),
        Effect.forkScoped
      )
    // registered after the fork, so it runs before the fork is interrupted: stop taking deliveries, let
    // the reads being handled finish for up to shutdownTimeout, then interrupt what is left (a pull waiting
    // for messages, or handlers past the deadline)
    yield* Effect.addFinalizer(() =>
      Effect.suspend(() => {
        stopping = true
        return Deferred.succeed(stop, undefined)
      }).pipe(
        Effect.andThen(Effect.suspend(() => (handling === 0 ? Effect.void : Deferred.await(idle)))),
        Effect.timeoutOption(shutdownTimeout),
        Effect.flatMap((done) =>
          Option.isSome(done)
            ? Effect.void
            : Effect.logWarning("consumer: in-flight handlers did not finish in time; interrupting them")
        ),
        Effect.andThen(Fiber.interrupt(fiber))
      )
    )
  }).pipe(Effect.withSpan("Consumer.make", { attributes: { topic: topic.name, group: options.group } }))

/**
 * The consumer as a Layer: runs in the background while the layer lives.
 *
 * @since 0.1.0
 */
export const layer = <A, I, E extends Retry.Tagged = never, R = never>(
  topic: Topic.Topic<A, I>,
  options: Options<A, E, R>
): Layer.Layer<never, Name.InvalidName | InvalidOption, Broker.Broker | R> => Layer.effectDiscard(make(topic, options))
