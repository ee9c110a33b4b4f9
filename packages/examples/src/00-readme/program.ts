/**
 * Example 00 — the README's "A taste" (the same code plus doc comments; the test runs it, so the
 * README never shows code that does not run).
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, Publisher, Topic } from "@converge/core"
import { Data, Effect, Layer, Schedule, Schema } from "effect"

const OrderPlaced = Schema.Struct({ orderId: Schema.String, amountCents: Schema.Int })
/** The orders topic. */
export const orders = Topic.make("orders", OrderPlaced, { key: (o) => o.orderId })
class PaymentDeclined extends Data.TaggedError("PaymentDeclined")<{ readonly orderId: string }> {}

/** Starts a billing consumer, then publishes two orders. */
export const program = Effect.gen(function* () {
  yield* Consumer.make(orders, {
    group: "billing",
    handle: (order, ctx) =>
      order.amountCents > 0
        ? Effect.log(`billed ${order.orderId} (message ${ctx.id}, attempt ${ctx.attempt})`)
        : Effect.fail(new PaymentDeclined({ orderId: order.orderId })),
    errors: { PaymentDeclined: "dead-letter" }, // leave a tag out: compile error
    retry: Schedule.exponential("100 millis").pipe(Schedule.upTo({ times: 5 }))
  })
  yield* Publisher.publish(orders, { orderId: "o-1", amountCents: 1250 })
  yield* Publisher.publish(orders, { orderId: "o-2", amountCents: 0 })
})

/** The layers: the in-memory broker here; `RedisStreamsBroker.layer` in production. */
export const layer = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))
