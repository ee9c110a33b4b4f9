/**
 * `OutboxRelay` — moves committed outbox rows to the `Broker`.
 *
 * A background Layer. Each cycle, in one `READ COMMITTED` transaction:
 *
 * 1. takes transaction-scoped advisory locks on the outbox partitions it can
 *    get (`pg_try_advisory_xact_lock`), so one relay at a time works a
 *    partition: several relay processes are safe and never reorder a key;
 *    a relay that dies (even by SIGKILL) releases its locks with its
 *    connection;
 * 2. reads up to `batchSize` unpublished rows of those partitions **whose
 *    transaction id is below the snapshot's `xmin`** (`tx <
 *    pg_snapshot_xmin(pg_current_snapshot())`), in `(tx, seq)` order. Every
 *    transaction below `xmin` has ended, so no row can later appear before
 *    the ones read: a row committed after a row with a higher sequence
 *    number is relayed, never skipped, and a key's messages leave in the
 *    order of their transactions. A long-running transaction anywhere in
 *    the cluster delays the rows written after it began, it never loses
 *    them;
 * 3. publishes them through the `Broker` as one batch (`publishEach`: an
 *    outcome per message, at the broker's confirmation level);
 * 4. deletes the stored rows (or, with a `retention`, marks them
 *    `published_at`) and commits. A crash between 3 and 4 rolls that back:
 *    the rows are published again (at-least-once; the consumer's inbox keeps
 *    the effect single).
 *
 * A row that cannot be published — malformed, or refused by the broker with
 * a permanent error — is moved to `outbox_dead` with its reason, in the same
 * transaction, and the relay goes on. Rows the broker failed for now stay in
 * the outbox: the cycle commits what it did, then fails and is retried on
 * the `retry` schedule, so nothing is published twice by retries of a batch
 * that partly succeeded. Errors where nothing is known of the batch (a lost
 * connection, a database error) roll the cycle back and retry it.
 *
 * Wake-ups: `Outbox.publish` in this process nudges the relay after commit;
 * with a `PgClient` in context, a `LISTEN` on the store's channel wakes it
 * for commits of other processes (the outbox table's trigger sends `NOTIFY`
 * with the committing transaction's id); and it polls every `pollInterval`
 * in any case. Both wake-ups name the committed transaction. One that a
 * finished drain has already read past (its id is below that read's `xmin`,
 * every partition held, less than a batch read) wakes nothing: a commit
 * nudged in this process and notified too costs one drain, not two. One the
 * drain could not read past yet — held back by an older transaction still
 * running somewhere in the cluster — is looked at again soon (every quarter
 * of the time it has waited, 1 ms to 1 s), not at the next poll. Where
 * `LISTEN` does not work (PGlite, a transaction-mode pooler), set
 * `listen: false`: nudge and poll keep it moving.
 *
 * Published rows are deleted as they are confirmed, or kept (marked
 * `published_at`) for `retention` and then deleted by a background cleanup.
 *
 * @since 0.1.0
 */

import { Audit, Broker, BrokerError, Envelope, Metrics, Name, Retry } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import {
  Clock,
  Context,
  Duration,
  Effect,
  Fiber,
  Layer,
  Metric,
  Option,
  Queue,
  Result,
  type Schedule,
  Schema,
  type Tracer
} from "effect"
import { SqlClient } from "effect/sql"
import type { SqlError } from "effect/sql/SqlError"
import * as AuditPg from "./AuditPg.ts"
import { sqlDefectsAsFailures } from "./Outbox.ts"
import { deleteExpired, outboxColumns, parseXid, SqlStore } from "./SqlStore.ts"

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Rows per cycle (one broker batch; default 500). */
  readonly batchSize?: number | undefined
  /** Poll for rows at least this often (default 1 second). */
  readonly pollInterval?: Duration.Input | undefined
  /**
   * `LISTEN` for commits of other processes when a `PgClient` is in context
   * (default `true`; never on PGlite, where it cannot work).
   */
  readonly listen?: boolean | undefined
  /** Relay workers in this process (default 1); each takes a share of the partitions per cycle. */
  readonly concurrency?: number | undefined
  /** Delay between failed cycles (default: exponential from 100 ms, capped at 5 s). */
  readonly retry?: Schedule.Schedule<unknown, unknown> | undefined
  /** A broker publish taking longer than this fails the cycle (default 30 seconds). */
  readonly publishTimeout?: Duration.Input | undefined
  /**
   * Keep published rows (marked with `published_at`) this long before
   * deleting them, for inspection or audit. Default 0: a row is deleted in
   * the transaction that confirms its publish (cheapest for Postgres).
   */
  readonly retention?: Duration.Input | undefined
  /** Run the retention cleanup this often (default 1 minute). */
  readonly cleanupInterval?: Duration.Input | undefined
  /**
   * Sample the backlog gauges (`converge_outbox_backlog`, `converge_outbox_oldest_age_seconds`) this
   * often (default 15 seconds; 0: never). One `count(*)` of the unpublished rows each time.
   */
  readonly gaugeInterval?: Duration.Input | undefined
}

