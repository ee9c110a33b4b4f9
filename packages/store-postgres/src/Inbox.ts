/**
 * `Inbox` — exactly-once effects over at-least-once delivery (stage 5).
 *
 * Delivery is at-least-once: a message can arrive twice (a lost ack, a
 * consumer that died after committing, a relay that died after publishing).
 * The inbox makes the **effect** exactly-once: `Inbox.once` inserts
 * `(consumer, message id)` into the `inbox` table in the **same transaction**
 * as the handler's writes. A second delivery finds the row and is skipped
 * (and then acked); if the transaction rolls back, the row goes with it and
 * the retry runs the handler again. Two deliveries racing each other are
 * serialised by the primary key: the second waits for the first to commit,
 * then skips.
 *
 * ```ts
 * Consumer.make(Orders, {
 *   group: "billing",
 *   handle: Inbox.handler((order, ctx) =>
 *     Effect.gen(function* () {
 *       const sql = yield* SqlClient.SqlClient
 *       yield* sql`INSERT INTO invoices ${sql.insert({ order_id: order.id })}` // same transaction
 *       yield* Outbox.publish(InvoiceCreated, { orderId: order.id })           // and this too
 *     })
 *   )
 * })
 * ```
 *
 * Retention: inbox rows are deleted after `retention` (default 30 days). A
 * duplicate arriving later than that would run again, so keep it longer than
 * any redelivery or replay horizon: the broker's claim and retry delays, the
 * longest outage after which a relay republishes, and how long messages may
 * wait in a dead-letter queue before a replay (a replayed message that never
 * succeeded has no inbox row, and runs; one that did succeed is skipped).
 *
 * Audit: with an `Audit` sink in context, each handled message gets its `handled` event in the same
 * transaction. With `AuditPg` on this database (and the topic audited whole), the claim statement writes
 * it — no statement of its own; its time is the claim's.
 *
 * @since 0.1.0
 */

import { Audit, type Consumer, type Envelope, Name } from "@converge/core"
import { Clock, Context, Duration, Effect, Layer, Option, Schema } from "effect"
import type { SqlError } from "effect/sql/SqlError"
import { column, sqlTargetOf } from "./AuditPg.ts"
import { requireOpenTransaction, Transaction, transactionIn } from "./Outbox.ts"
import { deleteExpired, SqlStore } from "./SqlStore.ts"

/**
 * The message was already processed by this consumer: its inbox row exists
 * (committed by an earlier transaction). Raised by {@link claim}; `once`
 * turns it into a skip.
 *
 * @since 0.1.0
 */
export class AlreadyProcessed extends Schema.TaggedError<AlreadyProcessed>(
  "@converge/store-postgres/Inbox/AlreadyProcessed"
)("AlreadyProcessed", { consumer: Schema.String, messageId: Schema.String }) {
  /** Names the consumer and the message. */
  override get message(): string {
    return `message ${this.messageId} was already processed by ${this.consumer}`
  }
}

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Keep inbox rows this long (default 30 days). See the module docs before lowering it. */
  readonly retention?: Duration.Input | undefined
  /** Run the retention cleanup this often (default 10 minutes; `0` disables the background cleanup). */
  readonly cleanupInterval?: Duration.Input | undefined
}

/**
 * What identifies a processed message in the inbox: the consumer group, the topic and the message id
 * (ids are unique per producer, not across the world: two topics may carry the same id). A handler's
 * `Consumer.MessageContext` is one.
 *
 * @since 0.1.0
 */
export interface MessageKey {
  readonly group: string
  readonly topic: string
  readonly id: string
}

/**
 * The inbox service.
 *
 * @since 0.1.0
 */
