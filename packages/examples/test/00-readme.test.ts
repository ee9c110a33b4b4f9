import { MemoryBroker } from "@converge/broker-memory"
import { DeadLetter } from "@converge/core"
import { assert, it } from "@effect/vitest"
import { Effect } from "effect"
import { layer, program } from "../src/00-readme/program.ts"

it.live("the README example bills o-1 and dead-letters the declined o-2", () =>
  Effect.gen(function* () {
    yield* program
    for (let i = 0; i < 200 && (yield* DeadLetter.list("orders")).length === 0; i++) yield* Effect.sleep(10)
    const dlq = yield* DeadLetter.list("orders")
    assert.deepStrictEqual(
      dlq.map((d) => [d.reason, d.envelope?.key]),
      [["permanent", "o-2"]]
    )
    assert.include(dlq[0]!.error!, "PaymentDeclined")
    const pending = yield* MemoryBroker.MemoryBroker.use((m) => m.pending("orders", "billing"))
    assert.deepStrictEqual(pending, [], "o-1 was acked")
  }).pipe(Effect.provide(layer))
)
