import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Data, Effect, Layer, Metric, Schedule, Schema } from "effect"
import { Consumer, DeadLetter, Metrics, Publisher, Topic } from "../src/index.ts"
import { GaugeTest } from "../src/testing/index.ts"

class Busy extends Data.TaggedError("Busy")<{}> {}
class Declined extends Data.TaggedError("Declined")<{}> {}

const Live = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))

const until = <A>(effect: Effect.Effect<A>, done: (a: A) => boolean) =>
  Effect.gen(function* () {
    for (let i = 0; i < 300; i++) {
      const a = yield* effect
      if (done(a)) return a
      yield* Effect.sleep(10)
    }
    return yield* Effect.die(new Error(`metrics: the expected values never came: ${JSON.stringify(yield* effect)}`))
  })

describe("Metrics", () => {
  it.live("the counters and histograms read back match what happened", () =>
    Effect.gen(function* () {
      const topic = Topic.make(`metrics.orders.${Math.random().toString(36).slice(2, 8)}`, Schema.String)
      const labels = { topic: topic.name, group: "billing" }
      let busyOnce = true
      yield* Consumer.make(topic, {
        group: "billing",
        errors: { Busy: "retry", Declined: "dead-letter" },
        retry: Schedule.spaced("5 millis").pipe(Schedule.upTo({ times: 3 })),
        handle: (order): Effect.Effect<void, Busy | Declined> => {
          if (order === "busy" && busyOnce) {
            busyOnce = false
            return Effect.fail(new Busy())
          }
          return order === "declined" ? Effect.fail(new Declined()) : Effect.void
        }
      })
      // 32 messages: one retried once, one declined; handler durations and latencies are sampled (1 in 16)
      yield* Publisher.publishAll(topic, ["ok", "busy", "declined", ...Array.from({ length: 29 }, () => "ok")])
      const handled = Metric.withAttributes(Metrics.handled, labels)
      yield* until(Metric.value(handled), (v) => v.count === 31)
      assert.strictEqual(
        (yield* Metric.value(Metric.withAttributes(Metrics.published, { topic: topic.name }))).count,
        32
      )
      assert.strictEqual((yield* Metric.value(Metric.withAttributes(Metrics.delivered, labels))).count, 32)
      assert.strictEqual((yield* Metric.value(Metric.withAttributes(Metrics.retried, labels))).count, 1)
      const dead = Metric.withAttributes(Metrics.deadLettered, { ...labels, reason: "permanent" })
      yield* until(Metric.value(dead), (v) => v.count === 1)
      const durations = yield* Metric.value(Metric.withAttributes(Metrics.handlerDuration, labels))
      assert.strictEqual(durations.count, 2, "33 handler calls: the 16th and the 32nd are timed")
      const latency = yield* Metric.value(Metric.withAttributes(Metrics.publishToHandle, labels))
      assert.strictEqual(latency.count, 1, "31 acks: the 16th is sampled")
      assert.isAtLeast(latency.min, 0)
      assert.isBelow(latency.max, 10, "seconds from publication to handling")
      // a replay counts; the consumer declines the message again
      const [letter] = yield* DeadLetter.list(topic.name)
      yield* DeadLetter.replay(topic.name, letter!.id)
      assert.strictEqual((yield* Metric.value(Metric.withAttributes(Metrics.replayed, { topic: topic.name }))).count, 1)
      yield* until(Metric.value(dead), (v) => v.count === 2)
    }).pipe(Effect.scoped, Effect.provide(Live))
  )
})

describe("group gauges", () => {
  it.live("sampleGroups reports a group's pending and lag from the broker (memory)", () =>
    GaugeTest.groupGauges.pipe(Effect.scoped, Effect.provide(Live))
  )
})
