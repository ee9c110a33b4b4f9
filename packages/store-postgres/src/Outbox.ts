/**
 * `Outbox` — publish together with your business writes (stage 1).
 *
 * `Outbox.publish` inserts the encoded message into the outbox table **inside
 * the caller's SQL transaction**: if the transaction rolls back, nothing is
 * published; if it commits, the message is stored and `OutboxRelay` moves it
 * to the broker. Its type requires {@link Transaction}, which only
 * {@link transaction} (and `Inbox.once`) provide, so publishing outside a
 * transaction does not compile:
 *
 * ```ts
 * const placeOrder = (order: Order) =>
 *   Outbox.transaction(
 *     Effect.gen(function* () {
 *       const sql = yield* SqlClient.SqlClient
 *       yield* sql`INSERT INTO orders ${sql.insert({ id: order.id, total: order.total })}`
 *       yield* Outbox.publish(OrderPlaced, order) // same transaction
 *     })
 *   )
 * ```
 *
 * After the commit, the relay of this process is woken at once
 * (`afterCommit`); relays of other processes by `LISTEN/NOTIFY`, or by their
 * poll.
 *
 * @since 0.1.0
 */

import { Audit, Envelope, type Name, Partition, type Retry, type Topic } from "@converge/core"
import { Clock, Context, Effect, Layer, Option, Result } from "effect"
import type { SqlClient } from "effect/sql"
import { isSqlError, type SqlError } from "effect/sql/SqlError"
import { outboxColumns, SqlStore } from "./SqlStore.ts"

/**
 * Proof that the code runs inside a SQL transaction opened by
 * {@link transaction} (or `Inbox.once`). `Outbox.publish` requires it.
 *
 * @since 0.1.0
 */
export class Transaction extends Context.Service<
  Transaction,
  { readonly state: { afterCommitRegistered: boolean; xid: string | undefined } }
>()("@converge/store-postgres/Outbox/Transaction") {}

/**
 * Runs `effect` in a SQL transaction of the store's client (a savepoint when
 * one is already open) and provides {@link Transaction}, so it may call
 * `Outbox.publish`. A failure or defect rolls everything back, messages
 * included.
 *
 * @since 0.1.0
 */
export const transaction = <A, E, R>(
  effect: Effect.Effect<A, E, R>
): Effect.Effect<A, E | SqlError, Exclude<R, Transaction> | SqlStore> =>
  SqlStore.use((store) => transactionIn(store.sql, effect))

/**
 * {@link transaction} on a given client: the one place that opens a
 * transaction providing {@link Transaction} (`Inbox` uses it too).
 *
 * @internal
 */
export const transactionIn = <A, E, R>(
  sql: SqlClient.SqlClient,
  effect: Effect.Effect<A, E, R>
): Effect.Effect<A, E | SqlError, Exclude<R, Transaction>> =>
  sql
    .withTransaction(
      Effect.provideService(
        effect,
        Transaction,
        Transaction.of({ state: { afterCommitRegistered: false, xid: undefined } })
      )
    )
    .pipe(sqlDefectsAsFailures)

/**
 * Dies (a programming error) when the code runs outside a transaction of
 * `sql`: {@link Transaction} can be provided by hand, which proves nothing.
 *
 * @internal
 */
export const requireOpenTransaction = (sql: SqlClient.SqlClient, what: string): Effect.Effect<void> =>
  Effect.flatMap(Effect.serviceOption(sql.transactionService), (open) =>
    Option.isNone(open)
      ? Effect.die(
          new Error(
            `${what} ran outside a SQL transaction of the store's client: wrap it in Outbox.transaction (the Transaction service was provided by hand)`
          )
        )
      : Effect.void
  )

/**
 * When the connection dies inside a transaction, `effect/sql` fails the
 * rollback and turns that into a defect. It is a lost connection, and the
 * transaction did not commit: surface it as the retryable `SqlError` it is,
 * so callers (and the consumer runtime) retry it like any outage.
 *
 * @internal
 */