export class Inbox extends Context.Service<
  Inbox,
  {
    /**
     * Records the message for its group in the current transaction; fails with
     * {@link AlreadyProcessed} when it is there (roll the transaction back).
     */
    readonly claim: (message: MessageKey) => Effect.Effect<void, AlreadyProcessed | SqlError, Transaction>
    /**
     * Runs `effect` in a transaction that first claims the message: returns
     * `Option.some(result)` after commit, or `Option.none()` without running
     * `effect` when the message was already processed.
     */
    readonly once: <A, E, R>(
      message: MessageKey,
      effect: Effect.Effect<A, E, R>
    ) => Effect.Effect<Option.Option<A>, E | SqlError, Exclude<R, Transaction>>
    /**
     * The batch form of {@link once}: one transaction claims every message
     * of `items` for `group` (one statement) and runs `effect` with those that
     * were not processed yet, in order (duplicates within `items` count once).
     */
    readonly onceAll: <T extends { readonly context: { readonly id: string; readonly topic: string } }, A, E, R>(
      group: string,
      items: ReadonlyArray<T>,
      effect: (fresh: ReadonlyArray<T>) => Effect.Effect<A, E, R>
    ) => Effect.Effect<A, E | SqlError, Exclude<R, Transaction>>
    /** Whether the group has processed the message (its row is there). */
    readonly isProcessed: (message: MessageKey) => Effect.Effect<boolean, SqlError>
    /** Deletes rows older than the retention; returns how many. */
    readonly cleanup: Effect.Effect<number, SqlError>
  }
>()("@converge/store-postgres/Inbox") {}

/**
 * The default inbox retention.
 *
 * @since 0.1.0
 */
export const defaultRetention: Duration.Duration = Duration.days(30)

/**
 * Builds the inbox over the `SqlStore` in context.
 *
 * @since 0.1.0
 */
