import { assert, it } from "@effect/vitest"
import { Effect, Logger } from "effect"
import { layer, main, program } from "../src/00-readme/program.ts"

/** Runs `effect` and returns what it logged at Warn or above. */
const loudLogs = <A, E>(effect: Effect.Effect<A, E>) =>
  Effect.gen(function* () {
    const loud: Array<string> = []
    const capture = Logger.make<unknown, void>(({ logLevel, message }) => {
      if (logLevel === "Warn" || logLevel === "Error" || logLevel === "Fatal") {
        loud.push(`${logLevel}: ${Array.isArray(message) ? message.join(" ") : String(message)}`)
      }
    })
    const value = yield* Effect.provide(effect, Logger.layer([capture]))
    return { value, loud }
  })

it.live("the README program bills o-2, dead-letters the declined o-1, and exits without a warning", () =>
  Effect.gen(function* () {
    const { value: dead, loud } = yield* loudLogs(main)
    assert.deepStrictEqual(
      dead.map((d) => [d.reason, d.envelope?.key]),
      [["permanent", "o-1"]]
    )
    assert.include(dead[0]!.error!, "PaymentDeclined")
    // the dead letter is announced (a warning, by design); the shutdown adds nothing at WARN or ERROR
    assert.strictEqual(loud.length, 1, loud.join("\n"))
    assert.match(loud[0]!, /^Warn: consumer: message dead-lettered \(permanent\)/)
  })
)

it.live("the other scope order (the broker layer closes before the consumer's scope) also stops quietly", () =>
  Effect.gen(function* () {
    // the broker closes when `Effect.provide` ends; the consumer's scope stays open a while longer
    const { value: dead, loud } = yield* loudLogs(
      program.pipe(Effect.provide(layer), Effect.tap(Effect.sleep("100 millis")), Effect.scoped)
    )
    assert.strictEqual(dead.length, 1)
    assert.strictEqual(loud.length, 1, loud.join("\n"))
    assert.match(loud[0]!, /^Warn: consumer: message dead-lettered \(permanent\)/)
  })
)
