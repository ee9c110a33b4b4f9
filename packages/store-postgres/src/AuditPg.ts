/**
 * `AuditPg` — the audit trail in Postgres (the store's `audit` table).
 *
 * The sink writes an event of a transactional step **in that step's
 * transaction** — `Outbox.publish` (published), an inbox-handled message
 * (handled), a saga step — so the row commits and rolls back with the step.
 * Other events (relayed, retried, dead-lettered, delivered, ...) are buffered and written in batches, every
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
import { Clock, Duration, Effect, Latch, Layer, Semaphore } from "effect"
import type { SqlClient } from "effect/sql"
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
  readonly topic: string
  readonly group_name: string | null
  readonly process: string
  readonly message_id: string
  readonly correlation_id: string | null
  readonly causation_id: string | null
  readonly attempt: number | null
  readonly reason: string | null
  readonly error: string | null
  readonly delay_ms: string | null
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

/**
 * A per-item column as an array parameter: `null` when no item has a value (the driver cannot type an
 * all-null array).
 *
 * @internal
 */
export const column = <T, A>(items: ReadonlyArray<T>, get: (item: T) => A | undefined): Array<A | null> | null => {
  let any = false
  const out = items.map((item) => {
    const v = get(item)
    if (v !== undefined) any = true
    return v ?? null
  })
  return any ? out : null
}

const fail = (operation: string) => (cause: unknown) => new Audit.AuditError({ operation, cause })

/**
 * What the outbox relay needs to write its `relayed` events itself, in the statement that marks the rows:
 * the audit table, and the topics not audited. Registered for the sinks this module makes whose sampling
 * is all-or-nothing per topic (a fractional share needs the per-message hash, in JavaScript).
 */
interface SqlTarget {
  /** The client of the sink's store: a statement on another client (another database) cannot write it. */
  readonly sql: SqlClient.SqlClient
  readonly table: string
  /** Topics whose share is 0. */
  readonly skipped: ReadonlyArray<string>
}

const sqlTargets = new WeakMap<Audit.Sink, SqlTarget>()

/**
 * The audit table a sink of this module writes to, when events for a topic are either all recorded or none
 * (so SQL can filter them) and the sink's store is on `sql` (a statement of that client can write it);
 * `undefined` otherwise.
 *
 * @internal
 */
