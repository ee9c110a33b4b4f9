/**
 * The saga suite on Redis Streams + Postgres: the same test body as on the memory broker
 * (`SagaTest`); only the broker layer differs.
 */
import { SagaTest } from "@converge/store-postgres/testing"
import { brokerLayer } from "./helpers.ts"

SagaTest.suite("redis-streams + Postgres", { broker: brokerLayer() })
