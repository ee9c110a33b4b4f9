import { assert, describe, it } from "@effect/vitest"
import { DateTime, Effect, Exit, Result, Schema } from "effect"
import { TestClock } from "effect/testing"
import { Envelope, Topic } from "../src/index.ts"

const Payload = Schema.Struct({
  name: Schema.String,
  count: Schema.Int,
  tags: Schema.Array(Schema.String),
  nested: Schema.Struct({ flag: Schema.Boolean, note: Schema.optionalKey(Schema.String) })
})
const topic = Topic.make("things", Payload)
const HeaderName = Schema.String.check(Schema.isPattern(/^x[a-z0-9]{0,9}$/))

const make = (payload: typeof Payload.Type, options?: Envelope.MakeOptions, now = 1_767_225_600_123) => {
  const e = Envelope.makeUnsafeResult(topic, payload, now, options)
  if (Result.isFailure(e)) throw e.failure
  return e.success
}
const encode = (e: Envelope.Envelope<typeof Payload.Type>) => {
  const r = Envelope.encodeResult(topic, e)
  if (Result.isFailure(r)) throw r.failure
  return r.success
}

describe("Envelope", () => {
  it.prop(
    "encode → fields → decode round-trips any payload, key and headers",
    { payload: Payload, key: Schema.optional(Schema.String), headers: Schema.Record(HeaderName, Schema.String) },
    ({ payload: generated, key, headers }) => {
      // JSON has no negative zero: -0 travels as 0 (a JSON limit, not an envelope one)
      const payload = { ...generated, count: generated.count === 0 ? 0 : generated.count }
      const envelope = make(payload, { key, headers, correlationId: "c-1" })
      const encoded = encode(envelope)
      const fromFields = Envelope.fromFields(Envelope.toFields(encoded))
      assert.deepStrictEqual(fromFields, Result.succeed(encoded))
      const compact = Envelope.toCompactFields(encoded)
      assert.deepStrictEqual(Object.keys(compact), ["ce", "data"], "two fields")
      assert.deepStrictEqual(Envelope.fromFields(compact), Result.succeed(encoded), "the compact layout too")
      assert.strictEqual(Envelope.subjectOfFields(compact), key)
      assert.strictEqual(Envelope.subjectOfFields(Envelope.toFields(encoded)), key)
      const decoded = Envelope.decodeResult(topic, encoded)
      assert.isTrue(Result.isSuccess(decoded))
      if (Result.isSuccess(decoded)) assert.deepStrictEqual(decoded.success, envelope)
    }
  )

  it.effect.prop(
    "toCloudEvent → JSON → fromCloudEvent round-trips",
    { payload: Payload, key: Schema.optional(Schema.String), headers: Schema.Record(HeaderName, Schema.String) },
    ({ payload, key, headers }) =>
      Effect.gen(function* () {
        const encoded = encode(make(payload, { key, headers }))
        const event = Envelope.toCloudEvent(encoded)
        const back = yield* Envelope.fromCloudEvent(JSON.stringify(event))
        assert.deepStrictEqual(back, encoded)
      })
  )

  it.effect("make: UUIDv7 id and time from Clock, attempt 1, well-known headers", () =>
    Effect.gen(function* () {
      yield* TestClock.setTime(Date.parse("2026-11-26T10:00:00.000Z"))
      const e = yield* Envelope.make(
        topic,
        { name: "a", count: 1, tags: [], nested: { flag: true } },
        {
          correlationId: "corr",
          causationId: "cause",
          replyTo: "replies",
          traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        }
      )
      assert.match(e.id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
      assert.strictEqual(DateTime.formatIso(e.time), "2026-11-26T10:00:00.000Z")
      // the first 48 bits of a UUIDv7 are the Unix time in milliseconds
      assert.strictEqual(
        Number.parseInt(e.id.replace(/-/g, "").slice(0, 12), 16),
        Date.parse("2026-11-26T10:00:00.000Z")
      )
      assert.strictEqual(e.attempt, 1)
      assert.deepStrictEqual(e.headers, {
        correlationid: "corr",
        causationid: "cause",
        replyto: "replies",
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
      })
    })
  )

  it("UUIDv7 ids are unique and sorted within one millisecond", () => {
    const ids = Array.from({ length: 5000 }, () => make({ name: "", count: 0, tags: [], nested: { flag: false } }).id)
    assert.strictEqual(new Set(ids).size, ids.length)
    assert.deepStrictEqual([...ids].sort(), ids)
    const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-([89ab])[0-9a-f]{3}-[0-9a-f]{12}$/
    const variants = new Set(ids.map((id) => uuid.exec(id)?.[1]))
    assert.deepStrictEqual([...variants].sort(), ["8", "9", "a", "b"], "RFC 9562 variant, all four random forms")
  })

  it("makeEncodedAllResult: options apply to every message; an explicit id names one message only; a source is required", () => {
    const payload = { name: "a", count: 1, tags: [], nested: { flag: true } }
    const all = Envelope.makeEncodedAllResult(topic, [payload, payload], 0, { correlationId: "c", key: "k" }, "urn:p")
    assert.isTrue(Result.isSuccess(all))
    if (Result.isSuccess(all)) {
      assert.deepStrictEqual(
        all.success.map((e) => [e.headers, e.key, e.source]),
        [
          [{ correlationid: "c" }, "k", "urn:p"],
          [{ correlationid: "c" }, "k", "urn:p"]
        ]
      )
      assert.notStrictEqual(all.success[0]!.id, all.success[1]!.id)
    }
    const one = Envelope.makeEncodedAllResult(topic, [payload], 0, { id: "given" })
    assert.isTrue(Result.isSuccess(one) && one.success[0]!.id === "given")
    const empties: ReadonlyArray<Result.Result<unknown, { readonly message: string }>> = [
      Envelope.makeEncodedAllResult(topic, [payload], 0, { source: "" }),
      Envelope.makeEncodedAllResult(topic, [payload], 0, undefined, ""),
      Envelope.makeEncodedResult(topic, payload, 0, { source: "" })
    ]
    for (const empty of empties) {
      assert.isTrue(Result.isFailure(empty) && /source must not be empty/.test(empty.failure.message))
    }
    const two = Envelope.makeEncodedAllResult(topic, [payload, payload], 0, { id: "given" })
    assert.isTrue(Result.isFailure(two))
    if (Result.isFailure(two)) {
      assert.strictEqual(two.failure._tag, "MalformedEnvelope")
      assert.match(two.failure.message, /id option names one message/)
    }
  })

  it("make rejects a bad header name with a typed InvalidName", () => {
    const r = Envelope.makeUnsafeResult(topic, { name: "", count: 0, tags: [], nested: { flag: false } }, 0, {
      headers: { "X-Tenant": "acme" }
    })
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) assert.match(r.failure.message, /Invalid header name "X-Tenant"/)
  })

  it("encode fails with a PayloadError when the payload breaks its Schema", () => {
    const r = Envelope.encodeResult(
      topic,
      make({ name: 1 as unknown as string, count: 0, tags: [], nested: { flag: true } })
    )
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) {
      assert.strictEqual(r.failure._tag, "PayloadError")
      assert.strictEqual(r.failure.direction, "encode")
      assert.match(r.failure.message, /name/)
    }
  })

  it("decode fails with a PayloadError naming the field", () => {
    const encoded = encode(make({ name: "a", count: 1, tags: [], nested: { flag: true } }))
    const r = Envelope.decodeResult(topic, {
      ...encoded,
      data: '{"name":"a","count":1.5,"tags":[],"nested":{"flag":true}}'
    })
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) {
      assert.strictEqual(r.failure._tag, "PayloadError")
      assert.match(r.failure.message, /count/)
    }
  })

  it.effect("decodeEncoded names every missing field", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(Envelope.decodeEncoded({ id: "x", data: "{}" }))
      assert.strictEqual(error._tag, "MalformedEnvelope")
      for (const field of ["topic", "type", "source", "time", "attempt", "headers"]) {
        assert.include(error.message, `["${field}"]`)
      }
    })
  )

  it("fromFields names the first missing or invalid field", () => {
    const fields = Envelope.toFields(encode(make({ name: "a", count: 1, tags: [], nested: { flag: true } })))
    for (const field of ["ce_id", "ce_type", "ce_source", "ce_time", "ce_topic", "data"]) {
      const { [field]: _, ...rest } = fields
      const r = Envelope.fromFields(rest)
      assert.isTrue(Result.isFailure(r), field)
      if (Result.isFailure(r)) assert.include(r.failure.message, field)
    }
    for (const [field, value, why] of [
      ["ce_attempt", "0", "ce_attempt"],
      ["ce_attempt", "two", "ce_attempt"],
      ["ce_specversion", "0.3", "specversion"],
      ["ce_time", "yesterday", "ce_time"],
      ["ce_time", "2026-13-45T99:00:00Z", "ce_time"],
      ["ce_Bad-Header", "x", "ce_Bad-Header"]
    ] as const) {
      const r = Envelope.fromFields({ ...fields, [field]: value })
      assert.isTrue(Result.isFailure(r) && r.failure.message.includes(why), `${field}=${value}`)
    }
  })

  it("the compact layout: a redelivery's attempt rewritten in either layout; malformed attributes named", () => {
    const encoded = encode(
      make({ name: "a", count: 1, tags: [], nested: { flag: true } }, { key: "k-1", correlationId: "c-1" })
    )
    for (const fields of [Envelope.toCompactFields(encoded), Envelope.toFields(encoded)]) {
      const next = Envelope.fieldsWithAttempt({ ...fields, cv_origin: "1-0" }, encoded, 3)
      assert.strictEqual(next.cv_origin, "1-0", "other fields kept")
      assert.deepStrictEqual(Envelope.fromFields(next), Result.succeed({ ...encoded, attempt: 3 }))
      assert.strictEqual("ce" in next, "ce" in fields, "the entry keeps its layout")
    }
    const ce = JSON.parse(Envelope.toCompactFields(encoded).ce!) as Record<string, unknown>
    // the default source and a topic equal to the type are left out, and read back as they were
    assert.deepStrictEqual(Object.keys(ce), ["id", "type", "time", "subject", "headers"])
    const foreign = { ...encoded, source: "urn:acme:orders", type: "acme.thing.v1" }
    const full = JSON.parse(Envelope.toCompactFields(foreign).ce!) as Record<string, unknown>
    assert.deepStrictEqual(Object.keys(full), ["id", "type", "time", "source", "topic", "subject", "headers"])
    assert.deepStrictEqual(Envelope.fromFields(Envelope.toCompactFields(foreign)), Result.succeed(foreign))
    const broken: ReadonlyArray<readonly [unknown, string]> = [
      ["{not json", "field ce is not JSON"],
      [[1, 2], "not a JSON object"],
      [{ ...ce, id: "" }, "ce.id"],
      [{ ...ce, id: "x".repeat(201) }, "longer than 200"],
      [{ ...ce, type: 3 }, "ce.type"],
      [{ ...ce, time: "yesterday" }, "ce.time"],
      [{ ...ce, topic: "" }, "ce.topic"],
      [{ ...ce, topic: 3 }, "ce.topic"],
      [{ ...ce, source: "" }, "ce.source"],
      [{ ...ce, attempt: 0 }, "ce.attempt"],
      [{ ...ce, attempt: 1.5 }, "ce.attempt"],
      [{ ...ce, specversion: "0.3" }, "specversion"],
      [{ ...ce, subject: 7 }, "ce.subject"],
      [{ ...ce, headers: { "Bad-Header": "x" } }, "Bad-Header"],
      [{ ...ce, headers: { xa: 1 } }, "ce.headers.xa"]
    ]
    for (const [value, why] of broken) {
      const text = typeof value === "string" ? value : JSON.stringify(value)
      const r = Envelope.fromFields({ ce: text, data: "{}" })
      assert.isTrue(Result.isFailure(r) && r.failure.message.includes(why), `${text}: ${why}`)
    }
    const noData = Envelope.fromFields({ ce: JSON.stringify(ce) })
    assert.isTrue(Result.isFailure(noData) && noData.failure.message.includes("data"))
  })

  describe("CloudEvents", () => {
    const encoded = encode(
      make({ name: "a", count: 1, tags: ["t"], nested: { flag: true } }, { key: "k-1", headers: { tenant: "acme" } })
    )

    it("toCloudEvent has the required attributes and JSON data", () => {
      const event = Envelope.toCloudEvent(encoded)
      assert.strictEqual(event.specversion, "1.0")
      assert.strictEqual(event.id, encoded.id)
      assert.strictEqual(event.source, "urn:converge")
      assert.strictEqual(event.type, "things")
      assert.strictEqual(event.time, "2026-01-01T00:00:00.123Z")
      assert.strictEqual(event.subject, "k-1")
      assert.strictEqual(event.datacontenttype, "application/json")
      assert.strictEqual(event.topic, "things")
      assert.strictEqual(event.attempt, 1)
      assert.strictEqual(event.tenant, "acme")
      assert.deepStrictEqual(event.data, { name: "a", count: 1, tags: ["t"], nested: { flag: true } })
      assert.isUndefined(event.data_base64)
    })

    it.effect("fromCloudEvent requires specversion 1.0, id, source and type", () =>
      Effect.gen(function* () {
        const event = Envelope.toCloudEvent(encoded) as Record<string, unknown>
        for (const attr of ["specversion", "id", "source", "type"]) {
          const { [attr]: _, ...rest } = event
          const error = yield* Effect.flip(Envelope.fromCloudEvent(rest))
          assert.include(error.message, attr)
        }
        const wrong = yield* Effect.flip(Envelope.fromCloudEvent({ ...event, specversion: "0.3" }))
        assert.include(wrong.message, "specversion")
      })
    )

    it.effect("data_base64 carries the JSON bytes; data and data_base64 together are rejected", () =>
      Effect.gen(function* () {
        const { data, ...event } = Envelope.toCloudEvent(encoded) as Record<string, unknown>
        const base64 = Buffer.from(JSON.stringify(data)).toString("base64")
        const back = yield* Envelope.fromCloudEvent({ ...event, data_base64: base64 })
        assert.deepStrictEqual(back, encoded)
        const both = yield* Effect.flip(Envelope.fromCloudEvent({ ...event, data, data_base64: base64 }))
        assert.include(both.message, "both data and data_base64")
        const notBase64 = yield* Effect.flip(Envelope.fromCloudEvent({ ...event, data_base64: "***" }))
        assert.include(notBase64.message, "data_base64")
      })
    )

    it.effect("a foreign event: no topic extension needs the topic option; no time takes the Clock's", () =>
      Effect.gen(function* () {
        yield* TestClock.setTime(Date.parse("2026-02-03T04:05:06.007Z"))
        const foreign = { specversion: "1.0", id: "e-1", source: "urn:x", type: "x.happened", data: { a: 1 } }
        const missing = yield* Effect.flip(Envelope.fromCloudEvent(foreign))
        assert.include(missing.message, "topic")
        const e = yield* Envelope.fromCloudEvent(foreign, { topic: "things" })
        assert.deepStrictEqual(e, {
          id: "e-1",
          topic: "things",
          type: "x.happened",
          source: "urn:x",
          key: undefined,
          time: "2026-02-03T04:05:06.007Z",
          attempt: 1,
          headers: {},
          data: '{"a":1}'
        })
        const exit = yield* Effect.exit(Envelope.fromCloudEvent({ ...foreign, topic: "bad topic" }))
        assert.isTrue(Exit.isFailure(exit), "the topic extension is validated like any topic name")
      })
    )
  })
})
