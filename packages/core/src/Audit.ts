/**
 * `Audit` — one trail of every lifecycle step of every message (stage 6):
 * published, relayed, delivered, handled, retried, dead-lettered, replayed,
 * purged, confirmed, and the steps of sagas. Each event names the message,
 * its correlation and causation ids, topic, group, attempt, the time (from
 * `Clock`) and the process that wrote it.
 *
 * The runtime writes events to the {@link AuditSink} in context. Without
 * one, auditing is off and costs a boolean check. Sinks:
 * {@link layerMemory} here (tests), `AuditPg` in `@converge/store-postgres`
 * (written in the transaction of a transactional step — an outbox insert,
 * an inbox-handled message, a saga step — and batched otherwise).
 *
 * ```ts
 * const timeline = yield* Audit.timeline(correlationId) // every message of one flow, in order
 * const events = yield* Audit.query({ messageId, kinds: ["retried", "dead-lettered"] })
 * ```
 *
 * @since 0.1.0
 */

import { Clock, Context, Effect, Layer, Schema } from "effect"
import type * as Envelope from "./Envelope.ts"

/**
 * What happened to a message.
 *
 * | kind | written by |
 * |:--|:--|
 * | `published` | `Publisher` (`detail: "direct"`), `Outbox.publish` (`detail: "outbox"`, in its transaction) |
 * | `relayed` | `OutboxRelay`, once the broker confirmed the message (batched) |
 * | `delivered` | `Consumer`, when a delivery arrives (`attempt`); only with `deliveries: true` |
 * | `handled` | `Consumer` after the handler succeeded (with the inbox: in its transaction) |
 * | `retried` | `Consumer`: the attempt that failed, the `delayMs` before the next, the `error` |
 * | `dead-lettered` | `Consumer`: `reason`, `error`, `attempt` |
 * | `replayed` / `purged` | `DeadLetter.replay` / `DeadLetter.purge` |
 * | `lost-in-broker` | `Consumer`, when the broker reports entries deleted while pending (`messageId`: the entry id) |
 * | `confirmed` | `Consumer` with `confirm`: the confirmation sent (`reason`: `processed` or `dead-lettered`) |
 * | `saga-step-completed`, `saga-step-failed` | a saga step (`detail`: the step) |
 * | `compensation-completed`, `compensation-failed` | a compensation attempt (`detail`: the step) |
 * | `saga-parked`, `saga-resumed` | a parked saga, and an operator's decision |
 *
 * For saga events, `messageId` is the saga's execution id and `topic` its name.
 *
 * @since 0.1.0
 */
export const kinds = [
  "published",
  "relayed",
  "delivered",
  "handled",
  "retried",
  "dead-lettered",
  "replayed",
  "purged",
  "lost-in-broker",
  "confirmed",
  "saga-step-completed",
  "saga-step-failed",
  "compensation-completed",
  "compensation-failed",
  "saga-parked",
  "saga-resumed"
] as const

/** One of {@link kinds}. @since 0.1.0 */
export type Kind = (typeof kinds)[number]

/**
 * One audit event.
 *
 * @since 0.1.0
 */
export interface Event {
  readonly kind: Kind
  readonly messageId: string
  readonly topic: string
  readonly group?: string | undefined
  readonly correlationId?: string | undefined
  readonly causationId?: string | undefined
  readonly attempt?: number | undefined
  readonly reason?: string | undefined
  readonly error?: string | undefined
  /** `retried`: the delay before the next attempt. */
  readonly delayMs?: number | undefined
  /** Epoch milliseconds, from `Clock`, with microseconds as the fraction (see {@link currentTime}). */
  readonly at: number
  /** The process that wrote it (`host-pid`). */
  readonly process: string
  /** More: `direct`/`outbox` for `published`, the step of a saga event. */
  readonly detail?: string | undefined
}

/** An {@link Event} as stored, with its sequence number (the order of writing). @since 0.1.0 */
export interface Stored extends Event {
  readonly seq: number
}