/**
 * What a relay cycle did.
 *
 * @since 0.1.0
 */
export interface CycleResult {
  /** Partitions this cycle held. */
  readonly partitions: number
  /** Rows published and marked. */
  readonly published: number
  /** Rows moved to `outbox_dead`. */
  readonly dead: number
}

/**
 * Counters of a relay since it was built, for monitoring.
 *
 * @since 0.1.0
 */
export interface Stats {
  /** Cycles run (one transaction each), failed ones included. */
  readonly cycles: number
  /** Cycles that failed and were rolled back. */
  readonly failedCycles: number
  /** Rows published. */
  readonly published: number
  /** Rows moved to `outbox_dead`. */
  readonly dead: number
  /** `NOTIFY` wake-ups received. */
  readonly notifications: number
  /**
   * `NOTIFY` wake-ups recognised on arrival as already read past by a
   * finished drain: they started no drain. (One that arrives during a drain
   * and is read past by it starts none either, uncounted.)
   */
  readonly notificationsCovered: number
  /**
   * Drains re-run soon (every quarter of the hold-back so far, 1 ms to 1 s) because a committed
   * transaction that wrote outbox rows was still held back by an older
   * transaction running elsewhere in the cluster. Climbing steadily: long
   * transactions are delaying the outbox.
   */
  readonly heldBackRetries: number
}

/**
 * The outbox backlog: rows not yet published.
 *
 * @since 0.1.0
 */
export interface Lag {
  readonly unpublished: number
  /** Age of the oldest unpublished row, by the clock of this process (0 when there is none). */
  readonly oldestMillis: number
}

/**
 * The relay service.
 *
 * @since 0.1.0
 */
export class OutboxRelay extends Context.Service<
  OutboxRelay,
  {
    /** Wakes the relay now. */
    readonly nudge: Effect.Effect<void>
    /** Runs cycles until no row is ready (or the partitions are held elsewhere); returns the rows published. */
    readonly drain: Effect.Effect<number, SqlError | BrokerError.BrokerError>
    /** One cycle. */
    readonly cycle: Effect.Effect<CycleResult, SqlError | BrokerError.BrokerError>
    /** Deletes published rows older than the retention; returns how many. */
    readonly cleanup: Effect.Effect<number, SqlError>
    /** The backlog. */
    readonly lag: Effect.Effect<Lag, SqlError>
    /** Counters since this relay was built. */
    readonly stats: Effect.Effect<Stats>
  }
>()("@converge/store-postgres/OutboxRelay") {}

/**
 * A row in `outbox_dead`.
 *
 * @since 0.1.0
 */
export interface DeadRow {
  readonly seq: string
  readonly messageId: string
  readonly topic: string
  readonly reason: string
  readonly error: string
  /** When the relay moved it, RFC 3339 (UTC). */
  readonly movedAt: string
}

/**
 * Why a row was moved to `outbox_dead`.
 *
 * @since 0.1.0
 */
export const DeadReason = {
  /** The row does not form a valid envelope (a column of the wrong form, an invalid topic name). */
  malformed: "malformed",
  /** The broker refused the message with a permanent error. */
  rejected: "rejected"
} as const

class RowMalformed extends Schema.TaggedError<RowMalformed>("@converge/store-postgres/OutboxRelay/RowMalformed")(
  "RowMalformed",
  {
    message: Schema.String
  }
) {}

interface Row {
  readonly seq: string
  readonly message_id: string
  readonly topic: string
  readonly type: string
  readonly source: string
  readonly key: string | null
  readonly time: unknown
  readonly attempt: number
  readonly headers: unknown
  readonly data: string
}

/**
 * What the relay remembers across rows: topic names it already found valid (it sees few; each is checked
 * once), and the last time it formatted (the rows of one publish share their time).
 */
interface RowCache {
  readonly validTopics: Set<string>
  lastMillis: number
  lastIso: string
}