export const sqlDefectsAsFailures = <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E | SqlError, R> =>
  Effect.catchDefect(effect, (defect) => (isSqlError(defect) ? Effect.fail(defect) : Effect.die(defect)))

/**
 * What a successful outbox publish returns.
 *
 * @since 0.1.0
 */
export interface Receipt {
  /** The message id (UUIDv7 unless given). */
  readonly id: string
  /** The outbox row's sequence number. */
  readonly seq: string
}

/**
 * Every way an outbox publish can fail.
 *
 * @since 0.1.0
 */
export type PublishError = SqlError | Envelope.PayloadError | Envelope.MalformedEnvelope | Name.InvalidName

/**
 * The classification of {@link PublishError} for a consumer whose handler
 * publishes through the outbox: a message that cannot be encoded, or names
 * a bad header or topic, fails the same way on every retry, so it is
 * dead-lettered (`SqlError` classifies itself by `isRetryable`). Spread it
 * into the consumer's `errors`:
 *
 * ```ts
 * Consumer.make(orders, {
 *   group: "billing",
 *   handle: Inbox.handler((order, ctx) => chargeAndPublish(order, ctx)),
 *   errors: { ...Outbox.publishErrors, CardDeclined: "dead-letter" }
 * })
 * ```
 *
 * @since 0.1.0
 */
export const publishErrors: Retry.Classification<PublishError> = {
  PayloadError: "dead-letter",
  MalformedEnvelope: "dead-letter",
  InvalidName: "dead-letter"
}

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** CloudEvents `source` of every message (default `urn:converge`). Must not be empty (`MalformedEnvelope`). */
  readonly source?: string | undefined
}

/**
 * The outbox service.
 *
 * @since 0.1.0
 */
export class Outbox extends Context.Service<
  Outbox,
  {
    /** Inserts one message into the outbox, in the current transaction. */
    readonly publish: <A, I>(
      topic: Topic.Topic<A, I>,
      payload: A,
      options?: Envelope.MakeOptions
    ) => Effect.Effect<Receipt, PublishError, Transaction>
    /** Inserts many messages of one topic, in order, in the current transaction (one statement per 2 000). */
    readonly publishAll: <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      options?: Envelope.MakeOptions
    ) => Effect.Effect<ReadonlyArray<Receipt>, PublishError, Transaction>
  }
>()("@converge/store-postgres/Outbox") {}

const columns = outboxColumns.join(", ")
const chunkRows = 2000

/**
 * The insert of one chunk of a `publishAll`. The messages of one call share topic, type, source, time,
 * attempt and headers (one `MakeOptions`), so those are single parameters; what differs per message goes
 * as four array parameters unnested in order (the identity `seq` follows that order, and so does
 * `RETURNING`). Against a `VALUES` list of 11 parameters per row this sends and parses far less.
 * `withKeys`: whether any message has a key (an array whose elements are all `NULL` has no type to bind).
 */
const insertSql = (table: string, withKeys: boolean) =>
  `INSERT INTO ${table} (${columns})
   SELECT u.p, u.id, $4, $5, $6, ${withKeys ? "u.k" : "NULL"}, $7::timestamptz, $8::int, $9::jsonb, u.d, $7::timestamptz
   FROM unnest($1::int[], $2::text[], $3::text[]${withKeys ? ", $10::text[]" : ""}) AS u(p, id, d${withKeys ? ", k" : ""})
   RETURNING seq::text AS seq, tx::text AS tx`

/**
 * Builds the outbox over the `SqlStore` in context.
 *
 * @since 0.1.0
 */
