/**
 * Confirmations on real Redis: the same flow as the memory broker's test, with real time — processed and
 * dead-lettered confirmations reach the publisher, also one sent while its confirmations were down.
 */
import { Confirmation, Consumer, Publisher, Topic } from "@converge/core"
import { assert, describe, it } from "@effect/vitest"
import { Data, Effect, Exit, Layer, Schema, Scope } from "effect"
import { brokerLayer } from "./helpers.ts"

const Order = Schema.Struct({ id: Schema.String, cents: Schema.Int })
const orders = Topic.make("orders", Order, { key: (o) => o.id })
class Declined extends Data.TaggedError("Declined")<{ readonly id: string }> {}
const replies = "shop.confirmations"

describe("Confirmation on Redis", () => {
  it.live("processed and dead-lettered confirmations reach the publisher, also across its restart", () =>
    Effect.gen(function* () {
      yield* Consumer.make(orders, {
        group: "billing",
        confirm: true,
        handle: (order) => (order.cents > 0 ? Effect.void : Effect.fail(new Declined({ id: order.id }))),
        errors: { Declined: "dead-letter" }
      })
      const confirmations = yield* Confirmation.make({ topic: replies, group: "shop" })
      const paid = yield* Publisher.publish(orders, { id: "o-1", cents: 100 }, { replyTo: replies })
      const declined = yield* Publisher.publish(orders, { id: "o-2", cents: 0 }, { replyTo: replies })
      assert.strictEqual((yield* confirmations.await(paid.id, "10 seconds")).outcome, "processed")
      const dead = yield* confirmations.await(declined.id, "10 seconds")
      assert.strictEqual(dead.outcome, "dead-lettered")
      assert.strictEqual(dead.reason, "permanent")
      // the publisher's confirmations stop (its process goes down) ...
      const down = yield* Scope.make()
      yield* Confirmation.make({ topic: replies, group: "shop-2" }).pipe(Scope.provide(down))
      yield* Scope.close(down, Exit.void)
      const later = yield* Publisher.publish(orders, { id: "o-3", cents: 5 }, { replyTo: replies })
      yield* Effect.sleep("500 millis")
      // ... and come back: what arrived meanwhile is received
      const back = yield* Confirmation.make({ topic: replies, group: "shop-2" })
      const got = yield* back.await(later.id, "10 seconds")
      assert.strictEqual(got.outcome, "processed")
      assert.strictEqual(got.messageId, later.id)
    }).pipe(Effect.provide(Publisher.layer().pipe(Layer.provideMerge(brokerLayer()))))
  )
})
