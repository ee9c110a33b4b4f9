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

  it("payloads JSON cannot carry as they are (Date, bigint, Map) travel in their JSON codec form and come back", () => {
    const Event = Schema.Struct({
      at: Schema.Date,
      amount: Schema.BigInt,
      tags: Schema.ReadonlyMap(Schema.String, Schema.Number),
      note: Schema.optional(Schema.String)
    })
    const t = Topic.make("events", Event)
    const value = { at: new Date("2026-11-26T10:00:00.000Z"), amount: 12345678901234567890n, tags: new Map([["a", 1]]) }
    const data = t.encode(value)
    assert.isTrue(Result.isSuccess(data), "encoding does not throw on a bigint")
    if (Result.isSuccess(data)) {
      assert.include(data.success, '"2026-11-26T10:00:00.000Z"')
      assert.include(data.success, '"12345678901234567890"')
      const back = t.decode(data.success)
      assert.isTrue(Result.isSuccess(back), "what was published decodes")
      if (Result.isSuccess(back)) {
        assert.instanceOf(back.success.at, Date)
        assert.strictEqual(back.success.at.getTime(), value.at.getTime())
        assert.strictEqual(back.success.amount, value.amount)
        assert.deepStrictEqual([...back.success.tags], [["a", 1]])
      }
    }
    // a schema that spells out its wire form is used as it is
    const spelled = Topic.make("events", Schema.Struct({ at: Schema.DateFromString }))
    const text = spelled.encode({ at: new Date(0) })
    assert.deepStrictEqual(text, Result.succeed('{"at":"1970-01-01T00:00:00.000Z"}'))
  })

  it("a value JSON cannot write is a typed JsonSyntaxError on encode, not a thrown exception", () => {
    const t = Topic.make("anything", Schema.Unknown)
    const cycle: Record<string, unknown> = {}
    cycle.self = cycle
    const r = t.encode(cycle)
    assert.isTrue(Result.isFailure(r) && r.failure._tag === "JsonSyntaxError")
    if (Result.isFailure(r)) assert.match(r.failure.message, /cannot be written as JSON/)
    const u = t.encode(undefined)
    assert.isTrue(Result.isFailure(u) && /encodes to undefined/.test(u.failure.message))
  })

  it("decode names the failing field; bad JSON is a JsonSyntaxError", () => {
    const t = Topic.make("orders", Order)
    const bad = t.decode('{"orderId":1,"total":-1}')
    assert.isTrue(Result.isFailure(bad))
    if (Result.isFailure(bad)) assert.match(bad.failure.message, /orderId/)
    const notJson = t.decode("{oops")
    assert.isTrue(Result.isFailure(notJson) && notJson.failure._tag === "JsonSyntaxError")
  })

  it("maxBytes (default 1 MiB) bounds the UTF-8 size of a payload's JSON, on encode and on decode", () => {
    const Note = Schema.Struct({ text: Schema.String })
    assert.strictEqual(Topic.make("notes", Note).maxBytes, Topic.defaultMaxBytes)
    assert.strictEqual(Topic.defaultMaxBytes, 1_048_576)
    // {"text":"..."} is 11 bytes around the text
    const t = Topic.make("notes", Note, { maxBytes: 40 })
    const tooLarge = (r: Result.Result<unknown, { readonly _tag: string }>) =>
      Result.isFailure(r) && r.failure._tag === "PayloadTooLarge"
    assert.isTrue(Result.isSuccess(t.encode({ text: "a".repeat(29) })), "40 bytes: at the limit")
    const over = t.encode({ text: "a".repeat(30) })
    assert.isTrue(tooLarge(over), "41 bytes: over")
    if (Result.isFailure(over) && over.failure._tag === "PayloadTooLarge") {
      assert.strictEqual(over.failure.maxBytes, 40)
      assert.isAbove(over.failure.bytes, 40)
      assert.include(over.failure.message, "limit of 40 (Topic option maxBytes)")
    }
    // counted in UTF-8, not in UTF-16 units: "é" is 2 bytes, "€" 3, "😀" (a surrogate pair) 4
    assert.isTrue(Result.isSuccess(t.encode({ text: `${"é".repeat(14)}a` })), "11 + 29 bytes")
    const accented = t.encode({ text: "é".repeat(15) })
    assert.isTrue(tooLarge(accented), "11 + 30 bytes in 26 units")
    if (Result.isFailure(accented) && accented.failure._tag === "PayloadTooLarge") {
      assert.strictEqual(accented.failure.bytes, 41, "measured exactly when the length alone does not decide")
    }
    assert.isTrue(Result.isSuccess(t.encode({ text: `${"€".repeat(9)}aa` })), "11 + 29 bytes")
    assert.isTrue(tooLarge(t.encode({ text: "€".repeat(10) })), "11 + 30 bytes in 21 units")
    assert.isTrue(Result.isSuccess(t.encode({ text: `${"😀".repeat(7)}a` })), "11 + 29 bytes")
    assert.isTrue(tooLarge(t.encode({ text: "😀".repeat(8) })), "11 + 32 bytes in 27 units")
    // decode refuses oversized text before parsing it (here it is not even JSON)
    assert.isTrue(tooLarge(t.decode("x".repeat(41))))
    assert.deepStrictEqual(t.decode(`{"text":"${"a".repeat(29)}"}`), Result.succeed({ text: "a".repeat(29) }))
    assert.throws(() => Topic.make("notes", Note, { maxBytes: 0 }), /maxBytes must be an integer >= 1 \(got 0\)/)
    assert.throws(() => Topic.make("notes", Note, { maxBytes: 1.5 }), /maxBytes must be an integer >= 1/)
  })

  describe("jit", () => {
    // Effect's JIT registers compiled code on the Schema's own nodes, so each topic below gets a Schema
    // built afresh (with its own check instances): the jit: false topic must run nodes nobody compiled
    const makePayload = () =>
      Schema.Struct({
        id: Schema.String,
        count: Schema.Number.check(Schema.isInt()),
        ratio: Schema.Number.check(Schema.isFinite()),
        tags: Schema.Array(Schema.String),
        note: Schema.optionalKey(Schema.String),
        flag: Schema.NullOr(Schema.Boolean),
        kind: Schema.Literals(["a", "b"]),
        event: Schema.Union([
          Schema.Struct({
            _tag: Schema.Literal("Placed"),
            // finite: JSON writes Infinity as null, which no number Schema reads back (on either path)
            total: Schema.Number.check(Schema.isFinite(), Schema.isGreaterThanOrEqualTo(0))
          }),
          Schema.Struct({ _tag: Schema.Literal("Cancelled"), reason: Schema.String })
        ]),
        lines: Schema.Array(Schema.Struct({ sku: Schema.String, qty: Schema.Number.check(Schema.isInt()) }))
      })
    const compiled = Topic.make("jit-on", makePayload())
    const interpreted = Topic.make("jit-off", makePayload(), { jit: false })
    const fields = ["id", "count", "ratio", "tags", "note", "flag", "kind", "event", "lines"] as const
    const badValues: ReadonlyArray<unknown> = [null, "x", 1.5, -1, true, [], {}, [1], { _tag: "Placed", total: -1 }]

    it.prop(
      "compiled and interpreted topics write the same text and read the same value, extra fields dropped",
      { payload: makePayload(), extra: Schema.String },
      ({ payload, extra }) => {
        // JSON has no negative zero: -0 travels as 0 (a JSON limit, not a codec one)
        const value = { ...payload, count: payload.count === 0 ? 0 : payload.count, unknownField: extra }
        const text = compiled.encode(value)
        assert.deepStrictEqual(text, interpreted.encode(value))
        assert.isTrue(Result.isSuccess(text))
        if (Result.isFailure(text)) return
        assert.notInclude(text.success, "unknownField")
        const back = compiled.decode(text.success)
        assert.deepStrictEqual(back, interpreted.decode(text.success))
        assert.isTrue(Result.isSuccess(back))
        // a field the consumer does not know is dropped on decode too
        const withExtra = `${text.success.slice(0, -1)},"unknownField":${JSON.stringify(extra)}}`
        assert.deepStrictEqual(compiled.decode(withExtra), back)
      }
    )

    it.prop(
      "compiled and interpreted topics refuse the same bad input with the same message",
      {
        payload: makePayload(),
        field: Schema.Literals(fields),
        bad: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: badValues.length - 1 }))
      },
      ({ payload, field, bad }) => {
        const broken = { ...payload, [field]: badValues[bad] }
        const fromCompiled = compiled.decode(JSON.stringify(broken))
        assert.deepStrictEqual(
          Result.isFailure(fromCompiled) ? fromCompiled.failure.message : "accepted",
          ((r) => (Result.isFailure(r) ? r.failure.message : "accepted"))(interpreted.decode(JSON.stringify(broken)))
        )
        const encoded = compiled.encode(broken as never)
        assert.deepStrictEqual(
          Result.isFailure(encoded) ? encoded.failure.message : "accepted",
          ((r) => (Result.isFailure(r) ? r.failure.message : "accepted"))(interpreted.encode(broken as never))
        )
      }
    )

    it("a topic runs its payload Schema compiled unless jit is false", () => {
      // the compiled decoder checks a value without building errors and, when it refuses one, leaves the
      // message to the interpreter: a refused value meets the filter twice there, once without the JIT
      let calls = 0
      const makeCounted = () =>
        Schema.Struct({
          n: Schema.Number.check(
            Schema.makeFilter((n: number) => {
              calls++
              return n > 0
            })
          )
        })
      const count = (run: () => unknown) => {
        calls = 0
        run()
        return calls
      }
      const on = Topic.make("counted-on", makeCounted())
      const off = Topic.make("counted-off", makeCounted(), { jit: false })
      assert.strictEqual(
        count(() => on.decode('{"n":1}')),
        1
      )
      assert.strictEqual(
        count(() => on.decode('{"n":-1}')),
        2
      )
      assert.strictEqual(
        count(() => off.decode('{"n":-1}')),
        1
      )
      const refused = on.decode('{"n":-1}')
      assert.isTrue(Result.isFailure(refused) && refused.failure.message === 'Expected <filter>\n  at ["n"]')
    })
  })
})