/**
 * Which topics are audited, and how many of their messages.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Per topic: `false` turns it off; a number from 0 to 1 samples that share of its messages. */
  readonly topics?: Readonly<Record<string, boolean | number>> | undefined
  /** For topics not listed: `true` (default), `false`, or a share to sample. */
  readonly default?: boolean | number | undefined
  /**
   * Record `delivered` too: one event per delivery, as it arrives (default `false`). The events that settle
   * a delivery — `handled`, `retried`, `dead-lettered` — carry its attempt, so this adds only the moment it
   * arrived, at about a tenth of the outbox drain's throughput with `AuditPg` (see docs/observability.md).
   */
  readonly deliveries?: boolean | undefined
}

/**
 * Where the runtime writes events. `write` joins the caller's transaction
 * when there is one (a transactional step); `enqueue` may batch. `enabled`
 * false: the runtime does not build events at all.
 *
 * @since 0.1.0
 */
export interface Sink {
  readonly enabled: boolean
  /** Whether `delivered` events are recorded ({@link Options}'s `deliveries`). */
  readonly deliveries?: boolean | undefined
  /** Whether a message of this topic is audited (sampling is by message id: all of a message's events, or none). */
  readonly records: (topic: string, messageId: string) => boolean
  readonly write: (events: ReadonlyArray<Event>) => Effect.Effect<void>
  readonly enqueue: (events: ReadonlyArray<Event>) => Effect.Effect<void>
}

/** The sink of a process that audits nothing. @since 0.1.0 */
export const disabled: Sink = {
  enabled: false,
  records: () => false,
  write: () => Effect.void,
  enqueue: () => Effect.void
}

/**
 * The sink in context (default {@link disabled}).
 *
 * @since 0.1.0
 */
export const AuditSink = Context.Reference<Sink>("@converge/core/Audit/AuditSink", { defaultValue: () => disabled })

/**
 * A query of the trail.
 *
 * @since 0.1.0
 */
export interface Filter {
  readonly messageId?: string | undefined
  readonly correlationId?: string | undefined
  readonly topic?: string | undefined
  readonly group?: string | undefined
  readonly kinds?: ReadonlyArray<Kind> | undefined
  /** Epoch milliseconds, inclusive. */
  readonly from?: number | undefined
  /** Epoch milliseconds, exclusive. */
  readonly to?: number | undefined
  /** At most this many, oldest first (default 1 000). */
  readonly limit?: number | undefined
}

/**
 * The audit store could not be read or written.
 *
 * @since 0.1.0
 */
export class AuditError extends Schema.TaggedError<AuditError>("@converge/core/Audit/AuditError")("AuditError", {
  operation: Schema.String,
  cause: Schema.Defect()
}) {
  /** Names the operation. */
  override get message(): string {
    return `audit: ${this.operation} failed: ${this.cause instanceof Error ? this.cause.message : String(this.cause)}`
  }
}

/**
 * Reading the trail.
 *
 * @since 0.1.0
 */
export class AuditLog extends Context.Service<
  AuditLog,
  {
    /**
     * Events matching the filter, by time, then in the order they were written (batched events are
     * written after the transactional ones of the same moment).
     */
    readonly query: (filter: Filter) => Effect.Effect<ReadonlyArray<Stored>, AuditError>
    /** Deletes the events written before `before` (epoch ms); returns how many. */
    readonly cleanup: (before: number) => Effect.Effect<number, AuditError>
  }
>()("@converge/core/Audit/AuditLog") {}

/**
 * Events matching the filter, oldest first, with the {@link AuditLog} in context.
 *
 * @since 0.1.0
 */
export const query = (filter: Filter): Effect.Effect<ReadonlyArray<Stored>, AuditError, AuditLog> =>
  AuditLog.use((log) => log.query(filter))

/**
 * The timeline of one correlation id: every event of every message of that
 * flow (a saga, a request and its effects), across services, in order.
 *
 * @since 0.1.0
 */
export const timeline = (correlationId: string): Effect.Effect<ReadonlyArray<Stored>, AuditError, AuditLog> =>
  query({ correlationId, limit: 10_000 })

