/**
 * The two entry layouts on real Redis: the compact one (`ce` + `data`, the default) and the field-per-attribute
 * one (`layout: "fields"`). Entries written by a plain client in each layout are consumed as typed messages; a
 * stream holding both is consumed in order; each layout option writes what it says; a nack re-adds an entry
 * in its own layout with the next attempt.
 */
import { Consumer, Envelope, Publisher, Topic } from "@converge/core"
import { assert, describe, layer } from "@effect/vitest"
import { Data, Effect, Layer, Schedule, Schema } from "effect"
import * as Redis from "effect/persistence/Redis"
import { brokerLayer, Prefix, streamKey } from "./helpers.ts"

const Order = Schema.Struct({ orderId: Schema.String, cents: Schema.Int })
const fieldsOf = (flat: ReadonlyArray<unknown>): Record<string, string> => {
  const out: Record<string, string> = {}
  for (let i = 0; i + 1 < flat.length; i += 2) out[String(flat[i])] = String(flat[i + 1])
  return out
}

/** The entries of a stream as a plain client reads them: id and fields. */
const entriesOf = (key: string) =>
  Effect.flatMap(Effect.service(Redis.Redis), (redis) =>
    Effect.map(redis.send<ReadonlyArray<[string, ReadonlyArray<unknown>]>>("XRANGE", key, "-", "+"), (rows) =>
      rows.map(([id, flat]) => ({ id, fields: fieldsOf(flat) }))
    )
  )

const received = (topic: Topic.Topic<typeof Order.Type, typeof Order.Encoded>, group: string) =>
  Effect.gen(function* () {
    const got: Array<{ orderId: string; attempt: number; key: string | undefined; correlation: string | undefined }> =
      []
    yield* Consumer.make(topic, {
      group,
      handle: (o, ctx) =>
        Effect.sync(() => {
          got.push({ orderId: o.orderId, attempt: ctx.attempt, key: ctx.key, correlation: ctx.headers.correlationid })
        })
    })
    return got
  })

const until = (cond: () => boolean) =>
  Effect.gen(function* () {
    for (let i = 0; i < 200 && !cond(); i++) yield* Effect.sleep(25)
    assert.isTrue(cond(), "timed out")
  })

class Later extends Data.TaggedError("Later")<{}> {}

