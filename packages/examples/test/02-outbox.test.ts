import { MemoryBroker } from "@converge/broker-memory"
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { program, storeLayer } from "../src/02-outbox/program.ts"
import { pgliteLayer } from "../src/embedded.ts"

it.live(
  "example 02 on PGlite: a rejected order publishes nothing; a duplicate delivery is skipped by the inbox; invoices flow on through the outbox",
  () =>
    Effect.gen(function* () {
      const summary = yield* Effect.scoped(program)
      assert.deepStrictEqual(summary.committed, ["o-1", "o-2"])
      assert.deepStrictEqual(summary.rejected, ["o-3"])
      assert.strictEqual(summary.billingDeliveries, 3, "o-1 was delivered twice")
      assert.deepStrictEqual(summary.invoices, [
        { orderId: "o-1", invoiceId: "inv-o-1" },
        { orderId: "o-2", invoiceId: "inv-o-2" }
      ])
      assert.deepStrictEqual([...summary.emailed].sort(), ["inv-o-1", "inv-o-2"])
      assert.strictEqual(summary.outboxRows, 5, "3 order messages (one duplicate) + 2 invoices")
      assert.strictEqual(summary.unpublished, 0)
    }).pipe(
      Effect.provide(
        storeLayer({ schema: "shop", listen: false }).pipe(
          Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })),
          Layer.provideMerge(pgliteLayer)
        )
      )
    ),
  60_000
)
