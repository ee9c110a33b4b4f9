/**
 * `AuditPg` — the audit trail in Postgres (the store's `audit` table).
 *
 * The sink writes an event of a transactional step **in that step's
 * transaction** — `Outbox.publish` (published), the relay's cycle (relayed),
 * an inbox-handled message (handled), a saga step — so the row commits and
 * rolls back with the step. Other events (delivered, retried,
 * dead-lettered, ...) are buffered and written in batches, every
 * `flushInterval` or `batchSize` events, and once more when the layer
 * closes.
 *
 * ```ts
 * const Live = AuditPg.layer({ topics: { "metrics.ticks": false }, retention: "30 days" }).pipe(
 *   Layer.provideMerge(SqlStore.layer())
 * )
 * ```
 *
 * @since 0.1.0
 */

import { Audit } from "@converge/core"
import { Clock, Duration, Effect, Layer, Semaphore } from "effect"
import { deleteExpired, SqlStore } from "./SqlStore.ts"

/**
 * Options of {@link layer}: which topics are audited (see `Audit.Options`), batching and retention.
 *
 * @since 0.1.0
 */
export interface Options extends Audit.Options {
  /** How often buffered events are written (default 200 ms). */
  readonly flushInterval?: Duration.Input | undefined
  /** Write at once when this many events are buffered (default 500). */
  readonly batchSize?: number | undefined
  /** Delete events older than this (default: keep; e.g. `"30 days"`); checked every hour. */
  readonly retention?: Duration.Input | undefined
}

interface Row {
  readonly seq: string
  readonly at_ms: number
  readonly kind: Audit.Kind
  readonly message_id: string
  readonly topic: string
  readonly group_name: string | null
  readonly correlation_id: string | null
  readonly causation_id: string | null
  readonly attempt: number | null
  readonly reason: string | null
  readonly error: string | null
  readonly delay_ms: string | null
  readonly process: string
  readonly detail: string | null
}

const fromRow = (r: Row): Audit.Stored => {
  const e: { -readonly [K in keyof Audit.Stored]: Audit.Stored[K] } = {
    seq: Number(r.seq),
    kind: r.kind,
    messageId: r.message_id,
    topic: r.topic,
    at: Number(r.at_ms),
    process: r.process
  }
  if (r.group_name !== null) e.group = r.group_name
  if (r.correlation_id !== null) e.correlationId = r.correlation_id
  if (r.causation_id !== null) e.causationId = r.causation_id
  if (r.attempt !== null) e.attempt = r.attempt
  if (r.reason !== null) e.reason = r.reason
  if (r.error !== null) e.error = r.error
  if (r.delay_ms !== null) e.delayMs = Number(r.delay_ms)
  if (r.detail !== null) e.detail = r.detail
  return e
}

const fail = (operation: string) => (cause: unknown) => new Audit.AuditError({ operation, cause })

/**
 * The sink and the log over the store in context; the flush and retention fibers live in the scope.
 *
 * @since 0.1.0
 */