const toEncoded = (row: Row, cache: RowCache): Result.Result<Envelope.Encoded, RowMalformed> => {
  if (!cache.validTopics.has(row.topic)) {
    const topic = Name.check("topic", row.topic)
    if (Result.isFailure(topic)) return Result.fail(new RowMalformed({ message: topic.failure.message }))
    if (cache.validTopics.size < 10_000) cache.validTopics.add(row.topic)
  }
  const millis =
    row.time instanceof Date ? row.time.getTime() : typeof row.time === "string" ? Date.parse(row.time) : Number.NaN
  if (Number.isNaN(millis)) return Result.fail(new RowMalformed({ message: "time is not a timestamp" }))
  if (millis !== cache.lastMillis) {
    cache.lastIso = new Date(millis).toISOString()
    cache.lastMillis = millis
  }
  const headers = typeof row.headers === "string" ? safeParse(row.headers) : row.headers
  if (typeof headers !== "object" || headers === null || Array.isArray(headers)) {
    return Result.fail(new RowMalformed({ message: "headers is not a JSON object" }))
  }
  for (const name in headers) {
    const value = (headers as Record<string, unknown>)[name]
    if (typeof value !== "string") {
      return Result.fail(new RowMalformed({ message: `header ${name} is not a string` }))
    }
    const checked = Name.check("header", name)
    if (Result.isFailure(checked)) return Result.fail(new RowMalformed({ message: checked.failure.message }))
  }
  if (!row.message_id || !row.type || !row.source) {
    return Result.fail(new RowMalformed({ message: "message_id, type and source must be non-empty" }))
  }
  const attempt = Number(row.attempt)
  if (!Number.isInteger(attempt) || attempt < 1) {
    return Result.fail(new RowMalformed({ message: "attempt must be an integer >= 1" }))
  }
  return Result.succeed({
    id: row.message_id,
    topic: row.topic,
    type: row.type,
    source: row.source,
    key: row.key ?? undefined,
    time: cache.lastIso,
    attempt,
    headers: headers as Record<string, string>,
    data: row.data
  })
}

const safeParse = (text: string): unknown => {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}

/**
 * A relay option that cannot work (`batchSize: 0` spun on an empty outbox, `NaN` reached the broker),
 * refused when the relay is built.
 *
 * @since 0.1.0
 */
export class InvalidOption extends Schema.TaggedError<InvalidOption>(
  "@converge/store-postgres/OutboxRelay/InvalidOption"
)("InvalidOption", { option: Schema.String, message: Schema.String }) {}

/** Checks the options: integers in range, durations finite and not negative. */
const validate = (options: Options | undefined): Effect.Effect<void, InvalidOption> =>
  Effect.gen(function* () {
    const integers: ReadonlyArray<readonly [string, number | undefined, number, number]> = [
      ["batchSize", options?.batchSize, 1, 100_000],
      ["concurrency", options?.concurrency, 1, 4096]
    ]
    for (const [option, value, min, max] of integers) {
      if (value !== undefined && !(Number.isInteger(value) && value >= min && value <= max)) {
        return yield* new InvalidOption({
          option,
          message: `${option} must be an integer from ${min} to ${max}, got ${value}`
        })
      }
    }
    const durations: ReadonlyArray<readonly [string, Duration.Input | undefined]> = [
      ["pollInterval", options?.pollInterval],
      ["publishTimeout", options?.publishTimeout],
      ["retention", options?.retention],
      ["cleanupInterval", options?.cleanupInterval],
      ["gaugeInterval", options?.gaugeInterval]
    ]
    for (const [option, value] of durations) {
      if (value === undefined) continue
      const d = typeof value === "number" && Number.isNaN(value) ? Option.none() : Duration.fromInput(value)
      const ms = Option.isSome(d) ? Duration.toMillis(d.value) : Number.NaN
      const positive = option === "pollInterval" || option === "publishTimeout"
      if (!(ms >= (positive ? 1 : 0)) || (ms === Number.POSITIVE_INFINITY && option !== "retention")) {
        return yield* new InvalidOption({
          option,
          message: `${option} must be a finite duration${positive ? " above 0" : " of 0 or more"}, got ${JSON.stringify(String(value))}`
        })
      }
    }
  })

/**
 * Builds the relay over the `SqlStore` and `Broker` in context, without
 * starting it (see {@link run} and {@link layer}).
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<OutboxRelay["Service"], InvalidOption, SqlStore | Broker.Broker> =>
  Effect.map(makeRelay(options), (relay) => relay.service)

/** A relay: its service, and what its background loops need besides. */
interface Relay {
  readonly service: OutboxRelay["Service"]
  /** Every transaction with a lower id has been read past by a committed cycle (see `makeRelay`). */
  readonly horizon: () => bigint
  readonly counters: Counters
}

