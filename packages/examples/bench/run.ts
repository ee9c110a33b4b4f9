/**
 * `pnpm bench`: every Converge benchmark, each next to its hand-written
 * baseline measured in the same run. Options: `--json`, `--only <name>`.
 */

import * as ConsumerBench from "./consumer.ts"
import { main } from "./harness.ts"
import * as Memory from "./memory.ts"
import * as NatsBench from "./nats.ts"
import * as OutboxBench from "./outbox.ts"
import * as RedisBench from "./redis.ts"
import * as SagaBench from "./saga.ts"

await main(
  [
    ...Memory.benches,
    ...ConsumerBench.benches,
    ...RedisBench.benches,
    ...NatsBench.benches,
    ...OutboxBench.benches,
    ...SagaBench.benches
  ],
  process.argv.slice(2)
)
