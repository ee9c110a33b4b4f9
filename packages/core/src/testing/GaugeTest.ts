/**
 * The group gauges scenario, shared by the brokers' tests: a consumer blocked on its reads leaves the
 * topic's five messages pending or behind (how many of each depends on how far the broker reads ahead);
 * released, both drop to zero. Runs on the live clock over the `Broker` and `Publisher` in context.
 *
 * @since 0.1.0
 */
import { Deferred, Effect, Layer, Metric, Schema, type Scope } from "effect"
import type * as Broker from "../Broker.ts"
import * as Consumer from "../Consumer.ts"
import * as Metrics from "../Metrics.ts"
import * as Publisher from "../Publisher.ts"
import * as Topic from "../Topic.ts"

const until = <A>(effect: Effect.Effect<A>, done: (a: A) => boolean, what: string) =>
  Effect.gen(function* () {
    let last = yield* effect
    for (let i = 0; i < 500 && !done(last); i++) {
      yield* Effect.sleep(10)
      last = yield* effect
    }
    if (!done(last)) return yield* Effect.die(new Error(`group gauges: ${what}: still ${JSON.stringify(last)}`))
    return last
  })

/**
 * Runs the scenario through `Metrics.sampleGroups`.
 *
 * @since 0.1.0
 */
export const groupGauges: Effect.Effect<void, unknown, Broker.Broker | Publisher.Publisher | Scope.Scope> = Effect.gen(
  function* () {
    const topic = Topic.make(`gauges.${Math.random().toString(36).slice(2, 8)}`, Schema.String)
    const gate = yield* Deferred.make<void>()
    yield* Consumer.make(topic, { group: "slow", batchSize: 2, concurrency: 2, handle: () => Deferred.await(gate) })
    yield* Publisher.publishAll(topic, ["a", "b", "c", "d", "e"])
    yield* Layer.build(Metrics.sampleGroups({ groups: [{ topic: topic.name, group: "slow" }], interval: "20 millis" }))
    const labels = { topic: topic.name, group: "slow" }
    const both = Effect.zip(
      Metric.value(Metric.withAttributes(Metrics.groupPending, labels)),
      Metric.value(Metric.withAttributes(Metrics.groupLag, labels))
    ).pipe(Effect.map(([p, l]) => ({ pending: p.value, lag: l.value })))
    // blocked: nothing settled; at least the first read is pending, the rest pending or behind
    yield* until(both, (s) => s.pending >= 2 && s.pending + s.lag === 5, "blocked")
    yield* Deferred.succeed(gate, undefined)
    yield* until(both, (s) => s.pending === 0 && s.lag === 0, "released")
  }
)