type Counters = { -readonly [K in keyof Stats]: Stats[K] }

const makeRelay = (options?: Options): Effect.Effect<Relay, InvalidOption, SqlStore | Broker.Broker> =>
  Effect.gen(function* () {
    yield* validate(options)
    const store = yield* SqlStore
    const broker = yield* Broker.Broker
    const { sql, partitions, lockSpace } = store
    const outbox = store.table("outbox")
    const dead = store.table("outbox_dead")
    const batchSize = options?.batchSize ?? 500
    const concurrency = Math.max(1, Math.min(options?.concurrency ?? 1, partitions))
    const share = Math.ceil(partitions / concurrency)
    const publishTimeout = Duration.fromInputUnsafe(options?.publishTimeout ?? "30 seconds")
    const retention = Duration.toMillis(Duration.fromInputUnsafe(options?.retention ?? 0))
    let rotation = 0
    const rowCache: RowCache = { validTopics: new Set(), lastMillis: Number.NaN, lastIso: "" }
    const counters: Counters = {
      cycles: 0,
      failedCycles: 0,
      published: 0,
      dead: 0,
      notifications: 0,
      notificationsCovered: 0,
      heldBackRetries: 0
    }
    // Every transaction with an id below `horizon` has been read past: a cycle holding every partition read
    // less than a batch of the rows below its snapshot's xmin, and committed. A wake-up for such a
    // transaction needs no drain; one for a later transaction needs drains until the horizon passes it.
    let horizon = 0n
    const audit = yield* Audit.AuditSink
    const mRelayed = Metrics.tagged(Metrics.relayed)

    // The read below must walk the partial index (tx, seq) and stop after `batchSize` rows; on a table
    // without statistics (fresh, or a backlog that grew faster than autovacuum analyzes) the planner
    // would rather sort the whole backlog every cycle. These settings hold for this transaction only.
    //
    // synchronous_commit off: the cycle's commit only records that rows were published; if a crash loses
    // it, the rows are published again (at-least-once, absorbed by the inbox), so it need not wait for
    // the WAL flush. The messages themselves were made durable by their own transactions.
    const lockSql = `WITH plan AS MATERIALIZED (
        SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true),
          set_config('synchronous_commit', 'off', true)
      )
      SELECT p, pg_snapshot_xmin(pg_current_snapshot())::text AS h
      FROM plan, (SELECT (g + $1::int) % $2::int AS p FROM generate_series(0, $2::int - 1) g) q
      WHERE pg_try_advisory_xact_lock($3::int, p) LIMIT $4::int`
    // one statement text for any set of held partitions (an array parameter), so it is prepared once
    const readSql = (held: ReadonlyArray<number>) =>
      // ORDER BY the table's columns (o.seq), not the text alias: the partial index (tx, seq) serves it
      `SELECT o.seq::text AS seq, message_id, topic, type, source, key, time, attempt, headers, data FROM ${outbox} o
       WHERE published_at IS NULL AND tx < pg_snapshot_xmin(pg_current_snapshot())
       ${held.length === partitions ? "" : "AND partition = ANY($2::int[])"}
       ORDER BY o.tx, o.seq LIMIT $1::int`
    const markSql =
      retention === 0
        ? `DELETE FROM ${outbox} WHERE seq = ANY($1::bigint[])`
        : `UPDATE ${outbox} SET published_at = $2 WHERE seq = ANY($1::bigint[])`
    // With the audit in this database (AuditPg, every message of a topic or none), the statement that marks
    // the rows also writes their `relayed` events, one row per topic, from the rows themselves: no event is
    // built, sent and parsed again, and no flush transaction of its own. Measured on the drain: see
    // docs/observability.md
    const auditTarget = audit.enabled ? AuditPg.sqlTargetOf(audit, sql) : undefined
    const markAuditedSql =
      auditTarget === undefined
        ? undefined
        : `WITH marked AS (${
            retention === 0
              ? `DELETE FROM ${outbox} WHERE seq = ANY($1::bigint[])`
              : `UPDATE ${outbox} SET published_at = $5 WHERE seq = ANY($1::bigint[])`
          } RETURNING message_id, topic, headers)
          INSERT INTO ${auditTarget.table} (at, kind, topic, process, message_ids, correlation_ids, causation_ids)
          SELECT to_timestamp($2::float8 / 1000.0), 'relayed', topic, $3, array_agg(message_id),
            array_agg(headers->>'correlationid'), array_agg(headers->>'causationid')
          FROM marked WHERE topic <> ALL($4::text[]) GROUP BY topic`
    // outbox_dead is the outbox's columns (LIKE) followed by reason, error, moved_at
    const deadSql = `WITH moved AS (DELETE FROM ${outbox} WHERE seq = $1::bigint RETURNING *)
      INSERT INTO ${dead} SELECT moved.*, $2, $3, $4 FROM moved`

    const publish = (messages: ReadonlyArray<Envelope.Encoded>) =>
      broker.publishEach(messages).pipe(
        Effect.timeoutOrElse({
          duration: publishTimeout,
          orElse: () =>
            Effect.fail(
              BrokerError.make(
                new BrokerError.NotConfirmed({
                  message: `broker publish not confirmed within ${Duration.format(publishTimeout)}`
                })
              )
            )
        })
      )

    const cycleIn = (maxPartitions: number): Effect.Effect<CycleResult, SqlError | BrokerError.BrokerError> =>
      sql
        .withTransaction(
          Effect.gen(function* () {
            const offset = rotation
            rotation = (rotation + maxPartitions) % partitions
            const locked = yield* sql.unsafe<{ readonly p: number; readonly h: string }>(lockSql, [
              offset,
              partitions,
              lockSpace,
              maxPartitions
            ]).withoutTransform
            if (locked.length === 0) return { partitions: 0, published: 0, dead: 0, horizon: undefined }
            const held = locked.map((r) => Number(r.p))
            const rows = yield* sql.unsafe<Row>(
              readSql(held),
              held.length === partitions ? [batchSize] : [batchSize, held]
            ).withoutTransform
            // `horizon`: what this cycle read past, when it held every partition and read less than a batch
            // (the read's snapshot is at least as new as the lock statement's: its xmin is no lower)
            const readPast = held.length === partitions && rows.length < batchSize ? BigInt(locked[0]!.h) : undefined
            if (rows.length === 0) {
              return { partitions: held.length, published: 0, dead: 0, horizon: readPast, retryLater: undefined }
            }
            const now = yield* Clock.currentTimeMillis
            const nowIso = new Date(now).toISOString()
            // the well-formed rows: their envelopes and, at the same index, their seqs
            const messages: Array<Envelope.Encoded> = []
            const seqs: Array<string> = []
            const poison: Array<{ readonly seq: string; readonly reason: string; readonly error: string }> = []
            for (const row of rows) {
              const enc = toEncoded(row, rowCache)
              if (Result.isSuccess(enc)) {
                messages.push(enc.success)
                seqs.push(row.seq)
              } else poison.push({ seq: row.seq, reason: DeadReason.malformed, error: enc.failure.message })
            }
            // every message's own outcome: stored rows are marked, rows refused for good go aside, and rows
            // that failed for now stay for the next cycle. Nothing is published twice by this cycle, and one
            // refused row holds back nothing else
            const published: Array<string> = []
            const relayed: Array<Envelope.Encoded> = []
            let retryLater: BrokerError.BrokerError | undefined
            if (messages.length > 0) {
              const outcomes = yield* relaySpan(messages, publish(messages))
              for (let i = 0; i < outcomes.length; i++) {
                const o = outcomes[i]!
                if (o._tag === "Stored") {
                  published.push(seqs[i]!)
                  relayed.push(messages[i]!)
                } else if (o.error.isRetryable) retryLater ??= o.error
                else poison.push({ seq: seqs[i]!, reason: DeadReason.rejected, error: o.error.message })
              }
            }
            if (published.length > 0) {
              if (markAuditedSql !== undefined) {
                const at = yield* Audit.currentTime
                const params = [published, at, Audit.processName, auditTarget!.skipped]
                yield* sql.unsafe(markAuditedSql, retention === 0 ? params : [...params, nowIso])
              } else yield* sql.unsafe(markSql, retention === 0 ? [published] : [published, nowIso])
              yield* Metric.update(Metrics.relayBatchSize, published.length)
              const perTopic = new Map<string, number>()
              for (const m of relayed) perTopic.set(m.topic, (perTopic.get(m.topic) ?? 0) + 1)
              for (const [topic, n] of perTopic) yield* Metric.update(mRelayed({ topic }), n)
              // batched, off the cycle's transaction (the issue's transactional steps are the outbox insert, the
              // inbox and saga steps; a relayed row in the cycle held its locks longer)
              if (audit.enabled && markAuditedSql === undefined) {
                yield* Audit.recordWith(audit, "enqueue", "relayed", relayed)
              }
            }
            for (const p of poison) {
              yield* sql.unsafe(deadSql, [p.seq, p.reason, p.error, nowIso])
              yield* Effect.logWarning(`converge: outbox row ${p.seq} moved to ${dead} (${p.reason}): ${p.error}`)
            }
            return {
              partitions: held.length,
              published: published.length,
              dead: poison.length,
              // rows left for later: nothing is read past, and the cycle fails once committed (backoff)
              horizon: retryLater === undefined ? readPast : undefined,
              retryLater
            }
          })
        )
        .pipe(
          Effect.provideService(SqlClient.BeginTransaction, "BEGIN ISOLATION LEVEL READ COMMITTED"),
          sqlDefectsAsFailures,
          Effect.onExit((exit) =>
            Effect.sync(() => {
              counters.cycles++
              if (exit._tag === "Failure") {
                counters.failedCycles++
                return
              }
              const r = exit.value
              counters.published += r.published
              counters.dead += r.dead
              if (r.retryLater !== undefined) counters.failedCycles++
              // committed: only now is what it read past really behind us
              if (r.horizon !== undefined && r.horizon > horizon) horizon = r.horizon
            })
          ),
          // committed what it could; rows the broker failed for now make the cycle fail (and back off)
          Effect.flatMap(({ horizon: _, retryLater, ...result }) =>
            retryLater === undefined ? Effect.succeed<CycleResult>(result) : Effect.fail(retryLater)
          )
        )

    const drainWorker = (maxPartitions: number): Effect.Effect<number, SqlError | BrokerError.BrokerError> =>
      Effect.gen(function* () {
        let total = 0
        while (true) {
          const r = yield* cycleIn(maxPartitions)
          total += r.published + r.dead
          if (r.published + r.dead < batchSize) return total
        }
      })

    const drain: Effect.Effect<number, SqlError | BrokerError.BrokerError> =
      concurrency === 1
        ? drainWorker(partitions)
        : Effect.gen(function* () {
            const counts = yield* Effect.all(
              Array.from({ length: concurrency }, () => drainWorker(share)),
              { concurrency: "unbounded" }
            )
            // a worker stops when its last share had less than a batch; one sweep over every partition
            // picks up what the shares of the other workers held back
            const sweep = yield* drainWorker(partitions)
            return counts.reduce((a, b) => a + b, sweep)
          })

    const cleanup = Effect.flatMap(Clock.currentTimeMillis, (now) =>
      deleteExpired(sql, outbox, "published_at IS NOT NULL AND published_at < $1", now - retention)
    )

    const lag = Effect.provideService(backlog, SqlStore, store)

    return {
      service: OutboxRelay.of({
        nudge: Effect.sync(() => store.nudge()),
        drain,
        cycle: cycleIn(partitions),
        cleanup,
        lag,
        stats: Effect.sync(() => ({ ...counters }))
      }),
      horizon: () => horizon,
      counters
    }
  })