export const make = (options?: Options): Effect.Effect<Inbox["Service"], never, SqlStore> =>
  Effect.gen(function* () {
    const store = yield* SqlStore
    const { sql } = store
    const table = store.table("inbox")
    const retention = Duration.toMillis(Duration.fromInputUnsafe(options?.retention ?? defaultRetention))
    // rows written before the topic joined the key (migration 3) have topic '': while any may remain, a
    // claim also finds those (an index probe on the same key), so an upgrade repeats no effect
    const legacy = yield* sql
      .unsafe<{ readonly value: string }>(
        `SELECT value FROM ${store.table("settings")} WHERE name = 'inbox_legacy_rows'`
      )
      .pipe(
        Effect.map((rows) => rows.length > 0),
        Effect.orElseSucceed(() => false)
      )
    let legacyRows = legacy
    const legacyCheck = `WHERE NOT EXISTS (SELECT 1 FROM ${table} l WHERE l.message_id = id AND l.consumer = $1 AND l.topic = '')`
    const insertSql = (withLegacy: boolean) =>
      `INSERT INTO ${table} (consumer, message_id, topic, processed_at)
      SELECT $1, id, $4, $3 FROM unnest($2::text[]) AS id
      ${withLegacy ? legacyCheck : ""}
      ON CONFLICT DO NOTHING RETURNING message_id`
    const plainInsert = insertSql(false)
    const legacyInsert = insertSql(true)
    /**
     * The claim that also writes the claimed messages' `handled` audit row (AuditPg in this database): one
     * statement, no round trip of its own inside the handler's transaction — a separate insert there held
     * every read of the consumer back, measured at ~10% of the outbox drain. In the transaction, so it
     * commits and rolls back with the effect. `$5` the event time, `$6` the process; with `extras`, `$7`..`$9`
     * the correlation ids, causation ids and attempts, parallel to the ids (otherwise none, none, all 1).
     */
    const auditedInsertSql = (auditTable: string, withLegacy: boolean, extras: boolean) =>
      extras
        ? `WITH input AS (
            SELECT * FROM unnest($2::text[], $7::text[], $8::text[], $9::int[]) WITH ORDINALITY
              AS u(id, correlation_id, causation_id, attempt, n)
          ), claimed AS (
            INSERT INTO ${table} (consumer, message_id, topic, processed_at)
            SELECT $1, id, $4, $3 FROM input ${withLegacy ? legacyCheck : ""}
            ON CONFLICT DO NOTHING RETURNING message_id
          ), audited AS (
            INSERT INTO ${auditTable} (at, kind, topic, group_name, process, message_ids, correlation_ids,
              causation_ids, attempts)
            SELECT to_timestamp($5::float8 / 1000.0), 'handled', $4, $1, $6, array_agg(i.id ORDER BY i.n),
              array_agg(i.correlation_id ORDER BY i.n), array_agg(i.causation_id ORDER BY i.n),
              array_agg(i.attempt ORDER BY i.n)
            FROM claimed c JOIN (SELECT DISTINCT ON (id) * FROM input ORDER BY id, n) i ON i.id = c.message_id
            HAVING count(*) > 0
          )
          SELECT message_id FROM claimed`
        : `WITH claimed AS (
            INSERT INTO ${table} (consumer, message_id, topic, processed_at)
            SELECT $1, id, $4, $3 FROM unnest($2::text[]) AS id ${withLegacy ? legacyCheck : ""}
            ON CONFLICT DO NOTHING RETURNING message_id
          ), audited AS (
            INSERT INTO ${auditTable} (at, kind, topic, group_name, process, message_ids, attempts)
            SELECT to_timestamp($5::float8 / 1000.0), 'handled', $4, $1, $6, array_agg(message_id),
              array_fill(1, ARRAY[count(*)::int])
            FROM claimed HAVING count(*) > 0
          )
          SELECT message_id FROM claimed`

    /** What an audited claim writes with the ids: the messages' envelopes and attempts, in the ids' order. */
    interface Audited {
      readonly table: string
      readonly envelopes: ReadonlyArray<Envelope.Encoded>
      readonly attempts: ReadonlyArray<number>
    }

    /**
     * Inserts the rows in the current transaction (one statement); returns the ids that were new. The ids
     * go as one binary `text[]` parameter: nothing to quote, nothing for the server to parse. With `audited`,
     * the statement also writes the new ones' `handled` row.
     */
    const tryClaim = (
      consumer: string,
      topic: string,
      ids: ReadonlyArray<string>,
      audited?: Audited
    ): Effect.Effect<ReadonlyArray<{ readonly message_id: string }>, SqlError, Transaction> =>
      Effect.gen(function* () {
        yield* Transaction
        yield* requireOpenTransaction(sql, "Inbox.claim")
        const now = yield* Clock.currentTimeMillis
        const params: Array<unknown> = [consumer, ids, new Date(now).toISOString(), topic]
        if (audited === undefined) {
          return yield* sql.unsafe<{ readonly message_id: string }>(legacyRows ? legacyInsert : plainInsert, params)
            .withoutTransform
        }
        params.push(yield* Audit.currentTime, Audit.processName)
        // the per-message columns only when a message has a value (the usual read has none, and attempt 1);
        // an all-null column goes as null (unnest pads it)
        const correlation = column(audited.envelopes, (e) => e.headers.correlationid)
        const causation = column(audited.envelopes, (e) => e.headers.causationid)
        const extras = correlation !== null || causation !== null || audited.attempts.some((a) => a !== 1)
        if (extras) params.push(correlation, causation, audited.attempts)
        return yield* sql.unsafe<{ readonly message_id: string }>(
          auditedInsertSql(audited.table, legacyRows, extras),
          params
        ).withoutTransform
      })

    const claim = (message: MessageKey) =>
      Effect.flatMap(tryClaim(message.group, message.topic, [message.id]), (claimed) =>
        claimed.length > 0
          ? Effect.void
          : Effect.fail(new AlreadyProcessed({ consumer: message.group, messageId: message.id }))
      )

    const onceAll = <T extends { readonly context: { readonly id: string; readonly topic: string } }, A, E, R>(
      consumer: string,
      items: ReadonlyArray<T>,
      effect: (fresh: ReadonlyArray<T>) => Effect.Effect<A, E, R>
    ): Effect.Effect<A, E | SqlError, Exclude<R, Transaction>> =>
      transactionIn(
        sql,
        Effect.gen(function* () {
          // a read is of one topic; items of several are claimed per topic
          const topics = new Map<string, Array<T>>()
          for (const item of items) {
            const same = topics.get(item.context.topic)
            if (same === undefined) topics.set(item.context.topic, [item])
            else same.push(item)
          }
          // `handled` events: written by the claim statement itself where it can (AuditPg in this database,
          // the topic audited whole, every item a consumer's context with its envelope), else after the effect
          const audit = yield* Audit.AuditSink
          const target = audit.enabled ? sqlTargetOf(audit, sql) : undefined
          const auditedBy = new Map<string, Audited>()
          if (target !== undefined) {
            for (const [topic, same] of topics) {
              if (target.skipped.includes(topic)) continue
              const envelopes: Array<Envelope.Encoded> = []
              const attempts: Array<number> = []
              for (const item of same) {
                const context = item.context as Partial<Consumer.MessageContext>
                if (context.encoded === undefined) break
                envelopes.push(context.encoded)
                attempts.push(context.attempt ?? 1)
              }
              if (envelopes.length === same.length) auditedBy.set(topic, { table: target.table, envelopes, attempts })
            }
          }
          const claimed: Array<{ readonly message_id: string; readonly topic: string }> = []
          for (const [topic, same] of topics) {
            const ids = same.map((item) => item.context.id)
            for (const row of yield* tryClaim(consumer, topic, ids, auditedBy.get(topic))) {
              claimed.push({ message_id: row.message_id, topic })
            }
          }
          // as many new rows as items: every id was new and none repeated (a repeat inserts once)
          let fresh: ReadonlyArray<T> = items
          if (claimed.length < items.length) {
            const ids = new Set(claimed.map((r) => `${r.topic}\u0000${r.message_id}`))
            fresh = items.filter((item) => ids.delete(`${item.context.topic}\u0000${item.context.id}`))
          }
          if (fresh.length < items.length) {
            yield* Effect.logDebug(
              `converge: skipped ${items.length - fresh.length} duplicate(s) for ${consumer} (inbox)`
            )
          }
          const result = yield* effect(fresh)
          if (audit.enabled) {
            // `handled`, in this transaction: it commits with the effect. A consumer's contexts carry the
            // envelope; the consumer then does not write the event again
            const envelopes: Array<Envelope.Encoded> = []
            const attempts = new Map<Envelope.Encoded, number>()
            for (const item of fresh) {
              const context = item.context as Partial<Consumer.MessageContext>
              if (context.encoded === undefined) continue
              Audit.markHandled(context)
              if (auditedBy.has(item.context.topic)) continue
              envelopes.push(context.encoded)
              attempts.set(context.encoded, context.attempt ?? 1)
            }
            yield* Audit.recordWith(audit, "write", "handled", envelopes, (e) => ({
              group: consumer,
              attempt: attempts.get(e)
            }))
          }
          return result
        })
      )

    const once = <A, E, R>(
      message: MessageKey,
      effect: Effect.Effect<A, E, R>
    ): Effect.Effect<Option.Option<A>, E | SqlError, Exclude<R, Transaction>> =>
      onceAll(message.group, [{ context: message }], (fresh) =>
        fresh.length === 0 ? Effect.succeed(Option.none<A>()) : Effect.map(effect, Option.some)
      )

    const isProcessed = (message: MessageKey) =>
      Effect.map(
        sql.unsafe(
          `SELECT 1 FROM ${table} WHERE consumer = $1 AND message_id = $2 AND (topic = $3${legacyRows ? " OR topic = ''" : ""})`,
          [message.group, message.id, message.topic]
        ).withoutTransform,
        (rows) => rows.length > 0
      )

    const cleanup = Effect.flatMap(Clock.currentTimeMillis, (now) =>
      Effect.tap(deleteExpired(sql, table, "processed_at < $1", now - retention), () =>
        // once the last row from before the topic joined the key has expired, claims stop looking for them
        legacyRows
          ? Effect.gen(function* () {
              const left = yield* sql.unsafe(`SELECT 1 FROM ${table} WHERE topic = '' LIMIT 1`).withoutTransform
              if (left.length > 0) return
              yield* sql.unsafe(`DELETE FROM ${store.table("settings")} WHERE name = 'inbox_legacy_rows'`)
              legacyRows = false
            })
          : Effect.void
      )
    )

    return Inbox.of({ claim, once, onceAll, isProcessed, cleanup })
  })

