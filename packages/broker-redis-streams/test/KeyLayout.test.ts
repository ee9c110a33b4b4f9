/**
 * The key layout of partitioned topics on real Redis: each partition's keys under a hash tag of its own (so a
 * topic's partitions map to different Redis Cluster slots), the dead-letter queue one stream per partition,
 * read as one queue; and topics written under the earlier layout (one tag per topic) refused with a message
 * that says what to do, or read with `hashTag: "topic"`.
 */
import { Broker, BrokerError, DeadLetter, Topic } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Cause, Effect, Exit, Layer, Schema, Stream } from "effect"
import * as Redis from "effect/persistence/Redis"
import { RedisStreamsBroker } from "../src/index.ts"
import { brokerLayer, mainUrl, Prefix } from "./helpers.ts"

/** The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384. */
const slotOf = (key: string): number => {
  const open = key.indexOf("{")
  const close = open < 0 ? -1 : key.indexOf("}", open + 1)
  const tag = open >= 0 && close > open + 1 ? key.slice(open + 1, close) : key
  let crc = 0
  for (const byte of Buffer.from(tag)) {
    crc ^= byte << 8
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff
  }
  return crc % 16384
}

const Item = Schema.Struct({ n: Schema.Number, text: Schema.String })

describe("key layout of partitioned topics", () => {
  it.live("each partition under a hash tag of its own; the dead-letter queue read and purged across them", () =>
    Effect.gen(function* () {
      assert.strictEqual(slotOf("123456789"), 12739, "CRC16 of the Redis Cluster specification's example")
      const broker = yield* Broker.Broker
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const topic = "layout.spread"
      const messages = BrokerTest.messages(topic, 120, { keyOf: (n) => `k-${n}` })
      yield* broker.publish(messages)
      const streams = [0, 1, 2, 3].map((p) => `${prefix}:{${topic}:p${p}}`)
      const lengths = yield* Effect.forEach(streams, (s) => redis.send<number>("XLEN", s))
      assert.strictEqual(
        lengths.reduce((a, b) => a + Number(b), 0),
        120,
        `every message in a partition stream: ${lengths}`
      )
      assert.isTrue(
        lengths.every((n) => Number(n) > 0),
        "the keys spread over the partitions"
      )
      assert.isAbove(new Set(streams.map(slotOf)).size, 1, "the partitions map to different slots")
      assert.strictEqual(Number(yield* redis.send<number>("EXISTS", `${prefix}:{${topic}}:p0`)), 0)

      // dead-letter all of them: one dead-letter stream per partition, in that partition's slot
      yield* broker.subscribe({ topic, group: "g", consumer: "c", batchSize: 200 }).pipe(
        Stream.take(120),
        Stream.runForEach((d) => d.deadLetter({ reason: "permanent", error: `refused ${d.envelope.id}` }))
      )
      for (const s of streams) assert.isAbove(Number(yield* redis.send<number>("XLEN", `${s}:dlq`)), 0)
      const all = yield* DeadLetter.list(topic)
      assert.strictEqual(all.length, 120)
      assert.isTrue(
        all.every((d) => /^p[0-3]:\d+-\d+$/.test(d.id)),
        "ids name their partition"
      )
      assert.deepStrictEqual([...all.map((d) => d.envelope!.id)].sort(), messages.map((m) => m.id).sort())
      // pages: after the 50th, the rest, without a repeat
      const first = yield* broker.deadLetters(topic, { limit: 50 })
      const rest = yield* broker.deadLetters(topic, { after: first[49]!.id })
      assert.deepStrictEqual(
        [...first, ...rest].map((d) => d.id),
        all.map((d) => d.id)
      )
      const one = yield* DeadLetter.show(topic, all[70]!.id)
      assert.strictEqual(one.envelope!.id, all[70]!.envelope!.id)
      const bad = yield* Effect.exit(broker.deadLetters(topic, { from: "1-0" }))
      const error = Exit.isFailure(bad) ? Cause.findErrorOption(bad.cause) : undefined
      assert.isTrue(
        error?._tag === "Some" &&
          BrokerError.isBrokerError(error.value) &&
          error.value.reason._tag === "InvalidArgument"
      )
      const info = (yield* broker.topics!).find((t) => t.name === topic)
      assert.strictEqual(info?.deadLetters, 120, "counted over the partitions")
      // purge by ids (across partitions), then the rest
      assert.strictEqual(yield* DeadLetter.purge(topic, [all[0]!.id, all[1]!.id, all[119]!.id, "p9:1-0"]), 3)
      assert.strictEqual(yield* DeadLetter.purge(topic), 117)
      assert.deepStrictEqual(yield* DeadLetter.list(topic), [])
    }).pipe(Effect.provide(brokerLayer(mainUrl, { partitions: 4 })))
  )

  it.live(
    'a partitioned topic written under the earlier layout: refused with what to do, read with hashTag: "topic"',
    () =>
      Effect.gen(function* () {
        const redis = yield* Redis.Redis
        const prefix = yield* Prefix
        const topic = Topic.make("layout.earlier", Item, { key: (i) => String(i.n) })
        // what an earlier version wrote: the topic's partitions under one tag, `{topic}:p<i>`
        const [m] = BrokerTest.messages(topic.name, 1)
        yield* redis.send("HSET", `${prefix}:{${topic.name}}:meta`, "partitions", "4")
        yield* redis.send(
          "XADD",
          `${prefix}:{${topic.name}}:p0`,
          "*",
          "ce",
          JSON.stringify({ id: m!.id, type: m!.type, source: m!.source, time: m!.time, topic: topic.name }),
          "data",
          m!.data
        )
        const refused = yield* Effect.exit(
          Effect.gen(function* () {
            const broker = yield* Broker.Broker
            yield* broker.publish(BrokerTest.messages(topic.name, 1, { from: 1 }))
          }).pipe(Effect.provide(RedisLayerWith(prefix, "partition")))
        )
        const error = Exit.isFailure(refused) ? Cause.findErrorOption(refused.cause) : undefined
        assert.isTrue(error?._tag === "Some" && BrokerError.isBrokerError(error.value))
        const message = error?._tag === "Some" ? String((error.value as BrokerError.BrokerError).message) : ""
        assert.include(message, "hashTag")
        assert.include(message, 'hashTag: "topic"')
        // with the earlier layout, it is read as before
        const got = yield* Effect.gen(function* () {
          const broker = yield* Broker.Broker
          return yield* broker
            .subscribe({ topic: topic.name, group: "g", consumer: "c" })
            .pipe(Stream.take(1), Stream.runCollect)
        }).pipe(Effect.provide(RedisLayerWith(prefix, "topic")))
        assert.strictEqual(got[0]!.envelope.id, m!.id)
      }).pipe(Effect.provide(brokerLayer(mainUrl, { partitions: 4 })))
  )
})

/** A second broker on the same prefix (the test's keys), with the given hash-tag layout. */
const RedisLayerWith = (prefix: string, hashTag: "partition" | "topic") =>
  Layer.unwrap(
    Effect.map(Effect.service(Redis.Redis), (redis) =>
      RedisStreamsBroker.layer({ prefix, partitions: 4, hashTag, block: "200 millis" }).pipe(
        Layer.provide(Layer.succeed(Redis.Redis, redis))
      )
    )
  )