describe("entry layouts on Redis", () => {
  layer(Publisher.layer().pipe(Layer.provideMerge(brokerLayer())), { timeout: 60_000, excludeTestServices: true })(
    (it) => {
      it.effect("entries written by a plain client in each layout, one stream holding both: typed, in order", () =>
        Effect.gen(function* () {
          const redis = yield* Redis.Redis
          const prefix = yield* Prefix
          const topic = Topic.make("layouts.plain", Order, { key: (o) => o.orderId, type: "shop.order" })
          const key = streamKey(prefix, topic.name)
          const time = "2026-12-03T10:00:00.000Z"
          // compact: two fields, as a plain client writes them
          yield* redis.send(
            "XADD",
            key,
            "*",
            "ce",
            JSON.stringify({
              specversion: "1.0",
              id: "plain-1",
              type: "shop.order",
              source: "urn:legacy",
              time,
              topic: topic.name,
              subject: "o-1",
              headers: { correlationid: "flow-1" }
            }),
            "data",
            JSON.stringify({ orderId: "o-1", cents: 100 })
          )
          // one field per attribute (the CloudEvents Kafka binary binding)
          yield* redis.send(
            "XADD",
            key,
            "*",
            "ce_specversion",
            "1.0",
            "ce_id",
            "plain-2",
            "ce_type",
            "shop.order",
            "ce_source",
            "urn:legacy",
            "ce_time",
            time,
            "ce_topic",
            topic.name,
            "ce_subject",
            "o-2",
            "ce_correlationid",
            "flow-2",
            "data",
            JSON.stringify({ orderId: "o-2", cents: 200 })
          )
          // and one more compact, after it: the stream holds both layouts, interleaved
          yield* redis.send(
            "XADD",
            key,
            "*",
            "ce",
            JSON.stringify({
              id: "plain-3",
              type: "shop.order",
              source: "urn:legacy",
              time,
              topic: topic.name,
              attempt: 2
            }),
            "data",
            JSON.stringify({ orderId: "o-3", cents: 300 })
          )
          const got = yield* received(topic, "billing")
          yield* until(() => got.length === 3)
          assert.deepStrictEqual(got, [
            { orderId: "o-1", attempt: 1, key: "o-1", correlation: "flow-1" },
            { orderId: "o-2", attempt: 1, key: "o-2", correlation: "flow-2" },
            { orderId: "o-3", attempt: 2, key: undefined, correlation: undefined }
          ])
        })
      )

      it.effect("the default writes the compact layout: two fields per entry, and the consumer reads it", () =>
        Effect.gen(function* () {
          const prefix = yield* Prefix
          const topic = Topic.make("layouts.compact", Order, { key: (o) => o.orderId })
          const receipt = yield* Publisher.publish(topic, { orderId: "o-9", cents: 900 }, { correlationId: "c-9" })
          const [entry] = yield* entriesOf(streamKey(prefix, topic.name))
          assert.deepStrictEqual(Object.keys(entry!.fields), ["ce", "data"])
          const read = Envelope.fromFields(entry!.fields)
          assert.isTrue(read._tag === "Success" && read.success.id === receipt.id && read.success.key === "o-9")
          assert.deepStrictEqual(JSON.parse(entry!.fields.data!), { orderId: "o-9", cents: 900 })
        })
      )

      it.effect("a nack re-adds the entry in its own layout with the next attempt (compact)", () =>
        Effect.gen(function* () {
          const prefix = yield* Prefix
          const topic = Topic.make("layouts.retry", Order, { key: (o) => o.orderId })
          let failures = 1
          const attempts: Array<number> = []
          yield* Consumer.make(topic, {
            group: "g",
            errors: { Later: "retry" },
            retry: Schedule.spaced("50 millis").pipe(Schedule.upTo({ times: 3 })),
            // every retry goes through the broker (a nack with a delay), none in process
            inProcessDelayLimit: 0,
            handle: (_, ctx) =>
              Effect.suspend(() => {
                attempts.push(ctx.attempt)
                return failures-- > 0 ? Effect.fail(new Later()) : Effect.void
              })
          })
          yield* Publisher.publish(topic, { orderId: "o-r", cents: 1 })
          yield* until(() => attempts.length === 2)
          assert.deepStrictEqual(attempts, [1, 2])
          const retried = yield* entriesOf(`${streamKey(prefix, topic.name)}:retry:g`)
          assert.isAtLeast(retried.length, 1)
          assert.include(Object.keys(retried[0]!.fields), "ce", "re-added compact")
          assert.notInclude(Object.keys(retried[0]!.fields), "ce_attempt")
        })
      )
    }
  )

  layer(Publisher.layer().pipe(Layer.provideMerge(brokerLayer(undefined, { layout: "fields" }))), {
    timeout: 60_000,
    excludeTestServices: true
  })((it) => {
    it.effect('layout: "fields" writes one field per attribute, and the consumer reads it', () =>
      Effect.gen(function* () {
        const prefix = yield* Prefix
        const topic = Topic.make("layouts.fields", Order, { key: (o) => o.orderId })
        yield* Publisher.publish(topic, { orderId: "o-f", cents: 5 })
        const [entry] = yield* entriesOf(streamKey(prefix, topic.name))
        assert.includeMembers(Object.keys(entry!.fields), [
          "ce_id",
          "ce_type",
          "ce_source",
          "ce_time",
          "ce_topic",
          "ce_subject",
          "data"
        ])
        assert.notInclude(Object.keys(entry!.fields), "ce")
        const got = yield* received(topic, "g")
        yield* until(() => got.length === 1)
        assert.strictEqual(got[0]!.orderId, "o-f")
      })
    )
  })
})