/**
 * The inbox as a Layer (requires `SqlStore`); runs the retention cleanup in
 * the background.
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Inbox, never, SqlStore> =>
  Layer.effect(
    Inbox,
    Effect.gen(function* () {
      const inbox = yield* make(options)
      const interval = Duration.fromInputUnsafe(options?.cleanupInterval ?? "10 minutes")
      if (Duration.toMillis(interval) > 0) {
        yield* Effect.forkScoped(
          inbox.cleanup.pipe(
            Effect.catchCause((cause) => Effect.as(Effect.logWarning("converge: inbox cleanup failed", cause), 0)),
            Effect.delay(interval),
            Effect.forever
          )
        )
      }
      return inbox
    })
  )

/**
 * Runs `effect` once per message and group (`{ group, topic, id }`, e.g. a handler's context) with the
 * `Inbox` in context; see {@link Inbox}. The group and topic are validated as names.
 *
 * @since 0.1.0
 */
export const once = <A, E, R>(
  message: MessageKey,
  effect: Effect.Effect<A, E, R>
): Effect.Effect<Option.Option<A>, E | SqlError | Name.InvalidName, Inbox | Exclude<R, Transaction>> =>
  Effect.flatMap(Effect.andThen(Name.validate("group", message.group), Name.validate("topic", message.topic)), () =>
    Inbox.use((inbox) => inbox.once(message, effect))
  )