export const sqlTargetOf = (sink: Audit.Sink, sql: SqlClient.SqlClient): SqlTarget | undefined => {
  const target = sqlTargets.get(sink)
  return target !== undefined && target.sql === sql ? target : undefined
}

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
    const insertSql = `INSERT INTO ${audit} (at, kind, topic, group_name, process, message_ids, correlation_ids,
        causation_ids, attempts, reasons, errors, delays_ms, details)
      VALUES (to_timestamp($1::float8 / 1000.0), $2, $3, $4, $5, $6::text[], $7::text[], $8::text[], $9::int[],
        $10::text[], $11::text[], $12::bigint[], $13::text[])`
    /** One row per kind, topic, group, process and moment: a relay cycle or a consumer's read is one row. */
    const insert = (events: ReadonlyArray<Audit.Event>) =>
      Effect.suspend(() => {
        if (events.length === 0) return Effect.void
        // a batch is mostly one group (a relay cycle's topic, a consumer's read): compare with the groups
        // found so far, newest first, rather than build a key string per event
        const groups: Array<Array<Audit.Event>> = []
        for (const e of events) {
          let list: Array<Audit.Event> | undefined
          for (let i = groups.length - 1; i >= 0; i--) {
            const head = groups[i]![0]!
            if (
              head.at === e.at &&
              head.kind === e.kind &&
              head.topic === e.topic &&
              head.group === e.group &&
              head.process === e.process
            ) {
              list = groups[i]
              break
            }
          }
          if (list === undefined) groups.push([e])
          else list.push(e)
        }
        return Effect.forEach(
          groups,
          (batch) => {
            const first = batch[0]!
            return sql.unsafe(insertSql, [
              first.at,
              first.kind,
              first.topic,
              first.group ?? null,
              first.process,
              batch.map((e) => e.messageId),
              column(batch, (e) => e.correlationId),
              column(batch, (e) => e.causationId),
              column(batch, (e) => e.attempt),
              column(batch, (e) => e.reason),
              column(batch, (e) => e.error),
              column(batch, (e) => e.delayMs),
              column(batch, (e) => e.detail)
            ]).withoutTransform
          },
          { discard: true }
        )
      })

    let buffer: Array<Audit.Event> = []
    // one flush at a time: a query that flushes waits for a flush already writing, so it sees its events
    const lock = yield* Semaphore.make(1)
    const flush = lock.withPermits(1)(
      Effect.suspend(() => {
        if (buffer.length === 0) return Effect.void
        const events = buffer
        buffer = []
        // one transaction per flush (one commit, not one per row), without waiting for the WAL flush: these
        // events were only in memory until now, so a crash loses at most the last flush either way
        return sql
          .withTransaction(
            Effect.andThen(sql.unsafe("SET LOCAL synchronous_commit = off").withoutTransform, insert(events))
          )
          .pipe(
            Effect.catch((e) => Effect.logWarning(`audit: writing ${events.length} events failed; they are dropped`, e))
          )
      })
    )
    // the flusher writes every `flushEvery`, or at once when `batchSize` events are buffered: woken, not awaited,
    // so a relay cycle or a consumer's read does not wait for the audit's transaction (awaiting it here cost
    // the drain a third of the audit's price). Only a flusher `backlog` batches behind makes writers wait
    const wake = yield* Latch.make()
    const backlog = batchSize * 8
    yield* Effect.forkScoped(
      Effect.forever(
        Effect.raceFirst(Effect.sleep(flushEvery), wake.await).pipe(Effect.andThen(wake.close), Effect.andThen(flush))
      )
    )
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
      deliveries: options?.deliveries ?? false,
      records,
      // in the caller's transaction when there is one (the same client): commits and rolls back with it
      write: (events) => Effect.orDie(insert(events)),
      enqueue: (events) =>
        Effect.suspend(() => {
          for (const e of events) buffer.push(e)
          if (buffer.length >= backlog) return flush
          if (buffer.length >= batchSize) wake.openUnsafe()
          return Effect.void
        })
    }
    const shares = [options?.default, ...Object.values(options?.topics ?? {})]
    if (shares.every((v) => v === undefined || typeof v === "boolean" || v === 0 || v === 1)) {
      const everything = options?.default === undefined || options.default === true || options.default === 1
      if (everything) {
        sqlTargets.set(sink, {
          sql,
          table: audit,
          skipped: Object.entries(options?.topics ?? {})
            .filter(([, v]) => v === false || v === 0)
            .map(([t]) => t)
        })
      }
    }
    const log = Audit.AuditLog.of({
      query: (filter) =>
        Effect.gen(function* () {
          // row filters (indexed) narrow the batches; event filters pick the events out of them
          const rowWhere: Array<string> = []
          const eventWhere: Array<string> = []
          const params: Array<unknown> = []
          const param = (value: unknown) => {
            params.push(value)
            return `$${params.length}`
          }
          if (filter.messageId !== undefined) {
            const p = param(filter.messageId)
            rowWhere.push(`a.message_ids @> ARRAY[${p}::text]`)
            eventWhere.push(`u.message_id = ${p}`)
          }
          if (filter.correlationId !== undefined) {
            const p = param(filter.correlationId)
            rowWhere.push(`(a.correlation_ids @> ARRAY[${p}::text] OR a.message_ids @> ARRAY[${p}::text])`)
            eventWhere.push(`(u.correlation_id = ${p} OR u.message_id = ${p})`)
          }
          if (filter.topic !== undefined) rowWhere.push(`a.topic = ${param(filter.topic)}`)
          if (filter.group !== undefined) rowWhere.push(`a.group_name = ${param(filter.group)}`)
          if (filter.kinds !== undefined) rowWhere.push(`a.kind = ANY(${param(filter.kinds)}::text[])`)
          if (filter.from !== undefined) rowWhere.push(`a.at >= to_timestamp(${param(filter.from)}::float8 / 1000.0)`)
          if (filter.to !== undefined) rowWhere.push(`a.at < to_timestamp(${param(filter.to)}::float8 / 1000.0)`)
          const limit = Math.max(1, Math.min(100_000, Math.trunc(filter.limit ?? 1_000)))
          const where = [...rowWhere, ...eventWhere]
          // what is still buffered is part of the trail: write it first
          yield* flush
          const rows = yield* sql.unsafe<Row>(
            `SELECT (a.seq * 100000 + u.n)::text AS seq, (extract(epoch from a.at) * 1000)::float8 AS at_ms, a.kind,
               a.topic, a.group_name, a.process, u.message_id, u.correlation_id, u.causation_id, u.attempt, u.reason,
               u.error, u.delay_ms::text AS delay_ms, u.detail
             FROM ${audit} a,
               unnest(a.message_ids, a.correlation_ids, a.causation_ids, a.attempts, a.reasons, a.errors, a.delays_ms,
                 a.details) WITH ORDINALITY
                 AS u(message_id, correlation_id, causation_id, attempt, reason, error, delay_ms, detail, n)
             ${where.length === 0 ? "" : `WHERE ${where.join(" AND ")}`}
             ORDER BY a.at, a.seq, u.n LIMIT ${limit}`,
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
