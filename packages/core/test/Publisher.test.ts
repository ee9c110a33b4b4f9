import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Result, Schema, Stream } from "effect"
import { Broker, Envelope, Publisher, Topic } from "../src/index.ts"

const Order = Schema.Struct({ orderId: Schema.String, total: Schema.Number })
const orders = Topic.make("orders", Order, { key: (o) => o.orderId, type: "com.acme.order.placed" })
const Live = Publisher.layer({ source: "urn:acme:shop" }).pipe(Layer.provideMerge(MemoryBroker.layer()))

describe("Publisher", () => {
  it.effect("publishes typed payloads that consumers decode", () =>
    Effect.gen(function* () {
      const receipt = yield* Publisher.publish(orders, { orderId: "o-1", total: 10 }, { correlationId: "c-9" })
      const receipts = yield* Publisher.publishAll(orders, [
        { orderId: "o-2", total: 20 },
        { orderId: "o-3", total: 30 }
      ])
      assert.strictEqual(receipts.length, 2)
      const broker = yield* Broker.Broker
      const ds = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "g", consumer: "c" }), 3)
      )
      const decoded = ds.map((d) => Envelope.decodeResult(orders, d.envelope))
      assert.isTrue(decoded.every(Result.isSuccess))
      const first = (decoded[0] as Result.Success<Envelope.Envelope<typeof Order.Type>, never>).success
      assert.strictEqual(first.id, receipt.id)
      assert.strictEqual(ds[0]!.entryId, receipt.entryId)
      assert.strictEqual(first.key, "o-1", "the topic's key function")
      assert.strictEqual(first.type, "com.acme.order.placed")
      assert.strictEqual(first.source, "urn:acme:shop", "the publisher's source")
      assert.strictEqual(first.headers.correlationid, "c-9")
      assert.deepStrictEqual(
        decoded.map((d) => (Result.isSuccess(d) ? d.success.payload.orderId : "")),
        ["o-1", "o-2", "o-3"]
      )
    }).pipe(Effect.provide(Live))
  )

  it.effect("a payload failing its Schema is a PayloadError and nothing is published", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        Publisher.publishAll(orders, [
          { orderId: "ok", total: 1 },
          { orderId: "bad", total: "x" as unknown as number }
        ])
      )
      assert.strictEqual(error._tag, "PayloadError")
      assert.include(error.message, "total")
      const memory = yield* MemoryBroker.MemoryBroker
      assert.strictEqual(yield* memory.length("orders"), 0, "the whole batch was refused")
    }).pipe(Effect.provide(Live))
  )

  it.effect("a payload over the topic's maxBytes is a PayloadError naming the limit, and nothing is published", () =>
    Effect.gen(function* () {
      const small = Topic.make("orders", Order, { maxBytes: 64 })
      const error = yield* Effect.flip(
        Publisher.publishAll(small, [
          { orderId: "ok", total: 1 },
          { orderId: "x".repeat(60), total: 2 }
        ])
      )
      assert.strictEqual(error._tag, "PayloadError")
      if (error._tag === "PayloadError") {
        assert.strictEqual(error.direction, "encode")
        assert.include(error.message, "over the topic's limit of 64 (Topic option maxBytes)")
      }
      const memory = yield* MemoryBroker.MemoryBroker
      assert.strictEqual(yield* memory.length("orders"), 0, "the whole batch was refused")
    }).pipe(Effect.provide(Live))
  )

  it.effect("an invalid header name is a typed InvalidName", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        Publisher.publish(orders, { orderId: "o", total: 1 }, { headers: { "Bad Name": "v" } })
      )
      assert.strictEqual(error._tag, "InvalidName")
    }).pipe(Effect.provide(Live))
  )

  it.effect("an explicit message id is kept (idempotent publish)", () =>
    Effect.gen(function* () {
      const receipt = yield* Publisher.publish(orders, { orderId: "o", total: 1 }, { id: "my-id-1" })
      assert.strictEqual(receipt.id, "my-id-1")
    }).pipe(Effect.provide(Live))
  )
})
