/**
 * The broker on a Redis Cluster: three test-owned masters on loopback ports of their own, joined with
 * `redis-cli --cluster create`, reached through `RedisCluster.layer` (node-redis's cluster client). The shared
 * conformance suite runs against it with one partition, with four (each under a hash tag of its own, so a
 * subscription reads them with one command each) and ordered; and a topic's partitions are checked to have
 * landed on more than one node, read off each node with a plain client of its own.
 */
import { Broker } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect, Stream } from "effect"
import { createClient } from "redis"
import { RedisCluster, type RedisStreamsBroker } from "../src/index.ts"
import { brokerLayerOn, hooks, OwnedCluster, Prefix } from "./helpers.ts"

const cluster = new OwnedCluster(7400 + (process.pid % 40) * 3)

const on = (options?: RedisStreamsBroker.Options) =>
  brokerLayerOn(() => RedisCluster.layer({ rootNodes: cluster.rootNodes, maxConnections: 40 }), options)

describe("on a three-node Redis Cluster (test-owned)", () => {
  beforeAll(() => cluster.start(), 60_000)
  afterAll(() => cluster.stop())

  BrokerTest.suite("redis-streams (cluster)", on(), {
    clock: "live",
    persistent: true,
    orderedPerKey: false,
    delayedDelivery: true,
    claimIdle: "1 second",
    operatorViews: true,
    ...hooks
  })

  // each partition under a hash tag of its own: the partitions spread over the nodes, a subscription reads
  // them with one XREADGROUP each. Left out: the cases needing the hooks (they act on a single stream key; the
  // one-partition registration above runs them) and those asserting one order across all messages (C01, C03,
  // C06, C13, C15), which partitions do not keep
  BrokerTest.suite("redis-streams (cluster, 4 partitions)", on({ partitions: 4 }), {
    clock: "live",
    persistent: true,
    orderedPerKey: false,
    delayedDelivery: true,
    claimIdle: "1 second",
    operatorViews: true,
    only: ["C02", "C04", "C07", "C10", "C12", "C16", "C17", "C19", "C25", "C26", "C27"]
  })

  BrokerTest.suite(
    "redis-streams (cluster, ordered, 4 partitions)",
    on({ orderedPerKey: true, partitions: 4, leaseTime: "2 seconds" }),
    {
      clock: "live",
      persistent: true,
      orderedPerKey: true,
      delayedDelivery: true,
      claimIdle: "1 second",
      operatorViews: true,
      only: ["C05", "C09", "C12", "C16", "C18", "C27"]
    }
  )

  it.live(
    "the partitions of one topic land on more than one node, and a group reads every message back",
    () =>
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        const prefix = yield* Prefix
        const topic = "spread"
        yield* broker.publish(BrokerTest.messages(topic, 400, { keyOf: (n) => `k-${n}` }))
        // each node, asked with a plain client of its own, lists the partition streams it holds
        const held = yield* Effect.promise(() =>
          Promise.all(
            cluster.ports.map(async (port) => {
              const client = createClient({ url: `redis://127.0.0.1:${port}` })
              client.on("error", () => {})
              await client.connect()
              const keys: Array<string> = []
              for await (const page of client.scanIterator({ MATCH: `${prefix}:{${topic}:p*}`, COUNT: 1000 })) {
                keys.push(...page)
              }
              await client.close()
              return keys
            })
          )
        )
        assert.deepStrictEqual(
          held.flat().sort(),
          Array.from({ length: 8 }, (_, i) => `${prefix}:{${topic}:p${i}}`).sort(),
          "every partition stream exists, on exactly one node"
        )
        assert.isAbove(held.filter((keys) => keys.length > 0).length, 1, `partition streams per node: ${held}`)
        const read = yield* broker.subscribe({ topic, group: "g", consumer: "c1", batchSize: 100 }).pipe(
          Stream.take(400),
          Stream.mapEffect((d) => Effect.as(broker.ackAll([d]), d.envelope.id)),
          Stream.runCollect
        )
        assert.strictEqual(new Set(read).size, 400)
      }).pipe(Effect.scoped, Effect.provide(on({ partitions: 8 }))),
    60_000
  )
})

describe("RedisCluster.routingKey", () => {
  it("routes by the command's first key", () => {
    assert.strictEqual(RedisCluster.routingKey("XADD", ["s{t}", "*", "f", "v"]), "s{t}")
    assert.strictEqual(
      RedisCluster.routingKey("xreadgroup", ["GROUP", "g", "c", "COUNT", "1", "STREAMS", "a{t}", "b{t}", ">", ">"]),
      "a{t}"
    )
    assert.strictEqual(RedisCluster.routingKey("EVALSHA", ["sha", "2", "k1{t}", "k2{t}", "arg"]), "k1{t}")
    assert.strictEqual(RedisCluster.routingKey("EVALSHA", ["sha", "0", "arg"]), undefined)
    assert.strictEqual(RedisCluster.routingKey("XGROUP", ["CREATE", "s{t}", "g", "0", "MKSTREAM"]), "s{t}")
    assert.strictEqual(RedisCluster.routingKey("XINFO", ["GROUPS", "s{t}"]), "s{t}")
    assert.strictEqual(RedisCluster.routingKey("XINFO", ["HELP"]), undefined)
    assert.strictEqual(RedisCluster.routingKey("SCAN", ["0", "MATCH", "x*"]), undefined)
    assert.strictEqual(RedisCluster.routingKey("INFO", ["cluster"]), undefined)
    assert.strictEqual(RedisCluster.routingKey("WAITAOF", ["1", "0", "1000"]), undefined)
  })
})
