/**
 * Redis Streams benchmarks, at the `Broker` level (encoded envelopes; every
 * body is `JSON.parse`d on the consuming side, as the baselines do), each next
 * to a hand-written node-redis baseline in the same run, plus BullMQ on the
 * same payloads. Needs a Redis at `REDIS_URL` (default 127.0.0.1:6379).
 */
import { randomUUID } from "node:crypto"
import { RedisStreamsBroker } from "@converge/broker-redis-streams"
import { Broker, Consumer, Envelope, Topic } from "@converge/core"
import { NodeRedis } from "@effect/platform-node"
import { Queue, Worker } from "bullmq"
import { Effect, Layer, Result, type Scope } from "effect"
import type * as Redis from "effect/persistence/Redis"
import { createClient } from "redis"
import { type Bench, consumeThroughBroker, deleteRedisKeys, pairs, row } from "./harness.ts"
import { Order, order } from "./payload.ts"

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const orders = Topic.make("bench-redis", Order, { key: (o) => o.orderId })
const batch = 100

const encodedMessages = (count: number): Array<Envelope.Encoded> => {
  const iso = new Date().toISOString()
  return Array.from({ length: count }, (_, i) => {
    const r = Envelope.makeEncodedResult(orders, order(i), Date.now(), undefined, iso)
    if (Result.isFailure(r)) throw r.failure
    return r.success
  })
}

/** Runs an Effect with a fresh broker (unique prefix), the broker's context, and cleans up. */
const withBroker = <A>(
  f: (prefix: string) => Effect.Effect<A, unknown, Broker.Broker | Redis.Redis | Scope.Scope>,
  layout: RedisStreamsBroker.Layout = "compact"
) => {
  const prefix = `cvbench:${randomUUID().slice(0, 8)}`
  // the run's keys go with it (20 000 entries a run: left behind, they grew Redis by a gigabyte a bench)
  return Effect.runPromise(
    f(prefix).pipe(
      Effect.scoped,
      Effect.provide(
        RedisStreamsBroker.layer({ prefix, block: "100 millis", layout }).pipe(
          Layer.provideMerge(NodeRedis.layer({ url, maxConnections: 20 }))
        )
      )
    )
  ).finally(() => deleteRedisKeys(`${prefix}:*`, url))
}

const rawClient = async () => {
  const client = createClient({ url })
  client.on("error", () => {})
  await client.connect()
  return client
}

// --- publish -----------------------------------------------------------------

const publishConverge = (messages: ReadonlyArray<Envelope.Encoded>) =>
  withBroker(() =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const start = performance.now()
      for (let b = 0; b < messages.length; b += batch) yield* broker.publish(messages.slice(b, b + batch))
      return performance.now() - start
    })
  )

/** The hand-written baselines' entries: two fields, an id and a JSON body (the payload). */
const twoFields = (m: Envelope.Encoded): Array<string> => ["id", m.id, "body", m.data]

const publishRaw = async (messages: ReadonlyArray<Envelope.Encoded>) => {
  const client = await rawClient()
  const key = `cvbench:${randomUUID().slice(0, 8)}:{raw}`
  try {
    const start = performance.now()
    for (let b = 0; b < messages.length; b += batch) {
      // commands issued in one tick are pipelined by node-redis
      await Promise.all(
        messages.slice(b, b + batch).map((m) => client.sendCommand(["XADD", key, "*", ...twoFields(m)]))
      )
    }
    return performance.now() - start
  } finally {
    await client.del(key)
    await client.close()
  }
}

// --- consume -----------------------------------------------------------------

/** Converge: subscribe, JSON.parse each body, one ackAll per read. */
const consumeConverge = (messages: ReadonlyArray<Envelope.Encoded>, layout: RedisStreamsBroker.Layout = "compact") =>
  withBroker(() => consumeThroughBroker(orders.name, messages, batch), layout)

/** Converge's typed path: the consumer runtime decoding every payload with its Schema. */
const consumeTyped = (messages: ReadonlyArray<Envelope.Encoded>) =>
  withBroker(() =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      for (let b = 0; b < messages.length; b += 1000) yield* broker.publish(messages.slice(b, b + 1000))
      let consumed = 0
      const done = Promise.withResolvers<void>()
      const start = performance.now()
      yield* Consumer.make(orders, {
        group: "g",
        consumer: "c",
        batchSize: batch,
        handle: () =>
          Effect.sync(() => {
            if (++consumed === messages.length) done.resolve()
          })
      })
      yield* Effect.promise(() => done.promise)
      return performance.now() - start
    })
  )

const xreadgroupEntries = (reply: unknown): Array<[string, Record<string, string>]> => {
  const out: Array<[string, Record<string, string>]> = []
  if (reply === null || typeof reply !== "object") return out
  for (const entries of Object.values(reply as Record<string, unknown>)) {
    for (const [id, flat] of entries as Array<[string, Array<string>]>) {
      const fields: Record<string, string> = {}
      for (let i = 0; i < flat.length; i += 2) fields[flat[i]!] = flat[i + 1]!
      out.push([id, fields])
    }
  }
  return out
}

