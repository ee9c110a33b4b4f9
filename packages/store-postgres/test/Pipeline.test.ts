import { MemoryBroker } from "@converge/broker-memory"
import { PipelineTest } from "../src/testing/index.ts"

PipelineTest.suite("memory broker + Postgres", { broker: MemoryBroker.layer() })
