import { MemoryBroker } from "@converge/broker-memory"
import { Publisher } from "@converge/core"
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { program } from "../src/01-orders/program.ts"

it.live("example 01: fan-out to two groups, a transient failure redelivered, a bad payload dead-lettered", () =>
  Effect.gen(function* () {
    const summary = yield* program
    assert.strictEqual(summary.published.length, 3)
    assert.deepStrictEqual([...summary.shipped].sort(), ["o-1", "o-2", "o-3"])
    assert.deepStrictEqual(
      [...summary.billed].sort((a, b) => a.orderId.localeCompare(b.orderId)),
      [
        { orderId: "o-1", deliveryCount: 1 },
        { orderId: "o-2", deliveryCount: 2 },
        { orderId: "o-3", deliveryCount: 1 }
      ]
    )
    assert.deepStrictEqual(summary.deadLetters.map((d) => [d.group, d.reason]).sort(), [
      ["billing", "decode"],
      ["shipping", "decode"]
    ])
    for (const d of summary.deadLetters) assert.include(d.error, "amountCents")
  }).pipe(Effect.provide(Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })))))
)
