/**
 * The Converge demo: `pnpm demo`.
 *
 * Runs example 01 (orders → billing and shipping consumers, a transient
 * failure retried, a permanent one and an undecodable message
 * dead-lettered) on the in-memory broker: no server needed. With
 * `REDIS_URL` set, the same program runs on the Redis Streams broker.
 */
import { randomUUID } from "node:crypto"
import { MemoryBroker } from "@converge/broker-memory"
import { RedisStreamsBroker } from "@converge/broker-redis-streams"
import { Publisher } from "@converge/core"
import { NodeRedis, NodeRuntime } from "@effect/platform-node"
import { Console, Effect, Layer } from "effect"
import { program } from "./01-orders/program.ts"

// REDIS_URL switches to the Redis Streams broker (each run uses keys of its own prefix)
const redisUrl = process.env.REDIS_URL
const BrokerLive =
  redisUrl === undefined || redisUrl === ""
    ? MemoryBroker.layer({ orderedPerKey: true })
    : RedisStreamsBroker.layer({ prefix: `converge-demo:${randomUUID().slice(0, 8)}` }).pipe(
        Layer.provide(NodeRedis.layer({ url: redisUrl }))
      )
const AppLive = Publisher.layer({ source: "urn:example:shop" }).pipe(Layer.provideMerge(BrokerLive))

const main = Effect.gen(function* () {
  yield* Console.log(`Converge demo: orders on ${redisUrl ? `Redis Streams at ${redisUrl}` : "the in-memory broker"}\n`)
  const summary = yield* Effect.scoped(program)
  yield* Console.log("\nSummary")
  yield* Console.log(`  published:     ${summary.published.length} orders (ids ${summary.published.join(", ")})`)
  yield* Console.log(`  billed:        ${summary.billed.map((b) => `${b.orderId} (attempt ${b.attempt})`).join(", ")}`)
  yield* Console.log(`  shipped:       ${summary.shipped.join(", ")}`)
  yield* Console.log(`  dead letters:  ${summary.deadLetters.length}`)
  for (const d of summary.deadLetters) {
    yield* Console.log(`    - group ${d.group}: ${d.reason}: ${d.error.split("\n").join(" ")}`)
  }
})

NodeRuntime.runMain(main.pipe(Effect.provide(AppLive)))