/**
 * Runs a relay until interrupted: drains on every wake-up (nudge, `NOTIFY`,
 * poll), retries failed cycles on the `retry` schedule, cleans up by
 * retention. Fails only on invalid options (at once); every other error is logged and retried.
 *
 * @since 0.1.0
 */
export const run = (options?: Options): Effect.Effect<never, InvalidOption, SqlStore | Broker.Broker> =>
  Effect.flatMap(makeRelay(options), (relay) => runWith(relay, options))

/** The background loops of {@link run} over a relay already built (the layer's own). */
/**
 * The relay's publish of a cycle's messages, in a producer span linked to each message's publisher span
 * (its `traceparent`), when any has one.
 */
const relaySpan = <A, E, R>(messages: ReadonlyArray<Envelope.Encoded>, effect: Effect.Effect<A, E, R>) => {
  const links: Array<Tracer.SpanLink> = []
  for (const m of messages) {
    if (m.headers.traceparent === undefined) continue
    const parent = Envelope.traceParentOf(m.headers)
    if (Option.isSome(parent)) links.push({ span: parent.value, attributes: { "messaging.message.id": m.id } })
  }
  return links.length === 0
    ? effect
    : Effect.withSpan(effect, "converge.relay", {
        kind: "producer",
        links,
        attributes: {
          "messaging.system": "converge",
          "messaging.operation.type": "send",
          "messaging.batch.message_count": messages.length
        }
      })
}

