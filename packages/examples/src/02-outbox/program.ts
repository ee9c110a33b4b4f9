/**
 * Example 02 — the transactional outbox and the idempotent inbox.
 *
 * - The shop writes an order row **and** its `OrderPlaced` message in one SQL
 *   transaction (`Outbox.transaction` + `Outbox.publish`). A rejected order
 *   rolls back: no row, no message.
 * - `OutboxRelay` (a background layer, provided by the caller) moves committed
 *   messages to the broker.
 * - Billing consumes them with `Inbox.handler`: the invoice row, the inbox
 *   row and the follow-up `InvoiceCreated` message (through the outbox again)
 *   commit together. A duplicate delivery — here, the shop re-publishing a
 *   message with the same id, as it would after a commit whose outcome it did
 *   not learn — is skipped: one invoice per order.
 * - The mailer consumes `InvoiceCreated`.
 *
 * Needs `SqlClient` + `SqlStore` + `Outbox` + `Inbox` + a `Broker` (and a
 * running `OutboxRelay`): the tests run it on the memory broker and PGlite,
 * `main.ts` picks the layers.
 */
import { Consumer, Topic } from "@converge/core"
import { Inbox, Outbox, OutboxRelay, SqlStore } from "@converge/store-postgres"
import { Data, Effect, Layer, Schema } from "effect"
import { SqlClient } from "effect/sql"

/** An order placed in the shop. */
export const OrderPlaced = Schema.Struct({
  orderId: Schema.String,
  customer: Schema.String,
  amountCents: Schema.Int
})

/** The shop's topic. */
export const ordersPlaced = Topic.make("shop.orders", OrderPlaced, {
  type: "com.example.shop.order.placed",
  key: (o) => o.orderId
})

/** Billing's follow-up event. */
export const InvoiceCreated = Schema.Struct({
  invoiceId: Schema.String,
  orderId: Schema.String,
  amountCents: Schema.Int
})

/** Billing's topic. */
export const invoicesCreated = Topic.make("billing.invoices", InvoiceCreated, {
  type: "com.example.billing.invoice.created",
  key: (i) => i.orderId
})

/** The shop refuses orders above its limit. */
export class OrderRejected extends Data.TaggedError("OrderRejected")<{
  readonly orderId: string
  readonly why: string
}> {}

/** What the program observed. */
export interface Summary {
  readonly committed: ReadonlyArray<string>
  readonly rejected: ReadonlyArray<string>
  readonly billingDeliveries: number
  readonly invoices: ReadonlyArray<{ readonly orderId: string; readonly invoiceId: string }>
  readonly emailed: ReadonlyArray<string>
  readonly outboxRows: number
  readonly unpublished: number
}

