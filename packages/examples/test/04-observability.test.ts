import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { metricsEndpoint, program, services } from "../src/04-observability/program.ts"
import { freePort } from "../src/embedded.ts"

it.live("example 04: a Prometheus scrape of the running example shows the counters; the audit has o-2's timeline", () =>
  Effect.gen(function* () {
    const port = yield* freePort
    // the example runs with its endpoint up; the scrape is taken while it is
    const { result, scrape } = yield* Effect.gen(function* () {
      const result = yield* Effect.scoped(program)
      const scrape = yield* Effect.promise(() => fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text()))
      return { result, scrape }
    }).pipe(Effect.provide(Layer.merge(services, metricsEndpoint(port))))
    assert.deepStrictEqual(
      result.timeline.map((e) => `${e.kind}${e.attempt === undefined ? "" : `:${e.attempt}`}`),
      ["published", "delivered:1", "retried:1", "handled:2"]
    )
    assert.strictEqual(result.deadLetters.length, 1)
    const value = (name: string, labels: string) => {
      const line = scrape.split("\n").find((l) => l.startsWith(`${name}{`) && l.includes(labels))
      return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(" ") + 1))
    }
    const billing = 'topic="shop.orders",group="billing"'
    assert.strictEqual(value("converge_messages_published_total", 'topic="shop.orders"'), 3)
    assert.strictEqual(value("converge_messages_delivered_total", billing), 3)
    assert.strictEqual(value("converge_messages_handled_total", billing), 2)
    assert.strictEqual(value("converge_messages_retried_total", billing), 1)
    assert.strictEqual(value("converge_messages_dead_lettered_total", `${billing},reason="permanent"`), 1)
  })
)
