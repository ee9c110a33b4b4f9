/**
 * Example 00 — the README's "A taste", verbatim (the test runs it, so the
 * README never shows code that does not run).
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Broker, Envelope, Publisher, Topic } from "@converge/core"
import { Effect, Layer, Schema, Stream } from "effect"

const OrderPlaced = Schema.Struct({ orderId: Schema.String, amountCents: Schema.Int })
const orders = Topic.make("orders", OrderPlaced, { key: (o) => o.orderId })

/** Publishes one order and bills it. */
export const program = Effect.gen(function* () {
  yield* Publisher.publish(orders, { orderId: "o-1", amountCents: 1250 })
  const broker = yield* Broker.Broker
  yield* broker.subscribe({ topic: "orders", group: "billing", consumer: "billing-1" }).pipe(
    Stream.take(1),
    Stream.runForEach((delivery) =>
      // ack on success, nack on failure, nothing on interruption: from the exit
      Broker.process(
        delivery,
        Effect.fromResult(Envelope.decodeResult(orders, delivery.envelope)).pipe(
          Effect.flatMap((order) => Effect.log(`bill ${order.payload.orderId}`))
        )
      )
    )
  )
})

/** The layers of the README example. */
export const layer = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))
