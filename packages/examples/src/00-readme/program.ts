/**
 * Example 00 — the README's "A taste": a complete program. A billing consumer charges orders; a declined
 * payment is a permanent failure and goes to the dead-letter queue; the program waits for the effect it
 * expects and exits. Run it with `pnpm --filter @converge/examples taste`; a test runs it too, so the
 * README never shows code that does not run.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { NodeRuntime } from "@effect/platform-node"
import { Data, Deferred, Effect, Layer, Schedule, Schema } from "effect"

const OrderPlaced = Schema.Struct({ orderId: Schema.String, amountCents: Schema.Int })
/** The orders topic: a name, a payload Schema, and the ordering key. */
export const orders = Topic.make("orders", OrderPlaced, { key: (o) => o.orderId })
class PaymentDeclined extends Data.TaggedError("PaymentDeclined")<{ readonly orderId: string }> {}

/** Starts a billing consumer, publishes two orders, waits until the second is billed; returns the dead letters. */
export const program = Effect.gen(function* () {
  const billed = yield* Deferred.make<string>()
  yield* Consumer.make(orders, {
    group: "billing",
    handle: (order, ctx) =>
      order.amountCents > 0
        ? Effect.log(`billed ${order.orderId} (message ${ctx.id}, attempt ${ctx.attempt})`).pipe(
            Effect.andThen(Deferred.succeed(billed, order.orderId))
          )
        : Effect.fail(new PaymentDeclined({ orderId: order.orderId })),
    errors: { PaymentDeclined: "dead-letter" }, // leave a tag out: compile error
    retry: Schedule.exponential("100 millis").pipe(Schedule.upTo({ times: 5 }))
  })
  yield* Publisher.publish(orders, { orderId: "o-1", amountCents: 0 })
  yield* Publisher.publish(orders, { orderId: "o-2", amountCents: 1250 })
  yield* Deferred.await(billed) // o-2 billed; o-1, handled before it, is dead-lettered by then
  const dead = yield* DeadLetter.list(orders.name)
  for (const d of dead) yield* Effect.log(`dead-lettered ${d.envelope?.key} (${d.reason}): ${d.error}`)
  return dead
})

/** The layers: the in-memory broker here; `RedisStreamsBroker.layer` in production. */
export const layer = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))

/** The whole program: the consumer lives in its scope, which closes (a graceful shutdown) before the broker. */
export const main = program.pipe(Effect.scoped, Effect.provide(layer))

if (import.meta.main) NodeRuntime.runMain(main)
