/**
 * The Redis layer under hand-over, slow handlers and shutdowns: claims take only other consumers' entries,
 * and a closing subscription releases what it read and did not settle.
 */
import { Broker, type BrokerError, Consumer, Partition, Publisher, Topic } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Clock, Deferred, Effect, Fiber, Layer, Queue, Ref, Schema, Stream } from "effect"
import * as Redis from "effect/persistence/Redis"
import { brokerLayer, mainUrl, Prefix } from "./helpers.ts"

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

  it.live(
    "a key backing off when its partition moves away is not stuck when the partition comes back",
    () =>
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        // K and J hash to different partitions of 2
        const keys = Array.from({ length: 50 }, (_, i) => `key-${i}`)
        const K = keys.find((k) => Partition.of(k, 2) === 0)!
        const J = keys.find((k) => Partition.of(k, 2) === 1)!
        const message = (key: string, n: number) => ({ ...BrokerTest.messages("items", 1, { from: n })[0]!, key })
        yield* broker.publish([message(K, 1), message(J, 1)])
        const take = (consumer: string) =>
          Effect.gen(function* () {
            const queue = yield* Queue.unbounded<Broker.Delivery>()
            const fiber = yield* broker.subscribe({ topic: "items", group: "g", consumer, claimIdle: "1 minute" }).pipe(
              Stream.runForEach((d) => Queue.offer(queue, d)),
              Effect.forkChild
            )
            return { queue, fiber }
          })
        const next = (q: Queue.Queue<Broker.Delivery>, what: string) =>
          Queue.take(q).pipe(
            Effect.timeoutOrElse({
              duration: "8 seconds",
              orElse: () => Effect.die(`timed out waiting for ${what}`)
            })
          )
        const a = yield* take("a")
        const first = [yield* next(a.queue, "a's first delivery"), yield* next(a.queue, "a's second delivery")]
        const m1 = first.find((d) => d.envelope.key === K)!
        const j1 = first.find((d) => d.envelope.key === J)!
        // M1 of K backs off; J1 stays in flight, so a keeps J's partition and gives K's away
        yield* m1.nack("1 second", { attempt: 2 })
        const b = yield* take("b")
        const retried = yield* next(b.queue, "M1's retry at b")
        assert.strictEqual(retried.envelope.id, m1.envelope.id)
        yield* retried.ack
        yield* Fiber.interrupt(b.fiber) // b leaves and gives the partition back
        const m2Published = message(K, 2)
        yield* broker.publish([m2Published])
        // a takes K's partition again: M2 of K must reach it (before: K stayed parked behind M1's old back-off)
        const m2 = yield* next(a.queue, "M2 of K at a")
        assert.strictEqual(m2.envelope.key, K)
        assert.strictEqual(m2.envelope.id, m2Published.id)
        yield* j1.ack
        yield* m2.ack
      }).pipe(Effect.provide(brokerLayer(mainUrl, { orderedPerKey: true, partitions: 2, leaseTime: "1 second" }))),
    30_000
  )

  it.live(
    "batches slower than the lease: the lease is renewed meanwhile, and every message runs once",
    () =>
      Effect.gen(function* () {
        const runs = yield* Ref.make<Array<{ readonly id: string; readonly at: number; readonly until: number }>>([])
        const handle = (_: typeof Item.Type, ctx: Consumer.MessageContext) =>
          Effect.gen(function* () {
            const at = yield* Clock.currentTimeMillis
            yield* Effect.sleep("100 millis")
            const until = yield* Clock.currentTimeMillis
            yield* Ref.update(runs, (xs) => [...xs, { id: ctx.id, at, until }])
          })
        for (const consumer of ["c1", "c2"]) {
          yield* Consumer.make(items, { group: "g", consumer, batchSize: 8, ordering: "per-key", handle })
        }
        yield* Publisher.publishAll(
          items,
          Array.from({ length: 40 }, (_, n) => ({ n }))
        )
        yield* until(
          Effect.map(Ref.get(runs), (xs) => xs.length >= 40),
          30_000,
          "40 messages handled"
        )
        yield* Effect.sleep("1 second")
        const all = yield* Ref.get(runs)
        // before: a standby took the lease during a slow batch and ran messages the owner was running
        assert.strictEqual(all.length, 40, "each message ran exactly once")
        assert.strictEqual(new Set(all.map((r) => r.id)).size, 40)
      }).pipe(
        Effect.provide(
          Publisher.layer().pipe(
            Layer.provideMerge(brokerLayer(mainUrl, { orderedPerKey: true, partitions: 1, leaseTime: "600 millis" }))
          )
        )
      ),
    60_000
  )

  it.live("a settlement after the lease moved fails with DeliveryClosed and changes nothing", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      yield* broker.publish(BrokerTest.messages("items", 3, { keyOf: () => "k" }))
      const got = yield* Deferred.make<Broker.Delivery>()
      const reader = yield* broker.subscribe({ topic: "items", group: "g", consumer: "old", batchSize: 1 }).pipe(
        Stream.runForEach((d) => Deferred.succeed(got, d)),
        Effect.forkChild
      )
      const d = yield* Deferred.await(got)
      // the lease passes to another consumer (as when it expired and was taken)
      const lease = `${prefix}:{items}:lease:g:p0`
      yield* redis.send("SET", lease, "someone-else/1", "PX", "60000")
      const closed = (e: BrokerError.BrokerError) => assert.strictEqual(e.reason._tag, "DeliveryClosed")
      closed(yield* Effect.flip(d.ack))
      closed(yield* Effect.flip(d.nack("1 second")))
      closed(yield* Effect.flip(d.deadLetter({ reason: "permanent" })))
      assert.strictEqual(yield* broker.ackAll([d]), 0)
      const pending = yield* redis.send<Array<Array<unknown>>>(
        "XPENDING",
        `${prefix}:{items}`,
        "g",
        d.entryId,
        d.entryId,
        "1"
      )
      assert.strictEqual(pending.length, 1, "still pending, for the new owner")
      assert.strictEqual(Number(yield* redis.send<number>("ZCARD", `${prefix}:{items}:delayed:g`)), 0, "no retry")
      assert.deepStrictEqual(yield* broker.deadLetters("items"), [], "not dead-lettered")
      yield* Fiber.interrupt(reader)
    }).pipe(Effect.provide(brokerLayer(mainUrl, { orderedPerKey: true, leaseTime: "30 seconds" })))
  )

  it.live("unordered: a nack or dead-letter after another consumer claimed the entry fails with DeliveryClosed", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      yield* broker.publish(BrokerTest.messages("items", 1))
      const [d] = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "items", group: "g", consumer: "slow" }), 1)
      )
      yield* redis.send("XCLAIM", `${prefix}:{items}`, "g", "rescuer", "0", d!.entryId)
      const closed = (e: BrokerError.BrokerError) => assert.strictEqual(e.reason._tag, "DeliveryClosed")
      closed(yield* Effect.flip(d!.nack("1 second")))
      closed(yield* Effect.flip(d!.deadLetter({ reason: "permanent" })))
      assert.deepStrictEqual(yield* broker.deadLetters("items"), [], "a stale dead-letter copies nothing")
      assert.strictEqual(
        Number(yield* redis.send<number>("ZCARD", `${prefix}:{items}:delayed:g`)),
        0,
        "a stale nack schedules no retry"
      )
      const pending = yield* redis.send<Array<Array<unknown>>>("XPENDING", `${prefix}:{items}`, "g", "-", "+", "10")
      assert.deepStrictEqual(
        pending.map((p) => String(p[1])),
        ["rescuer"]
      )
      // a late ack is the documented exception in unordered mode: its handler succeeded, so it still counts
      yield* d!.ack
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("a delayed entry the mover cannot move is dead-lettered with its reason, and reading goes on", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const got = yield* Ref.make<Array<number>>([])
      yield* broker.subscribe({ topic: "items", group: "g", consumer: "c" }).pipe(
        Stream.runForEach((d) =>
          Effect.andThen(
            Ref.update(got, (xs) => [...xs, JSON.parse(d.envelope.data).n]),
            d.ack
          )
        ),
        Effect.forkScoped
      )
      yield* broker.publish(BrokerTest.messages("items", 1))
      yield* until(Effect.map(Ref.get(got), (xs) => xs.length >= 1))
      // a due entry nobody can move: not JSON (written by hand, or damaged)
      yield* redis.send("ZADD", `${prefix}:{items}:delayed:g`, "0", "not json at all")
      yield* Effect.sleep("300 millis")
      yield* broker.publish(BrokerTest.messages("items", 1, { from: 1 }))
      // before: the mover's error aborted every read, and the group stopped for good
      yield* until(Effect.map(Ref.get(got), (xs) => xs.length >= 2))
      assert.deepStrictEqual(yield* Ref.get(got), [0, 1])
      const dead = yield* broker.deadLetters("items")
      assert.strictEqual(dead.length, 1)
      assert.strictEqual(dead[0]!.reason, "unmovable")
      assert.strictEqual(dead[0]!.group, "g")
      assert.include(dead[0]!.error!, "field/value pairs")
      assert.strictEqual(Number(yield* redis.send<number>("ZCARD", `${prefix}:{items}:delayed:g`)), 0)
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("a group's retry stream is trimmed to what the group still needs", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const acked = yield* Ref.make(0)
      yield* broker.subscribe({ topic: "items", group: "g", consumer: "c" }).pipe(
        // every message is nacked once (a short delayed redelivery through the retry stream), then acked
        Stream.runForEach((d) =>
          d.deliveryCount === 1
            ? d.nack("10 millis")
            : Effect.andThen(
                d.ack,
                Ref.update(acked, (n) => n + 1)
              )
        ),
        Effect.forkScoped
      )
      yield* broker.publish(BrokerTest.messages("items", 20))
      yield* until(Effect.map(Ref.get(acked), (n) => n >= 20))
      const retry = `${prefix}:{items}:retry:g`
      // before: every redelivery copy stayed in the retry stream for good (20 here)
      yield* until(
        Effect.map(redis.send<number>("XLEN", retry), (n) => Number(n) <= 1),
        5_000,
        "the retry stream trimmed"
      )
    }).pipe(Effect.provide(brokerLayer(mainUrl, { trimInterval: "200 millis" })))
  )

  it.live(
    "a takeover claims every pending entry of the previous owner, however many (paged, not capped at 10 000)",
    () =>
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        const total = 10_050
        for (let i = 0; i < total; i += 1000) {
          yield* broker.publish(BrokerTest.messages("items", Math.min(1000, total - i), { from: i }))
        }
        // a reads everything and settles nothing, then leaves: its entries stay pending under its name
        const read = yield* Ref.make(0)
        const a = yield* broker.subscribe({ topic: "items", group: "g", consumer: "a", batchSize: 1000 }).pipe(
          Stream.runForEach(() => Ref.update(read, (n) => n + 1)),
          Effect.forkChild
        )
        yield* until(
          Effect.map(Ref.get(read), (n) => n >= total),
          30_000,
          "a read everything"
        )
        yield* Fiber.interrupt(a)
        // b takes the partition over: it claims a's pending entries, all of them
        const got = new Set<string>()
        yield* broker
          .subscribe({ topic: "items", group: "g", consumer: "b", batchSize: 1000, claimIdle: "1 hour" })
          .pipe(
            Stream.runForEachArray((ds) =>
              Effect.andThen(
                Effect.sync(() => {
                  for (const d of ds) got.add(d.envelope.id)
                }),
                broker.ackAll(ds)
              )
            ),
            Effect.forkScoped
          )
        yield* until(
          Effect.sync(() => got.size >= total),
          30_000,
          `b got all ${total}`
        )
      }).pipe(Effect.provide(brokerLayer(mainUrl, { orderedPerKey: true, leaseTime: "1 second" }))),
    90_000
  )
})
