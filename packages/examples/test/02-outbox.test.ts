import { MemoryBroker } from "@converge/broker-memory"
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { SqlClient } from "effect/sql"
import { program, storeLayer } from "../src/02-outbox/program.ts"
import { pgliteLayer } from "../src/embedded.ts"

it.live(
  "example 02 on PGlite: a rejected order publishes nothing; a duplicate delivery is skipped by the inbox; invoices flow on through the outbox",
  () =>
    Effect.gen(function* () {
      // The relay (default options) must not LISTEN on PGlite: that would hang its only connection.
      yield* Effect.sleep("300 millis")
      const sql = yield* SqlClient.SqlClient
      yield* sql.unsafe("SELECT 1").raw.pipe(
        Effect.timeoutOrElse({
          duration: "5 seconds",
          orElse: () => Effect.die(new Error("the connection is held: did the relay LISTEN on PGlite?"))
        })
      )
      const summary = yield* Effect.scoped(program)
      assert.deepStrictEqual(summary.committed, ["o-1", "o-2"])
      assert.deepStrictEqual(summary.rejected, ["o-3"])
      assert.strictEqual(summary.billingDeliveries, 3, "o-1 was delivered twice")
      assert.deepStrictEqual(summary.invoices, [
        { orderId: "o-1", invoiceId: "inv-o-1" },
        { orderId: "o-2", invoiceId: "inv-o-2" }
      ])
      assert.deepStrictEqual([...summary.emailed].sort(), ["inv-o-1", "inv-o-2"])
      assert.strictEqual(summary.outboxRows, 0, "the relay deleted every row it published")
      assert.strictEqual(summary.unpublished, 0)
    }).pipe(
      Effect.provide(
        storeLayer({ schema: "shop" }).pipe(
          Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })),
          Layer.provideMerge(pgliteLayer)
        )
      )
    ),
  60_000
)
