import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Data, Effect, Exit, Fiber, Layer, Schema, Scope } from "effect"
import { TestClock } from "effect/testing"
import { Confirmation, Consumer, Publisher, Topic } from "../src/index.ts"

const Order = Schema.Struct({ id: Schema.String, cents: Schema.Int })
const orders = Topic.make("orders", Order, { key: (o) => o.id })
class Declined extends Data.TaggedError("Declined")<{ readonly id: string }> {}

const replies = "shop.confirmations"

/** Billing: confirms every message; a zero amount is declined for good. */
const billing = Consumer.make(orders, {
  group: "billing",
  confirm: true,
  handle: (order) => (order.cents > 0 ? Effect.void : Effect.fail(new Declined({ id: order.id }))),
  errors: { Declined: "dead-letter" }
})

const Live = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))

/** Lets the broker's readers and the consumers run (TestClock: time moves only when told). */
const settle = Effect.gen(function* () {
  for (let i = 0; i < 20; i++) {
    yield* Effect.yieldNow
    yield* TestClock.adjust(10)
  }
})

describe("Confirmation", () => {
  it.effect("a processed and a dead-lettered message are confirmed to the publisher, typed", () =>
    Effect.gen(function* () {
      yield* billing
      const confirmations = yield* Confirmation.make({ topic: replies, group: "shop" })
      const paid = yield* Publisher.publish(orders, { id: "o-1", cents: 100 }, { replyTo: replies })
      const declined = yield* Publisher.publish(orders, { id: "o-2", cents: 0 }, { replyTo: replies })
      yield* Publisher.publish(orders, { id: "o-3", cents: 5 }) // no replyTo: no confirmation
      yield* settle
      const ok = yield* confirmations.await(paid.id, "1 second")
      assert.deepStrictEqual(ok, {
        messageId: paid.id,
        topic: "orders",
        group: "billing",
        outcome: "processed",
        attempts: 1
      })
      const dead = yield* confirmations.await(declined.id, "1 second")
      assert.strictEqual(dead.outcome, "dead-lettered")
      assert.strictEqual(dead.reason, "permanent")
      assert.include(dead.error!, "Declined")
      const memory = yield* MemoryBroker.MemoryBroker
      assert.strictEqual(yield* memory.length(replies), 2, "one confirmation per message that asked")
    }).pipe(Effect.provide(Live))
  )

  it.effect("a confirmation sent while the publisher was down is received after it restarts", () =>
    Effect.gen(function* () {
      yield* billing
      // the publisher's confirmations run, then stop (its process goes down)
      const first = yield* Scope.make()
      yield* Confirmation.make({ topic: replies, group: "shop" }).pipe(Scope.provide(first))
      yield* Scope.close(first, Exit.void)
      const sent = yield* Publisher.publish(orders, { id: "o-9", cents: 100 }, { replyTo: replies })
      yield* settle
      // restarted: the same group receives what arrived meanwhile
      const again = yield* Confirmation.make({ topic: replies, group: "shop" })
      const waiting = yield* Effect.forkChild(again.await(sent.id, "5 seconds"))
      yield* settle
      const got = yield* Fiber.join(waiting)
      assert.strictEqual(got.messageId, sent.id)
      assert.strictEqual(got.outcome, "processed")
    }).pipe(Effect.provide(Live))
  )

  it.effect("await fails with ConfirmationTimeout when none arrives in time (TestClock)", () =>
    Effect.gen(function* () {
      const confirmations = yield* Confirmation.make({ topic: replies, group: "shop" })
      const waiting = yield* Effect.forkChild(Effect.flip(confirmations.await("never-published", "3 seconds")))
      yield* TestClock.adjust("2 seconds")
      assert.isUndefined(waiting.pollUnsafe(), "still waiting before the timeout")
      yield* TestClock.adjust("2 seconds")
      const error = yield* Fiber.join(waiting)
      assert.strictEqual(error._tag, "ConfirmationTimeout")
      assert.include(error.message, "never-published")
    }).pipe(Effect.provide(Live))
  )

  it.effect("a repeated confirmation (at-least-once) is acknowledged, not left pending", () =>
    Effect.gen(function* () {
      const confirmations = yield* Confirmation.make({ topic: replies, group: "shop" })
      const confirmation: Confirmation.Confirmation = {
        messageId: "m-1",
        topic: "orders",
        group: "billing",
        outcome: "processed",
        attempts: 1
      }
      yield* Publisher.publish(Confirmation.topic(replies), confirmation)
      yield* Publisher.publish(Confirmation.topic(replies), confirmation)
      yield* settle
      assert.deepStrictEqual(yield* confirmations.await("m-1", "1 second"), confirmation)
      yield* settle
      const memory = yield* MemoryBroker.MemoryBroker
      assert.deepStrictEqual(yield* memory.pending(replies, "shop"), [], "both copies acknowledged")
    }).pipe(Effect.provide(Live))
  )
})