/**
 * Deletes events older than `before` (epoch ms).
 *
 * @since 0.1.0
 */
export const cleanup = (before: number): Effect.Effect<number, AuditError, AuditLog> =>
  AuditLog.use((log) => log.cleanup(before))

const fnv = (text: string): number => {
  let h = 2166136261
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619)
  return (h >>> 0) / 0x100000000
}

/**
 * The `records` function of a sink for these options (shared by every sink).
 *
 * @since 0.1.0
 */
export const recorder = (options?: Options): ((topic: string, messageId: string) => boolean) => {
  const share = (v: boolean | number | undefined): number => (v === undefined || v === true ? 1 : v === false ? 0 : v)
  const fallback = share(options?.default)
  const topics = new Map(Object.entries(options?.topics ?? {}).map(([t, v]) => [t, share(v)] as const))
  for (const [topic, value] of topics) {
    if (!(value >= 0 && value <= 1)) throw new RangeError(`audit: the share of topic ${topic} must be from 0 to 1`)
  }
  if (!(fallback >= 0 && fallback <= 1)) throw new RangeError("audit: the default share must be from 0 to 1")
  return (topic, messageId) => {
    const s = topics.get(topic) ?? fallback
    return s >= 1 ? true : s <= 0 ? false : fnv(messageId) < s
  }
}

/** This process's name in events: `host-pid`. @since 0.1.0 */
export const processName: string = `${(globalThis.process?.env?.HOSTNAME ?? "host").slice(0, 60)}-${globalThis.process?.pid ?? 0}`

/**
 * An in-memory trail: the sink and the log over one array (tests, demos).
 *
 * @since 0.1.0
 */
export const makeMemory = (
  options?: Options
): { readonly sink: Sink; readonly log: AuditLog["Service"]; readonly events: Array<Stored> } => {
  const events: Array<Stored> = []
  let seq = 0
  const append = (batch: ReadonlyArray<Event>) =>
    Effect.sync(() => {
      for (const e of batch) events.push({ ...e, seq: ++seq })
    })
  const matches = (f: Filter) => (e: Stored) =>
    (f.messageId === undefined || e.messageId === f.messageId) &&
    (f.correlationId === undefined || e.correlationId === f.correlationId || e.messageId === f.correlationId) &&
    (f.topic === undefined || e.topic === f.topic) &&
    (f.group === undefined || e.group === f.group) &&
    (f.kinds === undefined || f.kinds.includes(e.kind)) &&
    (f.from === undefined || e.at >= f.from) &&
    (f.to === undefined || e.at < f.to)
  return {
    events,
    sink: {
      enabled: true,
      deliveries: options?.deliveries ?? false,
      records: recorder(options),
      write: append,
      enqueue: append
    },
    log: AuditLog.of({
      query: (filter) =>
        Effect.sync(() =>
          events
            .filter(matches(filter))
            .sort((a, b) => a.at - b.at || a.seq - b.seq)
            .slice(0, filter.limit ?? 1_000)
        ),
      cleanup: (before) =>
        Effect.sync(() => {
          const kept = events.filter((e) => e.at >= before)
          const removed = events.length - kept.length
          events.splice(0, events.length, ...kept)
          return removed
        })
    })
  }
}

/**
 * {@link makeMemory} as a layer: the sink and the log.
 *
 * @since 0.1.0
 */
export const layerMemory = (options?: Options): Layer.Layer<AuditLog> =>
  Layer.unwrap(
    Effect.sync(() => {
      const memory = makeMemory(options)
      return Layer.merge(Layer.succeed(AuditLog, memory.log), Layer.succeed(AuditSink, memory.sink))
    })
  )

/**
 * The event of `kind` for a message (its id, topic, correlation and causation ids from its headers).
 *
 * @since 0.1.0
 */
