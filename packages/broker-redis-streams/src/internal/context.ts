/**
 * What the parts of one Redis Streams broker share: the client, the key
 * layout and the resolved options. Built once by `RedisStreamsBroker.make`
 * and passed down, so no module reaches back up for state.
 *
 * @internal
 */
import { BrokerError, Name } from "@converge/core"
import { Effect, Result } from "effect"
import type * as Redis from "effect/persistence/Redis"
import type { Impl } from "./delivery.ts"
import { fail } from "./errors.ts"
import type { Keys } from "./keys.ts"

/** How a publish counts as stored: see `RedisStreamsBroker.Durability`. */
export type Durability = "reply" | "waitaof-local" | "waitaof-replicas"

/** The shared state and settings of one broker instance. */
export interface BrokerContext {
  readonly redis: Redis.Redis["Service"]
  readonly impl: Impl
  readonly keys: (topic: string) => Keys
  readonly partitions: number
  readonly ordered: boolean
  readonly leaseMs: number
  readonly blockMs: number
  readonly moveEvery: number
  readonly durability: Durability
  readonly replicas: number
  readonly durabilityTimeoutMs: number
  readonly maxLen: number | undefined
  readonly trimEvery: number
  /** Drops of the subscriptions' reserved connections, run when the layer shuts down. */
  readonly sessions: Set<Effect.Effect<void>>
  /** True once the layer shut down. */
  readonly isClosed: () => boolean
}

/** Fails with `InvalidArgument` when `value` is not a valid name of `kind`. */
export const checkName = (kind: Name.NameKind, value: string): Effect.Effect<void, BrokerError.BrokerError> => {
  const ok = Name.check(kind, value)
  return Result.isFailure(ok)
    ? fail(new BrokerError.InvalidArgument({ argument: kind, message: ok.failure.message }))
    : Effect.void
}