const runWith = (
  { service: relay, horizon, counters }: Relay,
  options: Options | undefined
): Effect.Effect<never, never, SqlStore> =>
  Effect.gen(function* () {
    const store = yield* SqlStore
    const pollInterval = Duration.fromInputUnsafe(options?.pollInterval ?? "1 second")
    const cleanupInterval = Duration.fromInputUnsafe(options?.cleanupInterval ?? "1 minute")
    const retry: Schedule.Schedule<unknown, unknown> = options?.retry ?? Retry.exponential("100 millis", "5 seconds")

    if (options?.listen !== false) {
      const pg = yield* Effect.serviceOption(PgClient.PgClient)
      // PGlite answers LISTEN through its socket server by hanging (and has one connection to hang):
      // never listen there
      const version = yield* store.sql.unsafe<{ readonly v: string }>(`SELECT version() AS v`).withoutTransform.pipe(
        Effect.map((rows) => String(rows[0]?.v ?? "")),
        Effect.orElseSucceed(() => "")
      )
      if (version.includes("PGlite")) {
        yield* Effect.logDebug("converge: outbox relay on PGlite: no LISTEN, after-commit nudge and poll only")
      } else if (Option.isSome(pg)) {
        // a notification for a transaction already read past wakes nothing
        const notified = (payload: string): void => {
          counters.notifications++
          const xid = parseXid(payload)
          if (xid !== undefined && xid < horizon()) counters.notificationsCovered++
          else store.nudge(payload)
        }
        yield* Effect.forkScoped(listen(pg.value, store, notified))
      }
    }
    yield* Effect.forkScoped(
      relay.cleanup.pipe(
        Effect.tap((n) =>
          n > 0 ? Effect.logDebug(`converge: outbox cleanup deleted ${n} published rows`) : Effect.void
        ),
        Effect.catchCause((cause) => Effect.logWarning("converge: outbox cleanup failed; retrying later", cause)),
        Effect.delay(cleanupInterval),
        Effect.forever
      )
    )
    const gaugeInterval = Duration.fromInputUnsafe(options?.gaugeInterval ?? "15 seconds")
    if (Duration.toMillis(gaugeInterval) > 0) {
      yield* Effect.forkScoped(
        relay.lag.pipe(
          Effect.flatMap(({ unpublished, oldestMillis }) =>
            Effect.andThen(
              Metric.update(Metrics.outboxBacklog, unpublished),
              Metric.update(Metrics.outboxOldestAge, oldestMillis / 1000)
            )
          ),
          Effect.catchCause((cause) => Effect.logDebug("converge: sampling the outbox backlog failed", cause)),
          Effect.andThen(Effect.sleep(gaugeInterval)),
          Effect.forever
        )
      )
    }
    // Defects too (effect/sql dies when a rollback fails on a dead connection): the relay never stops.
    const drainRetried = relay.drain.pipe(
      Effect.sandbox,
      Effect.tapError((cause) => Effect.logWarning("converge: outbox relay cycle failed; retrying", cause)),
      Effect.retry(retry),
      Effect.ignore
    )
    const pollMillis = Duration.toMillis(pollInterval)
    // A committed transaction named by a wake-up but not yet read past is held back by an older transaction
    // still running somewhere in the cluster (the xmin gate): try again soon instead of waiting for the poll,
    // every quarter of the time it has been held back so far (at least 1 ms, at most 1 second or the poll
    // interval): a short hold-back is seen out within a few ms, a long transaction costs a cycle a second.
    const heldBackCap = Math.max(1, Math.min(pollMillis, 1000))
    let wanted = -1n
    let heldBackSince: number | undefined
    while (true) {
      const serving = store.takeWakeups()
      if (serving.highestXid > wanted) wanted = serving.highestXid
      yield* drainRetried
      // wake-ups that came during the drain and name only transactions it read past ask for nothing more
      const meanwhile = store.peekWakeups()
      if (meanwhile.count > 0 && !meanwhile.anonymous && meanwhile.highestXid < horizon()) store.takeWakeups()
      if (wanted >= horizon()) {
        const now = yield* Clock.currentTimeMillis
        heldBackSince ??= now
        const delay = Math.min(heldBackCap, Math.max(1, Math.floor((now - heldBackSince) / 4)))
        counters.heldBackRetries++
        yield* Effect.raceFirst(store.awaitNudge, Effect.sleep(delay))
      } else {
        heldBackSince = undefined
        yield* Effect.raceFirst(store.awaitNudge, Effect.sleep(pollInterval))
      }
    }
  }).pipe(Effect.scoped)

