/**
 * Example 01 — orders: one service publishes, two services consume.
 *
 * - `orders` is a topic with a Schema; the shop publishes typed orders.
 * - `billing` and `shipping` are two consumer groups: each receives every
 *   order (fan-out); within a group, consumers share the work.
 * - billing fails one order transiently on its first delivery: the delivery
 *   is nacked with a delay and redelivered (delivery count 2).
 * - a foreign producer writes an order that breaks the Schema: each group
 *   dead-letters it with the reason, and consumption goes on.
 *
 * The program only needs a `Broker`: the tests run it on the memory broker,
 * `main.ts` picks the layers.
 */
import { Broker, Envelope, Publisher, Topic } from "@converge/core"
import { Effect, Result, Schema, Stream } from "effect"

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

/** What the program observed, for the caller to print or assert on. */
export interface Summary {
  readonly published: ReadonlyArray<string>
  readonly billed: ReadonlyArray<{ readonly orderId: string; readonly deliveryCount: number }>
  readonly shipped: ReadonlyArray<string>
  readonly deadLetters: ReadonlyArray<{ readonly reason: string; readonly group: string; readonly error: string }>
}

/** A consumer of `orders` in `group` that decodes each delivery and runs `handle` on the typed order. */
const consumeOrders = (
  group: string,
  handle: (order: typeof OrderPlaced.Type, delivery: Broker.Delivery) => Effect.Effect<void, string>
) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    return yield* broker.subscribe({ topic: orders.name, group, consumer: `${group}-1` }).pipe(
      Stream.runForEach((delivery) => {
        const decoded = Envelope.decodeResult(orders, delivery.envelope)
        if (Result.isFailure(decoded)) {
          // undecodable: permanent, dead-letter at once with the reason
          return Effect.orDie(delivery.deadLetter({ reason: "decode", error: decoded.failure.message }))
        }
        return Broker.process(delivery, handle(decoded.success.payload, delivery), () =>
          Broker.nack("200 millis")
        ).pipe(Effect.ignore)
      }),
      Effect.forkScoped
    )
  })

/** Runs the example until every expected message is settled. */
export const program = Effect.gen(function* () {
  const broker = yield* Broker.Broker
  const billed: Array<{ orderId: string; deliveryCount: number }> = []
  const shipped: Array<string> = []
  const failedOnce = new Set<string>()

  yield* consumeOrders("billing", (order, delivery) =>
    Effect.gen(function* () {
      if (order.orderId === "o-2" && !failedOnce.has(order.orderId)) {
        failedOnce.add(order.orderId)
        yield* Effect.logWarning(`billing: payment provider timed out for ${order.orderId}, will retry`)
        return yield* Effect.fail("payment provider timeout")
      }
      billed.push({ orderId: order.orderId, deliveryCount: delivery.deliveryCount })
      yield* Effect.logInfo(`billing: charged ${order.customer} ${order.amountCents / 100} for ${order.orderId}`)
    })
  )
  yield* consumeOrders("shipping", (order) =>
    Effect.sync(() => {
      shipped.push(order.orderId)
    }).pipe(Effect.andThen(Effect.logInfo(`shipping: label printed for ${order.orderId}`)))
  )

  const receipts = yield* Publisher.publishAll(orders, [
    { orderId: "o-1", customer: "ada", amountCents: 1250 },
    { orderId: "o-2", customer: "grace", amountCents: 9900 },
    { orderId: "o-3", customer: "linus", amountCents: 420 }
  ])
  yield* Effect.logInfo(`shop: published ${receipts.length} orders`)

  // A foreign producer writes a message whose payload breaks the Schema ...
  const [bad] = yield* Effect.orDie(
    Effect.fromResult(
      Envelope.fromFields({
        ce_id: "foreign-1",
        ce_type: "com.example.shop.order.placed",
        ce_source: "urn:legacy-shop",
        ce_time: "2026-11-26T10:00:00.000Z",
        ce_topic: "orders",
        data: '{"orderId":"o-4","customer":"bob","amountCents":-5}'
      })
    ).pipe(Effect.map((e) => [e]))
  )
  yield* broker.publish([bad!])

  // Wait until billing has billed 3, shipping shipped 3, and both groups dead-lettered the bad one.
  yield* Effect.gen(function* () {
    while (billed.length < 3 || shipped.length < 3 || (yield* broker.deadLetters(orders.name)).length < 2) {
      yield* Effect.sleep("20 millis")
    }
  }).pipe(Effect.timeoutOrElse({ duration: "10 seconds", orElse: () => Effect.die(new Error("example timed out")) }))

  const deadLetters = (yield* broker.deadLetters(orders.name)).map((d) => ({
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