/**
 * Hand-written: XREADGROUP COUNT n + JSON.parse of each body + XACK, in a loop, over entries of two fields
 * (`twoFields`), or of the field-per-attribute layout (`layout: "fields"`, for reference).
 */
const consumeRaw = async (messages: ReadonlyArray<Envelope.Encoded>, layout: "two" | "fields" = "two") => {
  const client = await rawClient()
  const reader = client.duplicate()
  reader.on("error", () => {})
  await reader.connect()
  const key = `cvbench:${randomUUID().slice(0, 8)}:{raw}`
  try {
    await client.sendCommand(["XGROUP", "CREATE", key, "g", "0", "MKSTREAM"])
    const fields = messages.map((m) => (layout === "two" ? twoFields(m) : Object.entries(Envelope.toFields(m)).flat()))
    for (let b = 0; b < fields.length; b += 1000) {
      await Promise.all(fields.slice(b, b + 1000).map((f) => client.sendCommand(["XADD", key, "*", ...f])))
    }
    let consumed = 0
    const start = performance.now()
    while (consumed < messages.length) {
      const reply = await reader.sendCommand([
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "COUNT",
        String(batch),
        "BLOCK",
        "100",
        "STREAMS",
        key,
        ">"
      ])
      const entries = xreadgroupEntries(reply)
      if (entries.length === 0) continue
      for (const [, f] of entries) JSON.parse(layout === "two" ? f.body! : f.data!)
      await client.sendCommand(["XACK", key, "g", ...entries.map(([id]) => id)])
      consumed += entries.length
    }
    return performance.now() - start
  } finally {
    await client.del(key)
    await reader.close()
    await client.close()
  }
}

/** BullMQ: addBulk, then a Worker with concurrency 100 until every job completed. */
const consumeBullmq = async (count: number) => {
  const connection = await rawClient()
  const prefix = `cvbullmq${randomUUID().slice(0, 8)}`
  const queue = new Queue("bench", { connection, prefix })
  try {
    const payloads = Array.from({ length: count }, (_, i) => order(i))
    for (let b = 0; b < count; b += 1000) {
      await queue.addBulk(
        payloads.slice(b, b + 1000).map((data) => ({
          name: "order",
          data,
          opts: { removeOnComplete: true, removeOnFail: true }
        }))
      )
    }
    let completed = 0
    const done = Promise.withResolvers<void>()
    const start = performance.now()
    const worker = new Worker(
      "bench",
      async (job) => {
        JSON.stringify(job.data)
        if (++completed === count) done.resolve()
      },
      { connection, prefix, concurrency: 100 }
    )
    await done.promise
    const elapsed = performance.now() - start
    await worker.close()
    return elapsed
  } finally {
    await queue.obliterate({ force: true }).catch(() => {})
    await queue.close()
    await deleteRedisKeys(`${prefix}:*`, url)
    await connection.close().catch(() => {})
  }
}

// --- rows --------------------------------------------------------------------

const count = 20_000
let messagesCache: Array<Envelope.Encoded> | undefined
const messages = () => {
  messagesCache ??= encodedMessages(count)
  return messagesCache
}

/** A benchmark comparing `ours` with `theirs` in alternating runs. */
const compare = (
  name: string,
  label: string,
  baseline: string,
  ours: () => Promise<number>,
  theirs: () => Promise<number>,
  theirCount = count
): Bench => ({
  name,
  run: async () => [row(label, baseline, await pairs(ours, theirs, count, theirCount))]
})

const handWrittenLoop = "node-redis XREADGROUP+XACK loop, 2-field entries (id, body)"
const bullmq = "bullmq addBulk+Worker(concurrency 100)"

/** The Redis benchmarks. */
export const benches: ReadonlyArray<Bench> = [
  compare(
    "redis/publish",
    "redis/publish",
    "node-redis pipelined XADD, 2-field entries (id, body)",
    () => publishConverge(messages()),
    () => publishRaw(messages())
  ),
  compare(
    "redis/consume",
    "redis/consume",
    handWrittenLoop,
    () => consumeConverge(messages()),
    () => consumeRaw(messages())
  ),
  compare(
    "redis/consume-typed",
    "redis/consume-typed (Consumer, Schema decode)",
    handWrittenLoop,
    () => consumeTyped(messages()),
    () => consumeRaw(messages())
  ),
  compare(
    "redis/consume-vs-bullmq",
    "redis/consume (vs BullMQ)",
    bullmq,
    () => consumeConverge(messages()),
    () => consumeBullmq(5_000),
    5_000
  ),
  compare(
    "redis/consume-typed-vs-bullmq",
    "redis/consume-typed (vs BullMQ)",
    bullmq,
    () => consumeTyped(messages()),
    () => consumeBullmq(5_000),
    5_000
  ),
  compare(
    "redis/consume-fields",
    'redis/consume, layout "fields"',
    "node-redis XREADGROUP+XACK loop, field-per-attribute entries",
    () => consumeConverge(messages(), "fields"),
    () => consumeRaw(messages(), "fields")
  )
]