const listen = (
  pg: PgClient.PgClient,
  store: SqlStore["Service"],
  notified: (payload: string) => void
): Effect.Effect<void> =>
  Effect.scoped(
    Effect.gen(function* () {
      const queue = yield* pg.listen(store.channel).pipe(Effect.timeout("10 seconds"))
      yield* Effect.logDebug(`converge: outbox relay listening on ${store.channel}`)
      store.nudge()
      while (true) {
        notified((yield* Queue.take(queue)).payload)
      }
    })
  ).pipe(
    Effect.sandbox,
    Effect.tapError((cause) =>
      Effect.logWarning("converge: outbox LISTEN failed; relying on the poll, listening again later", cause)
    ),
    Effect.retry(Retry.exponential("500 millis", "30 seconds")),
    Effect.ignore
  )

/**
 * The relay as a background Layer: runs {@link run} in the layer's scope and
 * provides the {@link OutboxRelay} service (for `nudge`, `drain`, `lag`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<OutboxRelay, InvalidOption, SqlStore | Broker.Broker> =>
  Layer.effect(
    OutboxRelay,
    Effect.gen(function* () {
      const relay = yield* makeRelay(options)
      const fiber = yield* Effect.forkScoped(runWith(relay, options))
      yield* Effect.addFinalizer(() => Fiber.interrupt(fiber))
      return relay.service
    })
  )

/**
 * The outbox backlog of the store in context: rows not yet published and the age of the oldest, without a
 * relay (what `converge status` reads; a relay's `lag` is the same query).
 *
 * @since 0.1.0
 */
