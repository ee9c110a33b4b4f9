import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Result } from "effect"
import { Name } from "../src/index.ts"

describe("Name", () => {
  it("accepts letters, digits, '.', '_' and '-' starting with a letter or digit", () => {
    for (const ok of ["orders", "orders.v1", "billing_events-2", "A", "9lives", "x".repeat(Name.maxLength)]) {
      assert.isTrue(Result.isSuccess(Name.check("topic", ok)), ok)
    }
  })

  it("rejects key separators, hash tags, spaces, control characters and bad lengths, naming the rule", () => {
    const cases: Array<[string, RegExp]> = [
      ["", /non-empty/],
      ["a:b", /only ASCII letters/],
      ["{tag}", /must start with a letter or digit/],
      ["has space", /only ASCII letters/],
      ["tab\there", /only ASCII letters/],
      ["-lead", /must start/],
      [".hidden", /must start/],
      ["ünïcode", /only ASCII/],
      ["x".repeat(Name.maxLength + 1), /at most 200/]
    ]
    for (const [name, rule] of cases) {
      const result = Name.check("group", name)
      assert.isTrue(Result.isFailure(result), JSON.stringify(name))
      if (Result.isFailure(result)) {
        assert.strictEqual(result.failure._tag, "InvalidName")
        assert.strictEqual(result.failure.kind, "group")
        assert.match(result.failure.message, /^Invalid group name /)
        assert.match(result.failure.message, rule)
      }
    }
  })

  it("header names follow the CloudEvents extension rule and avoid reserved attributes", () => {
    assert.isTrue(Result.isSuccess(Name.check("header", "tenant")))
    assert.isTrue(Result.isSuccess(Name.check("header", "x1")))
    for (const bad of ["Tenant", "x-tenant", "a".repeat(21), "id", "data", "topic", "specversion"]) {
      assert.isTrue(Result.isFailure(Name.check("header", bad)), bad)
    }
  })

  it("schema names that SQL reserves are refused at validation, not later as a syntax error", () => {
    for (const ok of ["converge", "shop_orders", "users", "orders"]) {
      assert.isTrue(Result.isSuccess(Name.check("schema", ok)), ok)
    }
    for (const bad of ["user", "order", "select", "table", "group", "pg_catalog"]) {
      const result = Name.check("schema", bad)
      assert.isTrue(Result.isFailure(result), bad)
      if (Result.isFailure(result)) assert.match(result.failure.message, /reserved/)
    }
  })

  it.effect("validate fails in the error channel; validateSync throws the same error", () =>
    Effect.gen(function* () {
      const exit = yield* Effect.exit(Name.validate("consumer", "c{1}"))
      assert.isTrue(Exit.isFailure(exit))
      assert.throws(() => Name.validateSync("consumer", "c{1}"), /Invalid consumer name "c\{1\}"/)
      assert.strictEqual(yield* Name.validate("consumer", "c-1"), "c-1")
    })
  )
})
