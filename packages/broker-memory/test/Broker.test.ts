import { BrokerTest } from "@converge/core/testing"
import { MemoryBroker } from "../src/index.ts"

BrokerTest.suite("memory", MemoryBroker.layer({ orderedPerKey: true }), {
  clock: "test",
  persistent: true,
  orderedPerKey: true,
  delayedDelivery: true,
  operatorViews: true,
  restart: MemoryBroker.MemoryBroker.use((m) => m.faults.restart),
  deleteTopic: (topic) => MemoryBroker.MemoryBroker.use((m) => m.faults.deleteTopic(topic)),
  trim: (topic, maxLen) => MemoryBroker.MemoryBroker.use((m) => m.faults.trim(topic, maxLen)),
  appendRaw: (topic, fields) => MemoryBroker.MemoryBroker.use((m) => m.faults.appendRaw(topic, fields))
})
