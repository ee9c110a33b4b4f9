/**
 * Example 03: a checkout saga across three services — orders (the
 * coordinator), payments and inventory — on Postgres (Effect's workflow
 * engine, the outbox, the inbox) and any broker.
 *
 * 1. `place-order` (local step, in the coordinator's database): the order row
 *    is written as `pending`. Compensation: the order is `cancelled` and an
 *    `orders.cancelled` event is published (choreography: the loyalty service
 *    takes back the points it gave for the order, with no coordinator
 *    telling it).
 * 2. `charge-payment` (a command to payments, awaited): a payment row, or
 *    `CardDeclined`. Compensation: a `payments.refund` command.
 * 3. `reserve-stock` (a command to inventory, awaited): stock decremented,
 *    or `OutOfStock`. No compensation (nothing after it can fail).
 *
 * Then the order is `confirmed` (a last local step).
 *
 * Every service handles its messages through its inbox (each effect once),
 * and sends through its outbox (the message commits with the effect).
 */
import { Consumer, Saga, Topic } from "@converge/core"
import { Inbox, Outbox, OutboxRelay, SagaPg, SqlStore } from "@converge/store-postgres"
import { type Duration, Effect, Layer, Schema } from "effect"

// --- messages ------------------------------------------------------------------------------------

/** What a customer checks out. */
export const Checkout = Schema.Struct({
  orderId: Schema.String,
  customer: Schema.String,
  sku: Schema.String,
  quantity: Schema.Int,
  cents: Schema.Int
})
export type Checkout = typeof Checkout.Type

/** Payments refuses the card. */
export class CardDeclined extends Schema.TaggedError<CardDeclined>()("CardDeclined", {
  orderId: Schema.String,
  reason: Schema.String
}) {}

/** Inventory has too few units. */
export class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", {
  sku: Schema.String,
  available: Schema.Int
}) {}

/** The charge command and its reply. */
export const ChargePayment = Saga.command(
  Topic.make("payments.charge", Schema.Struct({ orderId: Schema.String, customer: Schema.String, cents: Schema.Int })),
  { success: Schema.Struct({ paymentId: Schema.String }), error: CardDeclined }
)

/** The stock reservation command and its reply. */
export const ReserveStock = Saga.command(
  Topic.make("inventory.reserve", Schema.Struct({ orderId: Schema.String, sku: Schema.String, quantity: Schema.Int })),
  { success: Schema.Struct({ remaining: Schema.Int }), error: OutOfStock }
)

/** The refund command (a compensation: sent, not awaited). */
export const refundTopic = Topic.make("payments.refund", Schema.Struct({ paymentId: Schema.String }))

/** Orders' events, for whoever listens (choreography). */
export const orderPlaced = Topic.make(
  "orders.placed",
  Schema.Struct({ orderId: Schema.String, customer: Schema.String })
)
export const orderCancelled = Topic.make(
  "orders.cancelled",
  Schema.Struct({ orderId: Schema.String, customer: Schema.String, reason: Schema.String })
)

// --- the saga ------------------------------------------------------------------------------------

/** The checkout saga: one run per order id. */
export const CheckoutSaga = Saga.make("checkout", {
  payload: Checkout,
  idempotencyKey: (c) => c.orderId,
  success: Schema.Struct({ paymentId: Schema.String }),
  error: Schema.Union([CardDeclined, OutOfStock])
})

const sql = <A extends object = object>(
  text: (table: (name: string) => string) => string,
  params: ReadonlyArray<unknown>
) => SqlStore.SqlStore.use(({ sql, table }) => sql.unsafe<A>(text(table), params)).pipe(Effect.orDie)

/** The saga's body: three steps, each with its compensation, then the confirmation. */
export const CheckoutSagaLive = Saga.toLayer(CheckoutSaga, (checkout) =>
  Effect.gen(function* () {
    yield* Saga.step({
      name: "place-order",
      success: Schema.Void,
      run: Effect.gen(function* () {
        yield* sql(
          (t) =>
            `INSERT INTO ${t("orders")} (id, customer, sku, quantity, cents, status) VALUES ($1, $2, $3, $4, $5, 'pending')`,
          [checkout.orderId, checkout.customer, checkout.sku, checkout.quantity, checkout.cents]
        )
        yield* Effect.orDie(Saga.send(orderPlaced, { orderId: checkout.orderId, customer: checkout.customer }))
      }),
      compensate: (_, cause) =>
        Effect.gen(function* () {
          const reason = Saga.describe(cause)
          yield* sql(
            (t) => `UPDATE ${t("orders")} SET status = 'cancelled', reason = $2 WHERE id = $1`,
            [checkout.orderId, reason]
          )
          yield* Saga.send(orderCancelled, { orderId: checkout.orderId, customer: checkout.customer, reason })
        })
    })
    const payment = yield* Saga.request(
      ChargePayment,
      { orderId: checkout.orderId, customer: checkout.customer, cents: checkout.cents },
      {
        name: "charge-payment",
        timeout: "30 seconds",
        compensate: (p) => Saga.send(refundTopic, { paymentId: p.paymentId })
      }
    )
    yield* Saga.request(
      ReserveStock,
      { orderId: checkout.orderId, sku: checkout.sku, quantity: checkout.quantity },
      { name: "reserve-stock", timeout: "30 seconds" }
    )
    yield* Saga.step({
      name: "confirm-order",
      success: Schema.Void,
      run: sql((t) => `UPDATE ${t("orders")} SET status = 'confirmed' WHERE id = $1`, [checkout.orderId])
    })
    return payment
  })
)

// --- the other services --------------------------------------------------------------------------