export const make = (options?: Options): Effect.Effect<Outbox["Service"], never, SqlStore> =>
  Effect.gen(function* () {
    const store = yield* SqlStore
    const { sql, partitions } = store
    const table = store.table("outbox")
    const withKeysSql = insertSql(table, true)
    const withoutKeysSql = insertSql(table, false)
    // after commit, wake the relays of this process, naming the transaction (its rows' `tx`, read back by
    // the insert): a relay keeps trying until it has read past it
    const guard = Transaction.use((tx) =>
      Effect.andThen(requireOpenTransaction(sql, "Outbox.publish"), () => {
        if (tx.state.afterCommitRegistered) return Effect.succeed(tx.state)
        tx.state.afterCommitRegistered = true
        return Effect.as(sql.afterCommit(Effect.sync(() => store.nudge(tx.state.xid))), tx.state)
      })
    )
    const publishAll = <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      makeOptions?: Envelope.MakeOptions
    ): Effect.Effect<ReadonlyArray<Receipt>, PublishError, Transaction> =>
      Envelope.producerSpan(topic.name, "converge.outbox.publish", insertAll(topic, payloads, makeOptions))
    const insertAll = <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      makeOptions?: Envelope.MakeOptions
    ): Effect.Effect<ReadonlyArray<Receipt>, PublishError, Transaction> =>
      Effect.gen(function* () {
        const state = yield* guard
        const now = yield* Clock.currentTimeMillis
        // the publisher's trace travels with the row, so the consumer continues it past the relay
        const traced = yield* Envelope.withTraceContext(makeOptions)
        const made = Envelope.makeEncodedAllResult(topic, payloads, now, traced, options?.source)
        if (Result.isFailure(made)) return yield* made.failure
        const encoded = made.success
        const receipts: Array<Receipt> = []
        for (let start = 0; start < encoded.length; start += chunkRows) {
          const chunk = encoded.slice(start, start + chunkRows)
          const first = chunk[0]!
          const partitionsOf: Array<number> = []
          const ids: Array<string> = []
          const data: Array<string> = []
          const keys: Array<string | null> = []
          let keyed = false
          for (const e of chunk) {
            partitionsOf.push(Partition.of(e.key ?? e.id, partitions))
            ids.push(e.id)
            data.push(e.data)
            keys.push(e.key ?? null)
            if (e.key !== undefined) keyed = true
          }
          const params: Array<unknown> = [
            partitionsOf,
            ids,
            data,
            first.topic,
            first.type,
            first.source,
            first.time,
            first.attempt,
            JSON.stringify(first.headers)
          ]
          if (keyed) params.push(keys)
          const rows = yield* sql.unsafe<{ readonly seq: string; readonly tx: string }>(
            keyed ? withKeysSql : withoutKeysSql,
            params
          ).withoutTransform
          state.xid ??= rows[0]?.tx
          for (let i = 0; i < chunk.length; i++) receipts.push({ id: chunk[i]!.id, seq: rows[i]!.seq })
        }
        // in this transaction: the audit row commits and rolls back with the message
        yield* Audit.record("write", "published", encoded, () => ({ detail: "outbox" }))
        return receipts
      })
    return Outbox.of({
      publishAll,
      publish: (topic, payload, makeOptions) =>
        Effect.map(publishAll(topic, [payload], makeOptions), (receipts) => receipts[0]!)
    })
  })

/**
 * The outbox as a Layer (requires `SqlStore`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Outbox, never, SqlStore> => Layer.effect(Outbox, make(options))

/**
 * Inserts one message into the outbox with the `Outbox` in context, inside
 * the current {@link transaction}.
 *
 * @since 0.1.0
 */
export const publish = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  options?: Envelope.MakeOptions
): Effect.Effect<Receipt, PublishError, Outbox | Transaction> => Outbox.use((o) => o.publish(topic, payload, options))

/**
 * Inserts many messages of one topic, in order, inside the current
 * {@link transaction}.
 *
 * @since 0.1.0
 */
export const publishAll = <A, I>(
  topic: Topic.Topic<A, I>,
  payloads: Iterable<A>,
  options?: Envelope.MakeOptions
): Effect.Effect<ReadonlyArray<Receipt>, PublishError, Outbox | Transaction> =>
  Outbox.use((o) => o.publishAll(topic, payloads, options))