export const backlog: Effect.Effect<Lag, SqlError, SqlStore> = Effect.gen(function* () {
  const store = yield* SqlStore
  const rows = yield* store.sql.unsafe<{ readonly n: number; readonly oldest: unknown }>(
    `SELECT count(*)::int AS n, min(created_at) AS oldest FROM ${store.table("outbox")} WHERE published_at IS NULL`
  )
  const now = yield* Clock.currentTimeMillis
  const oldest = rows[0]?.oldest
  const oldestMillis = oldest instanceof Date ? Math.max(0, now - oldest.getTime()) : 0
  return { unpublished: Number(rows[0]?.n ?? 0), oldestMillis }
})

/**
 * How many rows the relay moved aside to `outbox_dead`.
 *
 * @since 0.1.0
 */
export const deadCount: Effect.Effect<number, SqlError, SqlStore> = Effect.gen(function* () {
  const store = yield* SqlStore
  const rows = yield* store.sql.unsafe<{ readonly n: number }>(
    `SELECT count(*)::int AS n FROM ${store.table("outbox_dead")}`
  ).withoutTransform
  return Number(rows[0]?.n ?? 0)
})

/**
 * Lists the rows the relay moved aside (newest first).
 *
 * @since 0.1.0
 */
export const deadRows = (limit = 100): Effect.Effect<ReadonlyArray<DeadRow>, SqlError, SqlStore> =>
  Effect.gen(function* () {
    const store = yield* SqlStore
    const rows = yield* store.sql.unsafe<{
      readonly seq: string
      readonly message_id: string
      readonly topic: string
      readonly reason: string
      readonly error: string
      readonly moved_at: string
    }>(
      `SELECT seq::text AS seq, message_id, topic, reason, error,
         to_char(moved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS moved_at
       FROM ${store.table("outbox_dead")} ORDER BY moved_at DESC, seq DESC LIMIT $1::int`,
      [limit]
    ).withoutTransform
    return rows.map((r) => ({
      seq: r.seq,
      messageId: r.message_id,
      topic: r.topic,
      reason: r.reason,
      error: r.error,
      movedAt: r.moved_at
    }))
  })

/**
 * Moves rows of `outbox_dead` back into the outbox (all of them when `seqs`
 * is omitted), once the cause is fixed (a broker limit raised, a topic
 * renamed by hand with `UPDATE outbox_dead SET topic = ...`). They get new
 * sequence numbers and the current transaction id, so they are published
 * after what is already waiting; message ids are kept (consumers' inboxes
 * still recognise them). Runs in one transaction; returns how many moved.
 *
 * @since 0.1.0
 */
export const requeueDead = (seqs?: ReadonlyArray<string>): Effect.Effect<number, SqlError, SqlStore> =>
  Effect.gen(function* () {
    const store = yield* SqlStore
    const dead = store.table("outbox_dead")
    const columns = outboxColumns.join(", ")
    const rows = yield* store.sql.withTransaction(
      store.sql.unsafe<{ readonly n: number }>(
        `WITH moved AS (DELETE FROM ${dead} ${seqs === undefined ? "" : "WHERE seq = ANY($1::bigint[])"} RETURNING ${columns}),
              requeued AS (INSERT INTO ${store.table("outbox")} (${columns}) SELECT ${columns} FROM moved RETURNING 1)
         SELECT count(*)::int AS n FROM requeued`,
        seqs === undefined ? [] : [seqs]
      ).withoutTransform
    )
    const n = Number(rows[0]?.n ?? 0)
    if (n > 0) store.nudge()
    return n
  })