export const eventOf = (kind: Kind, envelope: Envelope.Encoded, at: number, extra?: Partial<Event>): Event => ({
  kind,
  messageId: envelope.id,
  topic: envelope.topic,
  correlationId: envelope.headers.correlationid,
  causationId: envelope.headers.causationid,
  at,
  process: processName,
  ...extra
})

/**
 * Records `kind` for the messages the sink in context audits: `write` (in the current transaction, if any)
 * or `enqueue` (batched). Nothing is built when auditing is off.
 *
 * @since 0.1.0
 */
export const record = (
  mode: "write" | "enqueue",
  kind: Kind,
  envelopes: ReadonlyArray<Envelope.Encoded>,
  extra?: (envelope: Envelope.Encoded) => Partial<Event>
): Effect.Effect<void> =>
  Effect.flatMap(Effect.service(AuditSink), (sink) => recordWith(sink, mode, kind, envelopes, extra))

/**
 * {@link record} with a given sink (a runtime that read it once).
 *
 * @since 0.1.0
 */
export const recordWith = (
  sink: Sink,
  mode: "write" | "enqueue",
  kind: Kind,
  envelopes: ReadonlyArray<Envelope.Encoded>,
  extra?: (envelope: Envelope.Encoded) => Partial<Event>
): Effect.Effect<void> => {
  if (!sink.enabled) return Effect.void
  const chosen = envelopes.filter((e) => sink.records(e.topic, e.id))
  if (chosen.length === 0) return Effect.void
  return Effect.flatMap(currentTime, (at) => sink[mode](chosen.map((e) => eventOf(kind, e, at, extra?.(e)))))
}

/**
 * The time of an event: epoch milliseconds with microseconds as the fraction (`Clock.currentTimeNanos`), so
 * steps written within one millisecond — a replay and the handling it caused, on an in-memory broker — keep
 * their order in a timeline. The Postgres store keeps microseconds too.
 *
 * @since 0.1.0
 */
export const currentTime: Effect.Effect<number> = Effect.map(Clock.currentTimeNanos, (n) => Number(n / 1000n) / 1000)

/**
 * The slot of a handler's message context that {@link markHandled} sets: a context with this key can be
 * marked (`Consumer`'s contexts have it, `false` until marked).
 *
 * @since 0.1.0
 */
export const handledKey: unique symbol = Symbol.for("@converge/core/Audit/handled")

/**
 * Marks a handler's message context whose `handled` event a store already wrote in the handler's
 * transaction (the inbox does), so `Consumer` does not write it again. The mark is on the context — one
 * group's delivery of one attempt — never on the envelope, which a broker may share between the groups of a
 * topic. A context without the {@link handledKey} slot (a hand-made one, in a test) is left alone.
 *
 * @since 0.1.0
 */
export const markHandled = (context: object): void => {
  if (handledKey in context) (context as { [handledKey]: boolean })[handledKey] = true
}

/**
 * Whether {@link markHandled} marked the context.
 *
 * @since 0.1.0
 */
export const isMarkedHandled = (context: object): boolean =>
  (context as { readonly [handledKey]?: boolean })[handledKey] === true

/**
 * Records a saga event (`messageId`: the execution id, `topic`: the saga's name, `detail`: the step) with
 * the sink in context, in the current transaction (a saga step's).
 *
 * @since 0.1.0
 */
export const recordSaga = (
  kind: Kind,
  saga: { readonly executionId: string; readonly name: string },
  extra: {
    readonly step: string
    readonly attempt?: number | undefined
    readonly error?: string | undefined
    readonly reason?: string | undefined
  }
): Effect.Effect<void> =>
  Effect.flatMap(Effect.service(AuditSink), (sink) => {
    if (!sink.enabled || !sink.records(saga.name, saga.executionId)) return Effect.void
    return Effect.flatMap(currentTime, (at) =>
      sink.write([
        {
          kind,
          messageId: saga.executionId,
          topic: saga.name,
          correlationId: saga.executionId,
          at,
          process: processName,
          detail: extra.step,
          attempt: extra.attempt,
          error: extra.error,
          reason: extra.reason
        }
      ])
    )
  })
