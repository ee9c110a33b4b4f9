import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Result, Schema } from "effect"
import { Topic } from "../src/index.ts"

const Order = Schema.Struct({ orderId: Schema.String, total: Schema.Number.check(Schema.isGreaterThanOrEqualTo(0)) })

describe("Topic", () => {
  it("make: name, type (default: the name), key function", () => {
    const t = Topic.make("orders", Order, { key: (o) => o.orderId })
    assert.strictEqual(t.name, "orders")
    assert.strictEqual(t.type, "orders")
    assert.strictEqual(t.key?.({ orderId: "o-1", total: 1 }), "o-1")
    assert.strictEqual(Topic.make("orders", Order, { type: "com.acme.order.placed" }).type, "com.acme.order.placed")
    assert.isTrue(Topic.isTopic(t))
  })

  it("make throws a typed InvalidName for a bad name or type", () => {
    assert.throws(() => Topic.make("orders:eu", Order), /Invalid topic name "orders:eu"/)
    assert.throws(() => Topic.make("orders", Order, { type: "has space" }), /type "has space"/)
  })

  it.effect("makeEffect puts the InvalidName in the error channel", () =>
    Effect.gen(function* () {
      const exit = yield* Effect.exit(Topic.makeEffect("bad name", Order))
      assert.isTrue(Exit.isFailure(exit))
      const error = yield* Effect.flip(Topic.makeEffect("bad name", Order))
      assert.strictEqual(error._tag, "InvalidName")
      assert.strictEqual(error.name, "bad name")
    })
  )

  it("encode/decode round-trip through JSON text", () => {
    const t = Topic.make("orders", Order)
    const data = t.encode({ orderId: "o-1", total: 12.5 })
    assert.isTrue(Result.isSuccess(data))
    if (Result.isSuccess(data)) {
      assert.strictEqual(data.success, '{"orderId":"o-1","total":12.5}')
      assert.deepStrictEqual(t.decode(data.success), Result.succeed({ orderId: "o-1", total: 12.5 }))
    }
  })

  it("decode names the failing field; bad JSON is a JsonSyntaxError", () => {
    const t = Topic.make("orders", Order)
    const bad = t.decode('{"orderId":1,"total":-1}')
    assert.isTrue(Result.isFailure(bad))
    if (Result.isFailure(bad)) assert.match(bad.failure.message, /orderId/)
    const notJson = t.decode("{oops")
    assert.isTrue(Result.isFailure(notJson) && notJson.failure._tag === "JsonSyntaxError")
  })
})
