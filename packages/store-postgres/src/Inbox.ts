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
 * @since 0.1.0
 */

import { type Consumer, Name } from "@converge/core"
import { Clock, Context, Duration, Effect, Layer, Option, Schema } from "effect"
import type { SqlError } from "effect/sql/SqlError"
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
 * The inbox service.
 *
 * @since 0.1.0
 */
export class Inbox extends Context.Service<
  Inbox,
  {
    /**
     * Records `(consumer, messageId)` in the current transaction; fails with
     * {@link AlreadyProcessed} when it is there (roll the transaction back).
     */
    readonly claim: (
      consumer: string,
      messageId: string
    ) => Effect.Effect<void, AlreadyProcessed | SqlError, Transaction>
    /**
     * Runs `effect` in a transaction that first claims the message: returns
     * `Option.some(result)` after commit, or `Option.none()` without running
     * `effect` when the message was already processed.
     */
    readonly once: <A, E, R>(
      consumer: string,
      messageId: string,
      effect: Effect.Effect<A, E, R>
    ) => Effect.Effect<Option.Option<A>, E | SqlError, Exclude<R, Transaction>>
    /**
     * The batch form of {@link once}: one transaction claims every message id
     * of `items` (one statement) and runs `effect` with those that were not
     * processed yet, in order (duplicates within `items` count once).
     */
    readonly onceAll: <T extends { readonly context: { readonly id: string } }, A, E, R>(
      consumer: string,
      items: ReadonlyArray<T>,
      effect: (fresh: ReadonlyArray<T>) => Effect.Effect<A, E, R>
    ) => Effect.Effect<A, E | SqlError, Exclude<R, Transaction>>
    /** Whether the consumer has processed the message (its row is there). */
    readonly isProcessed: (consumer: string, messageId: string) => Effect.Effect<boolean, SqlError>
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
    const insertSql = `INSERT INTO ${table} (consumer, message_id, processed_at)
      SELECT $1, id, $3 FROM unnest($2::text[]) AS id ON CONFLICT DO NOTHING RETURNING message_id`

    /**
     * Inserts the rows in the current transaction (one statement); returns the ids that were new. The ids
     * go as one binary `text[]` parameter: nothing to quote, nothing for the server to parse.
     */
    const tryClaim = (
      consumer: string,
      ids: ReadonlyArray<string>
    ): Effect.Effect<ReadonlyArray<{ readonly message_id: string }>, SqlError, Transaction> =>
      Effect.gen(function* () {
        yield* Transaction
        yield* requireOpenTransaction(sql, "Inbox.claim")
        const now = yield* Clock.currentTimeMillis
        return yield* sql.unsafe<{ readonly message_id: string }>(insertSql, [
          consumer,
          ids,
          new Date(now).toISOString()
        ]).withoutTransform
      })

    const claim = (consumer: string, messageId: string) =>
      Effect.flatMap(tryClaim(consumer, [messageId]), (claimed) =>
        claimed.length > 0 ? Effect.void : Effect.fail(new AlreadyProcessed({ consumer, messageId }))
      )

    const onceAll = <T extends { readonly context: { readonly id: string } }, A, E, R>(
      consumer: string,
      items: ReadonlyArray<T>,
      effect: (fresh: ReadonlyArray<T>) => Effect.Effect<A, E, R>
    ): Effect.Effect<A, E | SqlError, Exclude<R, Transaction>> =>
      transactionIn(
        sql,
        Effect.gen(function* () {
          const claimed = yield* tryClaim(
            consumer,
            items.map((i) => i.context.id)
          )
          // as many new rows as items: every id was new and none repeated (a repeat inserts once)
          let fresh: ReadonlyArray<T> = items
          if (claimed.length < items.length) {
            const ids = new Set(claimed.map((r) => r.message_id))
            fresh = items.filter((item) => ids.delete(item.context.id))
          }
          if (fresh.length < items.length) {
            yield* Effect.logDebug(
              `converge: skipped ${items.length - fresh.length} duplicate(s) for ${consumer} (inbox)`
            )
          }
          return yield* effect(fresh)
        })
      )

    const once = <A, E, R>(
      consumer: string,
      messageId: string,
      effect: Effect.Effect<A, E, R>
    ): Effect.Effect<Option.Option<A>, E | SqlError, Exclude<R, Transaction>> =>
      onceAll(consumer, [{ context: { id: messageId } }], (fresh) =>
        fresh.length === 0 ? Effect.succeed(Option.none<A>()) : Effect.map(effect, Option.some)
      )

    const isProcessed = (consumer: string, messageId: string) =>
      Effect.map(
        sql.unsafe(`SELECT 1 FROM ${table} WHERE consumer = $1 AND message_id = $2`, [consumer, messageId])
          .withoutTransform,
        (rows) => rows.length > 0
      )

    const cleanup = Effect.flatMap(Clock.currentTimeMillis, (now) =>
      deleteExpired(sql, table, "processed_at < $1", now - retention)
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
 * Runs `effect` once per `(consumer, messageId)` with the `Inbox` in context;
 * see {@link Inbox}. `consumer` is validated as a group name.
 *
 * @since 0.1.0
 */
export const once = <A, E, R>(
  consumer: string,
  messageId: string,
  effect: Effect.Effect<A, E, R>
): Effect.Effect<Option.Option<A>, E | SqlError | Name.InvalidName, Inbox | Exclude<R, Transaction>> =>
  Effect.flatMap(Name.validate("group", consumer), () => Inbox.use((inbox) => inbox.once(consumer, messageId, effect)))

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
    Inbox.use((inbox) => Effect.asVoid(inbox.once(context.group, context.id, handle(message, context))))

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
 * Records `(consumer, messageId)` in the current transaction with the
 * `Inbox` in context; fails with {@link AlreadyProcessed} on a duplicate.
 *
 * @since 0.1.0
 */
export const claim = (
  consumer: string,
  messageId: string
): Effect.Effect<void, AlreadyProcessed | SqlError, Inbox | Transaction> =>
  Inbox.use((inbox) => inbox.claim(consumer, messageId))
