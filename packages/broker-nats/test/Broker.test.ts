/**
 * The shared conformance suite on NATS JetStream: the machine's server (127.0.0.1:4222) with a prefix per
 * case, and C14 against a test-owned server (file store) that is killed and restarted.
 */
import { BrokerTest } from "@converge/core/testing"
import { afterAll, beforeAll, describe } from "@effect/vitest"
import { Effect } from "effect"
import { brokerLayer, hooks, mainServer, OwnedNats, whenBack } from "./helpers.ts"

BrokerTest.suite("nats-jetstream", brokerLayer(), {
  clock: "live",
  persistent: true,
  orderedPerKey: false,
  delayedDelivery: true,
  claimIdle: "1 second",
  operatorViews: true,
  claimSkipsHolder: false,
  ...hooks
})

// Per-key order: a subject and a consumer per partition, one message in flight per partition
BrokerTest.suite("nats-jetstream (ordered, 1 partition)", brokerLayer(mainServer, { orderedPerKey: true }), {
  clock: "live",
  persistent: true,
  orderedPerKey: true,
  delayedDelivery: true,
  claimIdle: "1 second",
  claimSkipsHolder: false,
  only: ["C01", "C04", "C05", "C09", "C12", "C16", "C18", "C19", "C24"]
})

BrokerTest.suite(
  "nats-jetstream (ordered, 4 partitions)",
  brokerLayer(mainServer, { orderedPerKey: true, partitions: 4 }),
  {
    clock: "live",
    persistent: true,
    orderedPerKey: true,
    delayedDelivery: true,
    claimIdle: "1 second",
    operatorViews: true,
    claimSkipsHolder: false,
    // cases that assert one global order across all messages do not apply to several partitions
    only: ["C05", "C09", "C12", "C16", "C18", "C27"]
  }
)

describe("with a test-owned nats-server (file store, kill -9, restart)", () => {
  const owned = new OwnedNats()
  beforeAll(() => owned.start(), 20_000)
  afterAll(() => owned.stop())
  BrokerTest.suite("nats-jetstream (restart)", owned.brokerLayer(), {
    clock: "live",
    persistent: true,
    orderedPerKey: false,
    delayedDelivery: true,
    claimIdle: "1 second",
    only: ["C14"],
    // the restart is over once the broker's connection is back and JetStream answers on it
    restart: Effect.andThen(
      Effect.promise(() => owned.restart()),
      whenBack
    )
  })
})
