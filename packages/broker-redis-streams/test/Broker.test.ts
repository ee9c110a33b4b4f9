import { BrokerTest } from "@converge/core/testing"
import { afterAll, beforeAll, describe } from "@effect/vitest"
import { Effect } from "effect"
import { brokerLayer, hooks, mainUrl, OwnedRedis } from "./helpers.ts"

// The shared suite against the machine's Redis (127.0.0.1:6379); each case gets its own key prefix.
BrokerTest.suite("redis-streams", brokerLayer(), {
  clock: "live",
  persistent: true,
  orderedPerKey: false,
  delayedDelivery: true,
  claimIdle: "1 second",
  operatorViews: true,
  ...hooks
})

// C14 needs a server the test can kill -9 and restart: a test-owned redis-server with AOF.
describe("with a test-owned redis-server (AOF, kill -9, restart)", () => {
  const owned = new OwnedRedis(6390 + (process.pid % 50))
  beforeAll(() => owned.start(), 20_000)
  afterAll(() => owned.stop())
  BrokerTest.suite("redis-streams (restart)", brokerLayer(owned.url), {
    clock: "live",
    persistent: true,
    orderedPerKey: false,
    delayedDelivery: true,
    claimIdle: "1 second",
    only: ["C14"],
    restart: Effect.promise(() => owned.restart())
  })
})

// Per-key order: partitioned streams, one consumer per partition (leases), keys parked while their
// head is in flight or backing off.
BrokerTest.suite(
  "redis-streams (ordered, 1 partition)",
  brokerLayer(mainUrl, { orderedPerKey: true, leaseTime: "2 seconds" }),
  {
    clock: "live",
    persistent: true,
    orderedPerKey: true,
    delayedDelivery: true,
    claimIdle: "1 second",
    only: ["C01", "C04", "C05", "C09", "C12", "C16", "C18", "C19", "C24"]
  }
)

BrokerTest.suite(
  "redis-streams (ordered, 4 partitions)",
  brokerLayer(mainUrl, { orderedPerKey: true, partitions: 4, leaseTime: "2 seconds" }),
  {
    clock: "live",
    persistent: true,
    orderedPerKey: true,
    delayedDelivery: true,
    claimIdle: "1 second",
    operatorViews: true,
    // cases that assert one global order across all messages do not apply to several partitions
    only: ["C05", "C09", "C12", "C16", "C18", "C27"]
  }
)

// The field-per-attribute layout (`layout: "fields"`): the cases that publish, redeliver, dead-letter and
// read raw entries, on entries of that layout (the suites above run the compact default)
BrokerTest.suite("redis-streams (layout: fields)", brokerLayer(mainUrl, { layout: "fields" }), {
  clock: "live",
  persistent: true,
  orderedPerKey: false,
  delayedDelivery: true,
  claimIdle: "1 second",
  operatorViews: true,
  only: ["C01", "C02", "C04", "C17", "C18", "C19", "C23", "C24", "C26", "C27"],
  ...hooks
})