/** Runs the example until the mailer has seen every invoice. */
export const program = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const store = yield* SqlStore.SqlStore
  const shopOrders = store.table("shop_orders")
  const billingInvoices = store.table("billing_invoices")
  yield* sql.unsafe(
    `CREATE TABLE IF NOT EXISTS ${shopOrders} (order_id text PRIMARY KEY, customer text NOT NULL, amount_cents int NOT NULL)`
  ).raw
  yield* sql.unsafe(
    `CREATE TABLE IF NOT EXISTS ${billingInvoices} (invoice_id text PRIMARY KEY, order_id text NOT NULL, amount_cents int NOT NULL)`
  ).raw

  let billingDeliveries = 0
  const emailed: Array<string> = []

  // Billing: invoice row + inbox row + InvoiceCreated message, one transaction per message.
  yield* Consumer.make(ordersPlaced, {
    group: "billing",
    consumer: "billing-1",
    handle: (order, ctx) =>
      Effect.andThen(
        Effect.sync(() => billingDeliveries++),
        Inbox.handler((o: typeof OrderPlaced.Type) =>
          Effect.gen(function* () {
            const invoiceId = `inv-${o.orderId}`
            yield* sql.unsafe(
              `INSERT INTO ${billingInvoices} (invoice_id, order_id, amount_cents) VALUES ($1, $2, $3)`,
              [invoiceId, o.orderId, o.amountCents]
            ).raw
            yield* Outbox.publish(
              invoicesCreated,
              { invoiceId, orderId: o.orderId, amountCents: o.amountCents },
              { causationId: ctx.id, correlationId: ctx.headers.correlationid ?? ctx.id }
            )
            yield* Effect.logInfo(`billing: invoice ${invoiceId} for ${o.orderId}`)
          })
        )(order, ctx)
      ),
    // An outbox publish that cannot encode its message (or names a bad header) will not succeed on a retry.
    errors: Outbox.publishErrors
  })

  // Mailer: sends the invoice.
  yield* Consumer.make(invoicesCreated, {
    group: "mailer",
    consumer: "mailer-1",
    handle: (invoice) =>
      Effect.andThen(
        Effect.sync(() => emailed.push(invoice.invoiceId)),
        Effect.logInfo(`mailer: emailed ${invoice.invoiceId}`)
      )
  })

  // The shop: the order row and its message commit together, or not at all.
  const placeOrder = (order: typeof OrderPlaced.Type) =>
    Outbox.transaction(
      Effect.gen(function* () {
        yield* sql.unsafe(`INSERT INTO ${shopOrders} (order_id, customer, amount_cents) VALUES ($1, $2, $3)`, [
          order.orderId,
          order.customer,
          order.amountCents
        ]).raw
        if (order.amountCents > 100_000) {
          return yield* new OrderRejected({ orderId: order.orderId, why: "above the limit" })
        }
        return yield* Outbox.publish(ordersPlaced, order, { correlationId: `checkout-${order.orderId}` })
      })
    )

  const committed: Array<string> = []
  const rejected: Array<string> = []
  const receipts: Array<Outbox.Receipt> = []
  for (const order of [
    { orderId: "o-1", customer: "ada", amountCents: 1250 },
    { orderId: "o-2", customer: "grace", amountCents: 9900 },
    { orderId: "o-3", customer: "mallory", amountCents: 500_000 }
  ]) {
    yield* placeOrder(order).pipe(
      Effect.tap((receipt) =>
        Effect.sync(() => {
          committed.push(order.orderId)
          receipts.push(receipt)
        })
      ),
      Effect.catchTag("OrderRejected", (e) =>
        Effect.andThen(
          Effect.sync(() => rejected.push(e.orderId)),
          Effect.logWarning(`shop: ${e.orderId} rejected (${e.why}); nothing was written or published`)
        )
      )
    )
  }
  // The shop publishes o-1's message again with the same id (a retry after an unknown commit outcome).
  yield* Outbox.transaction(
    Outbox.publish(ordersPlaced, { orderId: "o-1", customer: "ada", amountCents: 1250 }, { id: receipts[0]!.id })
  )

  yield* Effect.gen(function* () {
    while (emailed.length < committed.length || billingDeliveries < committed.length + 1) {
      yield* Effect.sleep("20 millis")
    }
    yield* Effect.sleep("100 millis")
  }).pipe(Effect.timeoutOrElse({ duration: "15 seconds", orElse: () => Effect.die(new Error("example timed out")) }))

  const invoices = yield* sql.unsafe<{ order_id: string; invoice_id: string }>(
    `SELECT order_id, invoice_id FROM ${billingInvoices} ORDER BY order_id`
  ).withoutTransform
  const outboxRows = yield* sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${store.table("outbox")}`)
    .withoutTransform
  const lag = yield* OutboxRelay.OutboxRelay.use((r) => r.lag)
  return {
    committed,
    rejected,
    billingDeliveries,
    invoices: invoices.map((r) => ({ orderId: r.order_id, invoiceId: r.invoice_id })),
    emailed,
    outboxRows: Number(outboxRows[0]!.n),
    unpublished: lag.unpublished
  } satisfies Summary
})

/**
 * The SQL side of the example: the store in `schema`, the outbox, the inbox
 * and a running relay, over a database layer and a `Broker`. On a server
 * the relay also listens for `NOTIFY`; on PGlite it notices it cannot and
 * relies on the after-commit nudge and its poll.
 */
export const storeLayer = (options: { readonly schema: string }) =>
  Layer.mergeAll(
    Outbox.layer({ source: "urn:example:shop" }),
    Inbox.layer(),
    OutboxRelay.layer({ pollInterval: "500 millis" })
  ).pipe(Layer.provideMerge(SqlStore.layer({ schema: options.schema, partitions: 4 })))
