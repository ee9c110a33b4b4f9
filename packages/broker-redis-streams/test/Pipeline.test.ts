/**
 * The outbox → relay → broker → inbox path (`PipelineTest`) on Redis Streams + Postgres: the same test body as
 * on the memory broker and NATS; only the broker layer differs. P02 restarts a test-owned redis-server (AOF)
 * under running consumers.
 */
import { PipelineTest } from "@converge/store-postgres/testing"
import { afterAll, beforeAll, describe } from "@effect/vitest"
import { Effect } from "effect"
import { brokerLayer, OwnedRedis } from "./helpers.ts"

PipelineTest.suite("redis-streams", { broker: brokerLayer() })

describe("with a test-owned redis-server (AOF, kill -9, restart)", () => {
  const owned = new OwnedRedis(6440 + (process.pid % 50))
  beforeAll(() => owned.start(), 20_000)
  afterAll(() => owned.stop())
  PipelineTest.suite("redis-streams (restart)", {
    broker: brokerLayer(owned.url),
    restart: Effect.promise(() => owned.restart())
  })
})
