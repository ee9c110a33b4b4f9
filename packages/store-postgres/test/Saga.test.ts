import { MemoryBroker } from "@converge/broker-memory"
import { SagaTest } from "../src/testing/index.ts"

SagaTest.suite("memory broker + Postgres", { broker: MemoryBroker.layer() })
