/**
 * The outbox → relay → broker → inbox path (`PipelineTest`) and the saga suite (`SagaTest`) on NATS
 * JetStream + Postgres: the same test bodies as on the memory broker and Redis; only the broker layer differs.
 * P02 restarts a test-owned server (file store) under running consumers.
 */
import { PipelineTest, SagaTest } from "@converge/store-postgres/testing"
import { afterAll, beforeAll, describe } from "@effect/vitest"
import { Effect } from "effect"
import { brokerLayer, OwnedNats, whenBack } from "./helpers.ts"

PipelineTest.suite("nats-jetstream", { broker: brokerLayer() })

SagaTest.suite("nats-jetstream + Postgres", { broker: brokerLayer() })

describe("with a test-owned nats-server (file store, kill -9, restart)", () => {
  const owned = new OwnedNats()
  beforeAll(() => owned.start(), 20_000)
  afterAll(() => owned.stop())
  PipelineTest.suite("nats-jetstream (restart)", {
    broker: owned.brokerLayer(),
    restart: Effect.andThen(
      Effect.promise(() => owned.restart()),
      whenBack
    )
  })
})
