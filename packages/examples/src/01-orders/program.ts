/**
 * Example 01 — orders: one service publishes, two services consume.
 *
 * - `orders` is a topic with a Schema; the shop publishes typed orders.
 * - `billing` and `shipping` are two consumer groups: each receives every
 *   order (fan-out); within a group, consumers share the work.
 * - billing (a `Consumer`) fails one order with a transient `PaymentTimeout`
 *   on its first attempt: it is retried by the schedule (attempt 2); a
 *   `CardDeclined` is permanent: dead-lettered at once.
 * - a foreign producer writes an order that breaks the Schema: each group
 *   dead-letters it (reason `decode`, no handler call), and consumption goes on.
 *
 * The program only needs a `Broker`: the tests run it on the memory broker,
 * `main.ts` picks the layers.
 */
import { Broker, Consumer, DeadLetter, Envelope, Publisher, Topic } from "@converge/core"
import { Data, Effect, Schedule, Schema } from "effect"

/** An order placed in the shop. */
export const OrderPlaced = Schema.Struct({
  orderId: Schema.String,
  customer: Schema.String,
  amountCents: Schema.Int.check(Schema.isGreaterThan(0))
})

/** The topic: ordering key = order id. */
export const orders = Topic.make("orders", OrderPlaced, {
  type: "com.example.shop.order.placed",
  key: (o) => o.orderId
})

/** The payment provider did not answer in time: transient. */
export class PaymentTimeout extends Data.TaggedError("PaymentTimeout")<{ readonly orderId: string }> {}

/** The card was declined: permanent. */
export class CardDeclined extends Data.TaggedError("CardDeclined")<{ readonly orderId: string }> {}

/** What the program observed, for the caller to print or assert on. */
export interface Summary {
  readonly published: ReadonlyArray<string>
  readonly billed: ReadonlyArray<{ readonly orderId: string; readonly attempt: number }>
  readonly shipped: ReadonlyArray<string>
  readonly deadLetters: ReadonlyArray<{ readonly reason: string; readonly group: string; readonly error: string }>
}

/** Runs the example until every expected message is settled. */
export const program = Effect.gen(function* () {
  const billed: Array<{ orderId: string; attempt: number }> = []
  const shipped: Array<string> = []

  // billing: a timeout is retried (by the schedule), a declined card is dead-lettered at once;
  // the compiler insists that both error tags are classified
  yield* Consumer.make(orders, {
    group: "billing",
    consumer: "billing-1",
    handle: (order, ctx) =>
      Effect.gen(function* () {
        if (order.orderId === "o-2" && ctx.attempt === 1) {
          yield* Effect.logWarning(`billing: payment provider timed out for ${order.orderId}`)
          return yield* new PaymentTimeout({ orderId: order.orderId })
        }
        if (order.customer === "mallory") return yield* new CardDeclined({ orderId: order.orderId })
        billed.push({ orderId: order.orderId, attempt: ctx.attempt })
        yield* Effect.logInfo(`billing: charged ${order.customer} ${order.amountCents / 100} for ${order.orderId}`)
      }),
    errors: { PaymentTimeout: "retry", CardDeclined: "dead-letter" },
    retry: Schedule.exponential("100 millis").pipe(Schedule.upTo({ times: 5 }))
  })

  // shipping: every order gets a label
  yield* Consumer.make(orders, {
    group: "shipping",
    consumer: "shipping-1",
    handle: (order) =>
      Effect.sync(() => shipped.push(order.orderId)).pipe(
        Effect.andThen(Effect.logInfo(`shipping: label printed for ${order.orderId}`))
      )
  })

  const receipts = yield* Publisher.publishAll(orders, [
    { orderId: "o-1", customer: "ada", amountCents: 1250 },
    { orderId: "o-2", customer: "grace", amountCents: 9900 },
    { orderId: "o-3", customer: "mallory", amountCents: 420 }
  ])
  yield* Effect.logInfo(`shop: published ${receipts.length} orders`)

  // A foreign producer writes a message whose payload breaks the Schema.
  const broker = yield* Broker.Broker
  const bad = yield* Effect.orDie(
    Effect.fromResult(
      Envelope.fromFields({
        ce_id: "foreign-1",
        ce_type: "com.example.shop.order.placed",
        ce_source: "urn:legacy-shop",
        ce_time: "2026-11-26T10:00:00.000Z",
        ce_topic: "orders",
        data: '{"orderId":"o-4","customer":"bob","amountCents":-5}'
      })
    )
  )
  yield* broker.publish([bad])

  // Wait until billing billed 2, shipping shipped 3, and 3 dead letters are in (mallory; the bad one twice).
  yield* Effect.gen(function* () {
    while (billed.length < 2 || shipped.length < 3 || (yield* DeadLetter.list(orders.name)).length < 3) {
      yield* Effect.sleep("20 millis")
    }
  }).pipe(Effect.timeoutOrElse({ duration: "10 seconds", orElse: () => Effect.die(new Error("example timed out")) }))

  const deadLetters = (yield* DeadLetter.list(orders.name)).map((d) => ({
    reason: d.reason,
    group: d.group,
    error: d.error ?? ""
  }))
  return {
    published: receipts.map((r) => r.id),
    billed,
    shipped,
    deadLetters
  } satisfies Summary
})
