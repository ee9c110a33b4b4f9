import { Broker, type BrokerError, Envelope } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Fiber, Ref, Stream } from "effect"
import { TestClock } from "effect/testing"
import { MemoryBroker } from "../src/index.ts"

const yieldMany = Effect.repeat(Effect.yieldNow, { times: 50 })

/** Takes `n` deliveries and closes the subscription without settling them. */
const take = (options: Broker.SubscribeOptions, n: number) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    return yield* Stream.runCollect(Stream.take(broker.subscribe(options), n))
  })

/** A background consumer that acks everything and records what it got. */
const consume = (options: Broker.SubscribeOptions) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    const got = yield* Ref.make<Array<Broker.Delivery>>([])
    const fiber = yield* broker.subscribe(options).pipe(
      Stream.runForEach((d) => Ref.update(got, (xs) => [...xs, d]).pipe(Effect.andThen(d.ack), Effect.ignore)),
      Effect.forkScoped
    )
    return { got, fiber }
  })

const publish = (topic: string, count: number, options?: Parameters<typeof BrokerTest.messages>[2]) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    return yield* broker.publish(BrokerTest.messages(topic, count, options))
  })

const ns = (ds: ReadonlyArray<Broker.Delivery>) => ds.map((d) => (JSON.parse(d.envelope.data) as { n: number }).n)