export const make = (options?: Options) =>
  Effect.gen(function* () {
    const { sql, table } = yield* SqlStore
    const audit = table("audit")
    const records = Audit.recorder(options)
    const flushEvery = Duration.fromInputUnsafe(options?.flushInterval ?? "200 millis")
    const batchSize = options?.batchSize ?? 500
    // one JSON parameter for the batch (the driver cannot type an array parameter of nulls only)
    const insertSql = `INSERT INTO ${audit} (at, kind, message_id, topic, group_name, correlation_id, causation_id,
        attempt, reason, error, delay_ms, process, detail)
      SELECT to_timestamp(u.at / 1000.0), u.kind, u.mid, u.topic, u.grp, u.corr, u.caus, u.att, u.reason, u.err, u.delay,
        u.proc, u.detail
      FROM jsonb_to_recordset($1::jsonb) AS u(at float8, kind text, mid text, topic text, grp text, corr text, caus text,
        att int, reason text, err text, delay bigint, proc text, detail text)`
    const insert = (events: ReadonlyArray<Audit.Event>) =>
      events.length === 0
        ? Effect.void
        : sql
            .unsafe(insertSql, [
              JSON.stringify(
                events.map((e) => ({
                  at: e.at,
                  kind: e.kind,
                  mid: e.messageId,
                  topic: e.topic,
                  grp: e.group,
                  corr: e.correlationId,
                  caus: e.causationId,
                  att: e.attempt,
                  reason: e.reason,
                  err: e.error,
                  delay: e.delayMs,
                  proc: e.process,
                  detail: e.detail
                }))
              )
            ])
            .withoutTransform.pipe(Effect.asVoid)

    let buffer: Array<Audit.Event> = []
    // one flush at a time: a query that flushes waits for a flush already writing, so it sees its events
    const lock = yield* Semaphore.make(1)
    const flush = lock.withPermits(1)(
      Effect.suspend(() => {
        if (buffer.length === 0) return Effect.void
        const events = buffer
        buffer = []
        return insert(events).pipe(
          Effect.catch((e) => Effect.logWarning(`audit: writing ${events.length} events failed; they are dropped`, e))
        )
      })
    )
    yield* Effect.forkScoped(Effect.forever(Effect.andThen(Effect.sleep(flushEvery), flush)))
    yield* Effect.addFinalizer(() => flush)
    if (options?.retention !== undefined) {
      const keep = Duration.toMillis(Duration.fromInputUnsafe(options.retention))
      yield* Effect.forkScoped(
        Effect.forever(
          Effect.gen(function* () {
            const now = yield* Clock.currentTimeMillis
            yield* deleteExpired(sql, audit, "at < $1", now - keep).pipe(Effect.ignore)
            yield* Effect.sleep("1 hour")
          })
        )
      )
    }

    const sink: Audit.Sink = {
      enabled: true,
      records,
      // in the caller's transaction when there is one (the same client): commits and rolls back with it
      write: (events) => Effect.orDie(insert(events)),
      enqueue: (events) =>
        Effect.suspend(() => {
          for (const e of events) buffer.push(e)
          return buffer.length >= batchSize ? flush : Effect.void
        })
    }
    const log = Audit.AuditLog.of({
      query: (filter) =>
        Effect.gen(function* () {
          const where: Array<string> = []
          const params: Array<unknown> = []
          const add = (clause: (n: number) => string, value: unknown) => {
            params.push(value)
            where.push(clause(params.length))
          }
          if (filter.messageId !== undefined) add((n) => `message_id = $${n}`, filter.messageId)
          if (filter.correlationId !== undefined)
            add((n) => `(correlation_id = $${n} OR message_id = $${n})`, filter.correlationId)
          if (filter.topic !== undefined) add((n) => `topic = $${n}`, filter.topic)
          if (filter.group !== undefined) add((n) => `group_name = $${n}`, filter.group)
          if (filter.kinds !== undefined) add((n) => `kind = ANY($${n}::text[])`, filter.kinds)
          if (filter.from !== undefined) add((n) => `at >= to_timestamp($${n}::float8 / 1000.0)`, filter.from)
          if (filter.to !== undefined) add((n) => `at < to_timestamp($${n}::float8 / 1000.0)`, filter.to)
          const limit = Math.max(1, Math.min(100_000, Math.trunc(filter.limit ?? 1_000)))
          // what is still buffered is part of the trail: write it first
          yield* flush
          const rows = yield* sql.unsafe<Row>(
            `SELECT seq::text AS seq, (extract(epoch from at) * 1000)::float8 AS at_ms, kind, message_id, topic,
               group_name, correlation_id, causation_id, attempt, reason, error, delay_ms::text AS delay_ms, process, detail
             FROM ${audit} ${where.length === 0 ? "" : `WHERE ${where.join(" AND ")}`} ORDER BY at, seq LIMIT ${limit}`,
            params
          ).withoutTransform
          return rows.map(fromRow)
        }).pipe(Effect.mapError(fail("query"))),
      cleanup: (before) => deleteExpired(sql, audit, "at < $1", before).pipe(Effect.mapError(fail("cleanup")))
    })
    return { sink, log }
  })

/**
 * The audit trail in the store's `audit` table: provides the sink the runtime writes to, and the log.
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Audit.AuditLog, never, SqlStore> =>
  Layer.unwrap(
    Effect.map(make(options), ({ sink, log }) =>
      Layer.merge(Layer.succeed(Audit.AuditLog, log), Layer.succeed(Audit.AuditSink, sink))
    )
  )
