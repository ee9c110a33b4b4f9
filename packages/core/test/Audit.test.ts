import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Metric, Schema, Stream } from "effect"
import { Audit, Broker, Consumer, Metrics, Publisher, Topic } from "../src/index.ts"
import { AuditTest } from "../src/testing/index.ts"

const Live = Publisher.layer().pipe(
  Layer.provideMerge(MemoryBroker.layer()),
  Layer.provideMerge(Audit.layerMemory({ deliveries: true }))
)

describe("Audit (memory store)", () => {
  it.live("one message's publish → retry → dead-letter → replay → handled, in order, with attempts and reasons", () =>
    Effect.scoped(AuditTest.lifecycle).pipe(Effect.provide(Live))
  )

  it.live("off by topic, sampled by message id, and nothing at all without a sink", () =>
    Effect.gen(function* () {
      const quiet = Topic.make("audit.quiet", Schema.String)
      const half = Topic.make("audit.half", Schema.String)
      const memory = Audit.makeMemory({ topics: { "audit.quiet": false, "audit.half": 0.5 } })
      const run = Effect.gen(function* () {
        yield* Publisher.publishAll(quiet, ["a", "b"])
        yield* Publisher.publishAll(
          half,
          Array.from({ length: 400 }, (_, i) => `m${i}`)
        )
      }).pipe(
        Effect.provide(Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))),
        Effect.provideService(Audit.AuditSink, memory.sink)
      )
      yield* run
      assert.strictEqual(memory.events.filter((e) => e.topic === "audit.quiet").length, 0)
      const sampled = memory.events.filter((e) => e.topic === "audit.half").length
      assert.isAbove(sampled, 140)
      assert.isBelow(sampled, 260)
      // the same ids are chosen every time (all of a message's events, or none)
      const ids = memory.events.map((e) => e.messageId)
      assert.isTrue(ids.every((id) => memory.sink.records("audit.half", id)))
      assert.throws(() => Audit.recorder({ topics: { x: 2 } }), /from 0 to 1/)
    })
  )
})

describe("lost in broker", () => {
  it.live("entries the broker deletes while pending are counted and audited as lost-in-broker", () =>
    Effect.gen(function* () {
      const topic = Topic.make(`audit.lost.${Math.random().toString(36).slice(2, 8)}`, Schema.String)
      const broker = yield* Broker.Broker
      const memory = yield* MemoryBroker.MemoryBroker
      yield* Publisher.publishAll(topic, ["a", "b", "c"])
      // a consumer that died holding three deliveries: pending, never settled
      const held = (yield* broker
        .subscribe({ topic: topic.name, group: "g", consumer: "holder" })
        .pipe(Stream.take(3), Stream.runCollect)).map((d) => d.entryId)
      yield* memory.faults.trim(topic.name, 0)
      yield* Consumer.make(topic, { group: "g", claimIdle: "50 millis", handle: () => Effect.void })
      yield* Publisher.publish(topic, "d")
      let lost: ReadonlyArray<Audit.Stored> = []
      for (let i = 0; i < 200 && lost.length < 3; i++) {
        yield* Effect.sleep(10)
        lost = yield* Audit.query({ topic: topic.name, kinds: ["lost-in-broker"] })
      }
      assert.deepStrictEqual(lost.map((e) => e.messageId).sort(), [...held].sort())
      assert.strictEqual(lost[0]!.group, "g")
      const counted = yield* Metric.value(
        Metric.withAttributes(Metrics.lostInBroker, { topic: topic.name, group: "g" })
      )
      assert.strictEqual(counted.count, 3)
    }).pipe(Effect.scoped, Effect.provide(Live))
  )
})