describe("MemoryBroker fault knobs", () => {
  it.effect("duplicateNext delivers the next message twice; only one settle wins", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* memory.faults.duplicateNext("t")
      yield* publish("t", 2)
      const ds = yield* take({ topic: "t", group: "g", consumer: "c" }, 3)
      assert.deepStrictEqual(ns(ds), [0, 0, 1])
      assert.strictEqual(ds[0]!.envelope.id, ds[1]!.envelope.id, "same message id")
      assert.deepStrictEqual(
        ds.map((d) => d.deliveryCount),
        [1, 2, 1],
        "the copy counts as a redelivery"
      )
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("duplicateNext: acking both copies acks once, the second is a typed DeliveryClosed", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* memory.faults.duplicateNext("t")
      yield* publish("t", 1)
      const broker = yield* Broker.Broker
      const ds = yield* broker.subscribe({ topic: "t", group: "g", consumer: "c" }).pipe(
        Stream.take(2),
        Stream.mapEffect((d) => Effect.exit(d.ack)),
        Stream.runCollect
      )
      assert.isTrue(Exit.isSuccess(ds[0]!))
      assert.isTrue(Exit.isFailure(ds[1]!))
      const error = Exit.isFailure(ds[1]!) ? Cause.findErrorOption(ds[1]!.cause) : undefined
      assert.strictEqual(error?._tag === "Some" ? error.value.reason._tag : undefined, "DeliveryClosed")
      assert.deepStrictEqual(yield* memory.pending("t", "g"), [])
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("dropNextAck: the ack reports success but the entry stays pending and is claimed later", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* memory.faults.dropNextAck("t")
      yield* publish("t", 1)
      const [d] = yield* take({ topic: "t", group: "g", consumer: "a" }, 1)
      yield* d!.ack
      const pending = yield* memory.pending("t", "g")
      assert.strictEqual(pending.length, 1, "the dropped ack left the entry pending")
      assert.strictEqual(pending[0]!.consumer, "a")
      const b = yield* consume({ topic: "t", group: "g", consumer: "b", claimIdle: "5 seconds" })
      yield* TestClock.adjust("4 seconds")
      yield* yieldMany
      assert.strictEqual((yield* Ref.get(b.got)).length, 0, "not claimed before claimIdle")
      yield* TestClock.adjust("2 seconds")
      yield* yieldMany
      const got = yield* Ref.get(b.got)
      assert.strictEqual(got.length, 1)
      assert.strictEqual(got[0]!.deliveryCount, 2)
      assert.deepStrictEqual(yield* memory.pending("t", "g"), [], "the second ack went through")
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("reorder shuffles within windows, deterministically by seed", () => {
    const run = (seed: number) =>
      Effect.gen(function* () {
        const memory = yield* MemoryBroker.MemoryBroker
        yield* memory.faults.reorder("t", 5)
        yield* publish("t", 20)
        return ns(yield* take({ topic: "t", group: "g", consumer: "c", batchSize: 20 }, 20))
      }).pipe(Effect.provide(MemoryBroker.layer({ seed })))
    return Effect.gen(function* () {
      const a = yield* run(7)
      const b = yield* run(7)
      const c = yield* run(8)
      assert.deepStrictEqual(a, b, "same seed, same order")
      assert.notDeepEqual(
        a,
        Array.from({ length: 20 }, (_, i) => i),
        "the order changed"
      )
      assert.notDeepEqual(a, c, "another seed, another order")
      for (let w = 0; w < 20; w += 5) {
        assert.deepStrictEqual(
          [...a.slice(w, w + 5)].sort((x, y) => x - y),
          [w, w + 1, w + 2, w + 3, w + 4],
          `window ${w / 5} holds its own messages`
        )
      }
    })
  })

  it.effect("delay holds new messages until the delay has passed (TestClock)", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* memory.faults.delay("t", "10 seconds")
      const r = yield* consume({ topic: "t", group: "g", consumer: "c" })
      yield* publish("t", 3)
      yield* TestClock.adjust("9 seconds")
      yield* yieldMany
      assert.strictEqual((yield* Ref.get(r.got)).length, 0)
      yield* TestClock.adjust("1 second")
      yield* yieldMany
      assert.deepStrictEqual(ns(yield* Ref.get(r.got)), [0, 1, 2])
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("restart loses the writes not yet fsynced, and only those", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* publish("t", 5)
      yield* TestClock.adjust("1 second") // the simulated everysec fsync
      yield* publish("t", 3, { from: 5 })
      const lost = yield* memory.faults.restart
      assert.strictEqual(lost, 3)
      assert.strictEqual(yield* memory.length("t"), 5)
      assert.deepStrictEqual(ns(yield* take({ topic: "t", group: "g", consumer: "c" }, 5)), [0, 1, 2, 3, 4])
    }).pipe(Effect.provide(MemoryBroker.layer({ fsyncInterval: "1 second" })))
  )

  it.effect("restart without fsyncInterval loses nothing; fsync makes writes durable", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* publish("t", 4)
      assert.strictEqual(yield* memory.faults.restart, 0)
      assert.strictEqual(yield* memory.length("t"), 4)
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("deleteTopic removes entries, groups, pending lists and dead letters", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      const broker = yield* Broker.Broker
      yield* publish("t", 3)
      const [d] = yield* take({ topic: "t", group: "g", consumer: "c" }, 1)
      yield* d!.deadLetter({ reason: "permanent" })
      yield* memory.faults.deleteTopic("t")
      assert.strictEqual(yield* memory.length("t"), 0)
      assert.deepStrictEqual(yield* memory.pending("t", "g"), [])
      assert.deepStrictEqual(yield* broker.deadLetters("t"), [])
      const late = yield* Effect.exit(d!.ack)
      assert.isTrue(Exit.isFailure(late), "a delivery of a deleted topic cannot be acked")
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("trim keeps the newest entries and returns the removed ids", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      const ids = yield* publish("t", 10)
      const removed = yield* memory.faults.trim("t", 4)
      assert.deepStrictEqual(removed, ids.slice(0, 6))
      assert.strictEqual(yield* memory.length("t"), 4)
      assert.deepStrictEqual(ns(yield* take({ topic: "t", group: "g", consumer: "c" }, 4)), [6, 7, 8, 9])
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("killConsumer fails its stream; its in-flight delivery cannot be acked and is claimed by another", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      const broker = yield* Broker.Broker
      yield* publish("t", 1)
      const inFlight = yield* Deferred.make<Broker.Delivery>()
      const gate = yield* Deferred.make<void>()
      const ackExit = yield* Deferred.make<Exit.Exit<void, BrokerError.BrokerError>>()
      const fiber = yield* broker.subscribe({ topic: "t", group: "g", consumer: "doomed" }).pipe(
        Stream.runForEach((d) =>
          Effect.gen(function* () {
            yield* Deferred.succeed(inFlight, d)
            yield* Deferred.await(gate)
            yield* Deferred.succeed(ackExit, yield* Effect.exit(d.ack))
          })
        ),
        Effect.forkScoped
      )
      yield* Deferred.await(inFlight)
      assert.strictEqual(yield* memory.faults.killConsumer("t", "g", "doomed"), 1)
      yield* Deferred.succeed(gate, undefined)
      const exit = yield* Deferred.await(ackExit)
      assert.isTrue(Exit.isFailure(exit), "no ack after the kill")
      const streamExit = yield* Fiber.await(fiber)
      assert.isTrue(Exit.isFailure(streamExit), "the killed consumer's stream failed")
      const pending = yield* memory.pending("t", "g")
      assert.deepStrictEqual(
        pending.map((p) => [p.consumer, p.deliveryCount]),
        [["doomed", 1]]
      )
      const rescuer = yield* consume({ topic: "t", group: "g", consumer: "rescuer", claimIdle: "1 second" })
      yield* TestClock.adjust("2 seconds")
      yield* yieldMany
      const got = yield* Ref.get(rescuer.got)
      assert.strictEqual(got.length, 1)
      assert.strictEqual(got[0]!.deliveryCount, 2)
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("appendRaw: an entry written by a foreign client with the documented fields is consumed", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* memory.faults.appendRaw("t", {
        ce_id: "foreign-1",
        ce_type: "com.example.thing",
        ce_source: "urn:other-service",
        ce_time: "2026-01-02T03:04:05.000Z",
        ce_topic: "t",
        ce_subject: "key-1",
        ce_tenant: "acme",
        data: '{"n":41,"text":"from outside"}'
      })
      const [d] = yield* take({ topic: "t", group: "g", consumer: "c" }, 1)
      assert.deepStrictEqual(d!.envelope, {
        id: "foreign-1",
        topic: "t",
        type: "com.example.thing",
        source: "urn:other-service",
        key: "key-1",
        time: "2026-01-02T03:04:05.000Z",
        attempt: 1,
        headers: { tenant: "acme" },
        data: '{"n":41,"text":"from outside"}'
      })
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )
})

describe("MemoryBroker", () => {
  it.effect("retention trims old entries but never one still pending or unread", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      yield* publish("t", 3)
      const held = yield* take({ topic: "t", group: "g", consumer: "c" }, 1) // entry 0 pending
      yield* publish("t", 200, { from: 3 })
      assert.strictEqual(yield* memory.length("t"), 203, "group g still needs everything from entry 0")
      yield* held[0]!.ack
      const rest = yield* take({ topic: "t", group: "g", consumer: "c", batchSize: 500 }, 202)
      yield* Effect.forEach(rest, (d) => d.ack)
      yield* publish("t", 1, { from: 203 })
      assert.strictEqual(yield* memory.length("t"), 5, "trimmed to the retention once nothing needs the old entries")
    }).pipe(Effect.provide(MemoryBroker.layer({ retention: 5 })))
  )

  it.effect(
    "groups lists a topic's groups from their first subscription; with retention 0 only they keep entries",
    () =>
      Effect.gen(function* () {
        const memory = yield* MemoryBroker.MemoryBroker
        assert.deepStrictEqual(yield* memory.groups("t"), [], "no topic, no groups")
        yield* publish("t", 150) // more than the trim step (100)
        assert.strictEqual(yield* memory.length("t"), 0, "retention 0 and no group: nothing is kept")
        // group b: created by a subscription that ends before anything is published
        const b = yield* Effect.forkScoped(
          Stream.runDrain((yield* Broker.Broker).subscribe({ topic: "t", group: "b", consumer: "c" }))
        )
        yield* yieldMany
        yield* Fiber.interrupt(b)
        const { got } = yield* consume({ topic: "t", group: "a", consumer: "c" })
        yield* yieldMany
        assert.deepStrictEqual(yield* memory.groups("t"), ["b", "a"], "in creation order")
        yield* publish("t", 150, { from: 150 })
        yield* yieldMany
        const seen = ns(yield* Ref.get(got))
        assert.deepStrictEqual([seen.length, seen[0], seen.at(-1)], [150, 150, 299], "published after: none lost")
        assert.strictEqual(yield* memory.length("t"), 150, "group b has read none of them: they are kept for it")
        yield* memory.faults.deleteTopic("t")
        assert.deepStrictEqual(yield* memory.groups("t"), [])
      }).pipe(Effect.provide(MemoryBroker.layer({ retention: 0 })))
  )

  it.effect("nack with a delay keeps the key parked (ordered mode)", () =>
    Effect.gen(function* () {
      yield* publish("t", 2, { keyOf: () => "k" })
      const [first] = yield* take({ topic: "t", group: "g", consumer: "c" }, 1)
      yield* first!.nack("1 minute")
      const r = yield* consume({ topic: "t", group: "g", consumer: "d" })
      yield* TestClock.adjust("59 seconds")
      yield* yieldMany
      assert.deepStrictEqual(ns(yield* Ref.get(r.got)), [], "message 1 waits behind message 0")
      yield* TestClock.adjust("1 second")
      yield* yieldMany
      assert.deepStrictEqual(ns(yield* Ref.get(r.got)), [0, 1])
    }).pipe(Effect.provide(MemoryBroker.layer({ orderedPerKey: true })))
  )

  it.effect("dead letters are listed with reason and error, and purged", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      yield* publish("t", 2)
      const ds = yield* take({ topic: "t", group: "g", consumer: "c" }, 2)
      yield* ds[0]!.deadLetter({ reason: "permanent", error: '{"_tag":"Boom"}' })
      yield* ds[1]!.deadLetter({ reason: "exhausted" })
      const dlq = yield* broker.deadLetters("t")
      assert.deepStrictEqual(
        dlq.map((x) => [x.reason, x.error, x.group, x.originalEntryId, x.deliveryCount]),
        [
          ["permanent", '{"_tag":"Boom"}', "g", ds[0]!.entryId, 1],
          ["exhausted", undefined, "g", ds[1]!.entryId, 1]
        ]
      )
      assert.deepStrictEqual(dlq[0]!.envelope, ds[0]!.envelope)
      assert.strictEqual(dlq[0]!.fields[Envelope.FieldNames.id], ds[0]!.envelope.id)
      assert.strictEqual(yield* broker.purgeDeadLetters("t", [dlq[0]!.id]), 1)
      assert.strictEqual((yield* broker.deadLetters("t")).length, 1)
      assert.strictEqual(yield* broker.purgeDeadLetters("t"), 1)
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )
})

describe("wake-ups", () => {
  /** Subscribes `consumer` in the background; every delivery is kept unsettled in `held`. */
  const hold = (group: string, consumer: string, held: Ref.Ref<Array<string>>) =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      return yield* broker.subscribe({ topic: "t", group, consumer, batchSize: 1 }).pipe(
        Stream.runForEach(() => Ref.update(held, (xs) => [...xs, `${group}/${consumer}`])),
        Effect.forkScoped
      )
    })

  it.effect("one publish of many messages reaches every waiting consumer of the group, not only the first", () =>
    Effect.gen(function* () {
      const held = yield* Ref.make<Array<string>>([])
      for (const c of ["c0", "c1", "c2", "c3"]) yield* hold("g", c, held)
      yield* yieldMany // all four are waiting
      yield* publish("t", 4)
      yield* yieldMany
      // batch size 1 and nothing settled: each consumer holds one message only if the reader that filled its
      // batch woke the next one
      assert.deepStrictEqual([...(yield* Ref.get(held))].sort(), ["g/c0", "g/c1", "g/c2", "g/c3"])
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  /** A background reader that records the message numbers of each read and acks it. */
  const recordReads = (batchSize: number) =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const reads = yield* Ref.make<Array<ReadonlyArray<number>>>([])
      yield* broker.subscribe({ topic: "t", group: "g", consumer: "c", batchSize }).pipe(
        Stream.runForEachArray((ds) =>
          Effect.andThen(
            Ref.update(reads, (xs) => [...xs, ns(ds)]),
            broker.ackAll(ds)
          )
        ),
        Effect.forkScoped
      )
      yield* yieldMany // the reader is waiting
      return reads
    })

  /** Publishes messages `from`..`to - 1` of topic `t`, one publish each, without yielding between them. */
  const publishEach = (from: number, to: number) =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      for (const m of BrokerTest.messages("t", to - from, { from })) yield* broker.publish([m])
    })

  const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i)

  it.effect("a woken reader runs after the publisher yields: publishes made meanwhile come in one read", () =>
    Effect.gen(function* () {
      const reads = yield* recordReads(100)
      yield* publishEach(0, 10)
      assert.deepStrictEqual(yield* Ref.get(reads), [], "the reader did not run inside a publish")
      yield* yieldMany
      assert.deepStrictEqual(yield* Ref.get(reads), [range(0, 10)], "one read of all ten, in order")
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("a reader runs inside the publish that completes its batch: a publisher runs one batch ahead", () =>
    Effect.gen(function* () {
      const reads = yield* recordReads(10)
      yield* publishEach(0, 25)
      assert.deepStrictEqual(
        yield* Ref.get(reads),
        [range(0, 10), range(10, 20)],
        "a full batch was read as soon as it was published"
      )
      yield* yieldMany
      assert.deepStrictEqual(yield* Ref.get(reads), [range(0, 10), range(10, 20), range(20, 25)])
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("a publish wakes one reader in each group: every group gets the message, once", () =>
    Effect.gen(function* () {
      const held = yield* Ref.make<Array<string>>([])
      for (const g of ["a", "b"]) for (const c of ["c0", "c1"]) yield* hold(g, c, held)
      yield* yieldMany
      yield* publish("t", 1)
      yield* yieldMany
      assert.deepStrictEqual(
        (yield* Ref.get(held)).map((x) => x.split("/")[0]).sort(),
        ["a", "b"],
        "one delivery per group"
      )
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )
})

describe("batch settlement", () => {
  it.effect("ackAll acks live deliveries once, skips settled ones and never another entry", () =>
    Effect.gen(function* () {
      const memory = yield* MemoryBroker.MemoryBroker
      const broker = yield* Broker.Broker
      yield* publish("t", 4)
      const ds = yield* take({ topic: "t", group: "g", consumer: "c" }, 4)
      yield* ds[0]!.ack
      assert.strictEqual(yield* broker.ackAll([ds[0]!, ds[1]!, ds[1]!, ds[2]!]), 2)
      assert.deepStrictEqual(
        (yield* memory.pending("t", "g")).map((p) => p.entryId),
        [ds[3]!.entryId],
        "only the untouched entry is still pending"
      )
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )

  it.effect("ackAll rejects a delivery of another broker with a typed error", () =>
    Effect.gen(function* () {
      const foreign = yield* Effect.scoped(
        Effect.gen(function* () {
          yield* publish("t", 1)
          return (yield* take({ topic: "t", group: "g", consumer: "c" }, 1))[0]!
        }).pipe(Effect.provide(MemoryBroker.layer()))
      )
      const broker = yield* Broker.Broker
      const error = yield* Effect.flip(broker.ackAll([foreign]))
      assert.strictEqual(error.reason._tag, "InvalidArgument")
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )
})
