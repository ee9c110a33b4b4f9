import { Broker } from "@converge/core"
import { assert, it } from "@effect/vitest"
import { Effect } from "effect"
import { layer, program } from "../src/00-readme/program.ts"

it.effect("the README example publishes, bills and acks", () =>
  Effect.gen(function* () {
    yield* program
    const broker = yield* Broker.Broker
    assert.deepStrictEqual(yield* broker.deadLetters("orders"), [])
  }).pipe(Effect.provide(layer))
)
