import { MemoryBroker } from "@converge/broker-memory"
import { Publisher } from "@converge/core"
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { program } from "../src/01-orders/program.ts"

it.live(
  "example 01: fan-out to two groups, a transient failure retried, a permanent one and a bad payload dead-lettered",
  () =>
    Effect.gen(function* () {
      const summary = yield* program
      assert.strictEqual(summary.published.length, 3)
      assert.deepStrictEqual([...summary.shipped].sort(), ["o-1", "o-2", "o-3"])
      assert.deepStrictEqual(
        [...summary.billed].sort((a, b) => a.orderId.localeCompare(b.orderId)),
        [
          { orderId: "o-1", attempt: 1 },
          { orderId: "o-2", attempt: 2 }
        ]
      )
      assert.deepStrictEqual(summary.deadLetters.map((d) => [d.group, d.reason]).sort(), [
        ["billing", "decode"],
        ["billing", "permanent"],
        ["shipping", "decode"]
      ])
      for (const d of summary.deadLetters.filter((x) => x.reason === "decode")) assert.include(d.error, "amountCents")
      assert.include(summary.deadLetters.find((d) => d.reason === "permanent")!.error, "CardDeclined")
    }).pipe(Effect.provide(Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })))))
)
