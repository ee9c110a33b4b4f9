/**
 * What the parts of one Redis Streams broker share: the client, the key
 * layout and the resolved options. Built once by `RedisStreamsBroker.make`
 * and passed down, so no module reaches back up for state.
 *
 * @internal
 */
import { Broker, BrokerError } from "@converge/core"
import { Effect } from "effect"
import type * as Redis from "effect/persistence/Redis"
import type { Impl } from "./delivery.ts"
import { fail, fromRedis } from "./errors.ts"
import { type HashTag, type Keys, make as makeKeys } from "./keys.ts"

/** How a publish counts as stored: see `RedisStreamsBroker.Durability`. */
export type Durability = "reply" | "waitaof-local" | "waitaof-replicas"

/** The shared state and settings of one broker instance. */
export interface BrokerContext {
  readonly redis: Redis.Redis["Service"]
  readonly impl: Impl
  /** The key prefix (`<prefix>:{<topic>}...`). */
  readonly prefix: string
  /** Where a partitioned topic's keys hash (see `Keys.HashTag`). */
  readonly hashTag: HashTag
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
  /**
   * The layout published entries are written in: compact (`ce` + `data`, whose two values alone go to the
   * publish script) or, when false, one field per attribute (`Envelope.toFields`).
   */
  readonly compact: boolean
  /** True once the layer shut down. */
  readonly isClosed: () => boolean
  /**
   * The server is a Redis Cluster node (`INFO cluster`: `cluster_enabled:1`): a subscription reads each
   * partition with a command of its own, since one command may only touch keys of one slot.
   */
  readonly cluster: boolean
  /** Topics whose partition count was checked against Redis. */
  readonly partitionsChecked: Set<string>
}

/** Fails with `InvalidArgument` when `value` is not a valid name of `kind` (`Broker.checkName`). */
export const checkName: typeof Broker.checkName = Broker.checkName

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
        if (stored === ctx.partitions && ctx.partitions > 1 && ctx.hashTag === "partition") {
          // a partitioned topic written by an earlier version: its streams are under `{topic}:p<i>`, which this
          // layout would never read
          const earlier = Number(
            yield* ctx.redis
              .send<number>("EXISTS", ctx.keys(topic).topicTagStream0)
              .pipe(Effect.mapError(fromRedis("EXISTS")))
          )
          if (earlier > 0) {
            return yield* fail(
              new BrokerError.InvalidArgument({
                argument: "hashTag",
                message: `topic ${JSON.stringify(topic)} has partition streams under the earlier key layout (one hash tag per topic, ${ctx.keys(topic).topicTagStream0}); keep reading them with hashTag: "topic" (CONVERGE_REDIS_HASH_TAG=topic), or drain the topic with that setting before switching to hashTag: "partition"`
              })
            )
          }
        }
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

/**
 * A topic's keys for the partition count it recorded in Redis (this broker's when none is recorded yet): what
 * the operator views and the dead-letter queue read, so a tool needs no partition setting of its own.
 */
export const keysOf = (ctx: BrokerContext, topic: string) =>
  ctx.redis.send<string | null>("HGET", ctx.keys(topic).meta, "partitions").pipe(
    Effect.mapError(fromRedis("HGET")),
    Effect.map((stored) => {
      const n = stored === null ? ctx.partitions : Number(stored)
      const partitions = Number.isInteger(n) && n >= 1 ? n : ctx.partitions
      return { ...makeKeys(ctx.prefix, partitions, ctx.hashTag)(topic), partitions }
    })
  )
