/**
 * The Redis layer under hand-over, slow handlers and shutdowns: claims take only other consumers' entries,
 * and a closing subscription releases what it read and did not settle.
 */
import { Broker, Consumer, Publisher, Topic } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Fiber, Layer, Ref, Schema, Stream } from "effect"
import { brokerLayer } from "./helpers.ts"

const Item = Schema.Struct({ n: Schema.Int })
const items = Topic.make("items", Item, { key: (i) => `k${i.n}` })

/** Waits until `cond` holds (real time), failing after `ms`. */
const until = <E, R>(cond: Effect.Effect<boolean, E, R>, ms = 15_000, what = "condition") =>
  Effect.gen(function* () {
    for (let waited = 0; waited < ms; waited += 50) {
      if (yield* cond) return
      yield* Effect.sleep(50)
    }
    assert.fail(`${what} not reached in ${ms} ms`)
  })

describe("RedisStreamsBroker hand-over", () => {
  it.live("a handler slower than claimIdle is not a dead consumer: its message is not claimed back by itself", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<{ readonly n: number; readonly count: number }>>([])
      yield* Consumer.make(items, {
        group: "g",
        consumer: "slow",
        claimIdle: "300 millis",
        handle: (item, ctx) =>
          Ref.update(seen, (xs) => [...xs, { n: item.n, count: ctx.deliveryCount }]).pipe(
            Effect.andThen(item.n === 0 ? Effect.sleep("1500 millis") : Effect.void)
          )
      })
      yield* Publisher.publishAll(items, [{ n: 0 }, { n: 1 }])
      yield* until(Effect.map(Ref.get(seen), (xs) => xs.some((x) => x.n === 1)))
      yield* Effect.sleep("500 millis")
      // before: the claim scan took the consumer's own idle message, and the handler ran it twice (count 2)
      assert.deepStrictEqual(yield* Ref.get(seen), [
        { n: 0, count: 1 },
        { n: 1, count: 1 }
      ])
    }).pipe(Effect.provide(Publisher.layer().pipe(Layer.provideMerge(brokerLayer()))))
  )

  it.live("a closing subscription releases what it read and did not settle: another consumer claims it at once", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      yield* broker.publish(BrokerTest.messages("items", 10))
      // A reads a batch of 10 and settles 2, then closes (its read kept ahead, or an interrupted handler)
      const first = yield* Deferred.make<ReadonlyArray<Broker.Delivery>>()
      const a = yield* broker.subscribe({ topic: "items", group: "g", consumer: "a", batchSize: 10 }).pipe(
        Stream.runForEachArray((ds) => Deferred.succeed(first, ds).pipe(Effect.andThen(Effect.never))),
        Effect.forkChild
      )
      const read = yield* Deferred.await(first)
      assert.strictEqual(read.length, 10)
      yield* broker.ackAll(read.slice(0, 2))
      yield* Fiber.interrupt(a)
      // B claims only entries idle for a minute: without the release it would wait that long
      const got = yield* Ref.make<Array<{ readonly id: string; readonly count: number }>>([])
      yield* broker.subscribe({ topic: "items", group: "g", consumer: "b", claimIdle: "1 minute" }).pipe(
        Stream.runForEach((d) => Ref.update(got, (xs) => [...xs, { id: d.entryId, count: d.deliveryCount }])),
        Effect.forkScoped
      )
      yield* until(
        Effect.map(Ref.get(got), (xs) => xs.length >= 8),
        5_000,
        "the 8 released entries claimed by b"
      )
      const claimed = yield* Ref.get(got)
      assert.deepStrictEqual(
        claimed.map((x) => x.id).sort(),
        read
          .slice(2)
          .map((d) => d.entryId)
          .sort()
      )
      assert.isTrue(
        claimed.every((x) => x.count === 2),
        "delivery counts kept: read once by a, once by b"
      )
    }).pipe(Effect.provide(brokerLayer()))
  )
})