/** Payments: charges once per command (inbox); a card over its limit is declined; refunds. */
export const payments = Effect.gen(function* () {
  yield* Consumer.make(ChargePayment.topic, {
    group: "payments",
    handle: Inbox.handler(
      Saga.respond(ChargePayment, (charge) =>
        Effect.gen(function* () {
          if (charge.cents > 50_000) {
            return yield* new CardDeclined({ orderId: charge.orderId, reason: "over the card's limit" })
          }
          const paymentId = `pay-${charge.orderId}`
          yield* sql(
            (t) => `INSERT INTO ${t("payments")} (id, order_id, cents, status) VALUES ($1, $2, $3, 'charged')`,
            [paymentId, charge.orderId, charge.cents]
          )
          return { paymentId }
        })
      )
    )
  })
  yield* Consumer.make(refundTopic, {
    group: "payments",
    handle: Inbox.handler((refund) =>
      sql((t) => `UPDATE ${t("payments")} SET status = 'refunded' WHERE id = $1`, [refund.paymentId])
    )
  })
})

/** Inventory: reserves stock once per command (inbox), or replies `OutOfStock`. */
export const inventory = Consumer.make(ReserveStock.topic, {
  group: "inventory",
  handle: Inbox.handler(
    Saga.respond(ReserveStock, (reserve) =>
      Effect.gen(function* () {
        const rows = yield* sql<{ readonly units: number }>(
          (t) => `UPDATE ${t("stock")} SET units = units - $2 WHERE sku = $1 AND units >= $2 RETURNING units`,
          [reserve.sku, reserve.quantity]
        )
        if (rows[0] !== undefined) return { remaining: rows[0].units }
        const left = yield* sql<{ readonly units: number }>(
          (t) => `SELECT units FROM ${t("stock")} WHERE sku = $1`,
          [reserve.sku]
        )
        return yield* new OutOfStock({ sku: reserve.sku, available: left[0]?.units ?? 0 })
      })
    )
  )
})

/** Loyalty (choreography): a point per euro when an order is placed, taken back when it is cancelled. */
export const loyalty = Effect.gen(function* () {
  yield* Consumer.make(orderPlaced, {
    group: "loyalty",
    handle: Inbox.handler((placed) =>
      sql(
        (t) =>
          `INSERT INTO ${t("loyalty")} (order_id, customer, points) SELECT id, customer, cents / 100 FROM ${t("orders")} WHERE id = $1`,
        [placed.orderId]
      )
    )
  })
  yield* Consumer.make(orderCancelled, {
    group: "loyalty",
    handle: Inbox.handler((cancelled) =>
      sql((t) => `DELETE FROM ${t("loyalty")} WHERE order_id = $1`, [cancelled.orderId])
    )
  })
})

/** The example's tables (in the store's schema) and the stock it starts with. */
export const tables = (stock: ReadonlyArray<readonly [sku: string, units: number]>) =>
  Layer.effectDiscard(
    Effect.gen(function* () {
      const { sql, table } = yield* SqlStore.SqlStore
      yield* sql.unsafe(`CREATE TABLE IF NOT EXISTS ${table("orders")} (id text PRIMARY KEY, customer text NOT NULL, sku text NOT NULL,
        quantity int NOT NULL, cents int NOT NULL, status text NOT NULL, reason text)`).raw
      yield* sql.unsafe(
        `CREATE TABLE IF NOT EXISTS ${table("payments")} (id text PRIMARY KEY, order_id text NOT NULL, cents int NOT NULL, status text NOT NULL)`
      ).raw
      yield* sql.unsafe(`CREATE TABLE IF NOT EXISTS ${table("stock")} (sku text PRIMARY KEY, units int NOT NULL)`).raw
      yield* sql.unsafe(
        `CREATE TABLE IF NOT EXISTS ${table("loyalty")} (order_id text PRIMARY KEY, customer text NOT NULL, points int NOT NULL)`
      ).raw
      for (const [sku, units] of stock) {
        yield* sql.unsafe(
          `INSERT INTO ${table("stock")} (sku, units) VALUES ($1, $2) ON CONFLICT (sku) DO UPDATE SET units = excluded.units`,
          [sku, units]
        ).raw
      }
    })
  )

/** The reply topic of the checkout coordinator. */
export const replyTopic = "checkout.replies"

/**
 * Everything the example runs, on the `SqlClient` and `Broker` in context:
 * the coordinator (engine, saga, replies), the three services, the relay.
 * `runnerStorage: "memory"` on PGlite (one connection); `"sql"` on a server.
 */
export const layer = (options: {
  readonly schema: string
  readonly runnerStorage: "sql" | "memory"
  readonly stock: ReadonlyArray<readonly [string, number]>
  readonly relayPoll?: Duration.Input | undefined
}) =>
  Layer.mergeAll(
    CheckoutSagaLive,
    SagaPg.replies({ topic: replyTopic, group: "checkout" }),
    Layer.effectDiscard(Effect.all([payments, inventory, loyalty], { discard: true }))
  ).pipe(
    Layer.provideMerge(SagaPg.layer({ replyTopic, runnerStorage: options.runnerStorage, pollInterval: 200 })),
    Layer.provideMerge(tables(options.stock)),
    Layer.provideMerge(
      Layer.mergeAll(
        Outbox.layer({ source: "urn:example:checkout" }),
        Inbox.layer(),
        OutboxRelay.layer({ pollInterval: options.relayPoll ?? "100 millis", listen: options.runnerStorage === "sql" })
      )
    ),
    Layer.provideMerge(SqlStore.layer({ schema: options.schema, partitions: 4 }))
  )