/**
 * Wraps a consumer handler so that it runs in a transaction with an inbox
 * claim keyed by the consumer group and the message id: the handler's SQL
 * writes (and any `Outbox.publish`) commit together with the claim, and a
 * duplicate delivery is skipped (the consumer then acks it).
 *
 * @since 0.1.0
 */
export const handler =
  <A, E, R>(handle: (message: A, context: Consumer.MessageContext) => Effect.Effect<void, E, R>) =>
  (message: A, context: Consumer.MessageContext): Effect.Effect<void, E | SqlError, Inbox | Exclude<R, Transaction>> =>
    Inbox.use((inbox) => Effect.asVoid(inbox.once(context, handle(message, context))))

/**
 * The consumer handlers of an inbox-backed consumer, to spread into
 * `Consumer.make`'s options: `handleBatch` claims a whole read in one
 * transaction and calls `handle` with the messages not processed yet;
 * `handle` does the same for one message (the fallback when a batch fails,
 * and the path for single reads). Write your SQL in `handle`: it runs in that
 * transaction, and `Outbox.publish` may be called there.
 *
 * ```ts
 * Consumer.make(orders, {
 *   group: "billing",
 *   ...Inbox.handlers((items) =>
 *     Effect.forEach(items, ({ message }) => sql`INSERT INTO invoices ${sql.insert({ order_id: message.id })}`)
 *   )
 * })
 * ```
 *
 * @since 0.1.0
 */
export const handlers = <A, E, R>(
  handle: (items: ReadonlyArray<Consumer.BatchItem<A>>) => Effect.Effect<unknown, E, R>
): {
  readonly handle: (
    message: A,
    context: Consumer.MessageContext
  ) => Effect.Effect<void, E | SqlError, Inbox | Exclude<R, Transaction>>
  readonly handleBatch: (
    items: ReadonlyArray<Consumer.BatchItem<A>>
  ) => Effect.Effect<void, E | SqlError, Inbox | Exclude<R, Transaction>>
} => {
  const handleBatch = (items: ReadonlyArray<Consumer.BatchItem<A>>) =>
    Inbox.use((inbox) =>
      items.length === 0
        ? Effect.void
        : Effect.asVoid(
            inbox.onceAll(items[0]!.context.group, items, (fresh) => (fresh.length === 0 ? Effect.void : handle(fresh)))
          )
    )
  return { handleBatch, handle: (message, context) => handleBatch([{ message, context }]) }
}

/**
 * Records the message for its group (`{ group, topic, id }`) in the current transaction with the `Inbox`
 * in context; fails with {@link AlreadyProcessed} on a duplicate.
 *
 * @since 0.1.0
 */
export const claim = (message: MessageKey): Effect.Effect<void, AlreadyProcessed | SqlError, Inbox | Transaction> =>
  Inbox.use((inbox) => inbox.claim(message))
