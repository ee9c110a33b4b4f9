/**
 * What the parts of one Redis Streams broker share: the client, the key
 * layout and the resolved options. Built once by `RedisStreamsBroker.make`
 * and passed down, so no module reaches back up for state.
 *
 * @internal
 */
import { BrokerError, type Envelope, Name } from "@converge/core"
import { Effect, Result } from "effect"
import type * as Redis from "effect/persistence/Redis"
import type { Impl } from "./delivery.ts"
import { fail, fromRedis } from "./errors.ts"
import type { Keys } from "./keys.ts"

/** How a publish counts as stored: see `RedisStreamsBroker.Durability`. */
export type Durability = "reply" | "waitaof-local" | "waitaof-replicas"

/** The shared state and settings of one broker instance. */
export interface BrokerContext {
  readonly redis: Redis.Redis["Service"]
  readonly impl: Impl
  /** The key prefix (`<prefix>:{<topic>}...`). */
  readonly prefix: string
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
  /** The fields of a published entry, in the configured layout. */
  readonly toFields: (e: Envelope.Encoded) => Record<string, string>
  /** True once the layer shut down. */
  readonly isClosed: () => boolean
  /** Topics whose partition count was checked against Redis. */
  readonly partitionsChecked: Set<string>
}

/** Fails with `InvalidArgument` when `value` is not a valid name of `kind`. */
export const checkName = (kind: Name.NameKind, value: string): Effect.Effect<void, BrokerError.BrokerError> => {
  const ok = Name.check(kind, value)
  return Result.isFailure(ok)
    ? fail(new BrokerError.InvalidArgument({ argument: kind, message: ok.failure.message }))
    : Effect.void
}

/**
 * Checks, once per topic and broker, that the topic's partition count in Redis is this broker's: the first
 * publisher or consumer records it (`HSETNX <prefix>:{topic}:meta partitions N`), every later one compares.
 * Publishers and consumers configured with different counts would hash keys to streams the others never
 * read, and strand messages without a word; here they fail with `InvalidArgument` at their first publish or
 * subscribe instead.
 */
export const checkPartitions = (
  ctx: BrokerContext,
  checked: Set<string>,
  topic: string
): Effect.Effect<void, BrokerError.BrokerError> =>
  checked.has(topic)
    ? Effect.void
    : Effect.gen(function* () {
        const meta = ctx.keys(topic).meta
        yield* ctx.redis
          .send("HSETNX", meta, "partitions", String(ctx.partitions))
          .pipe(Effect.mapError(fromRedis("HSETNX")))
        const stored = Number(
          yield* ctx.redis.send<string | null>("HGET", meta, "partitions").pipe(Effect.mapError(fromRedis("HGET")))
        )
        if (stored !== ctx.partitions) {
          return yield* fail(
            new BrokerError.InvalidArgument({
              argument: "partitions",
              message: `topic ${JSON.stringify(topic)} has ${stored} partition(s) in Redis, and this broker is configured with ${ctx.partitions}: every publisher and consumer of a topic must use the same count`
            })
          )
        }
        checked.add(topic)
      })
