/**
 * `RedisStreamsBroker` — the `Broker` on Redis Streams, for production.
 *
 * It requires the abstract `Redis` service of `effect/persistence/Redis`;
 * applications supply `NodeRedis.layer(...)` from `@effect/platform-node`.
 *
 * ## Keys
 *
 * The stream `<prefix>:{<topic>}` (one partition) or `<prefix>:{<topic>:p<i>}`
 * (partition `i` of several: each partition under a hash tag of its own, so
 * the partitions spread over a Redis Cluster's slots), each group's retry
 * stream and delayed set, the dead-letter stream `:dlq` (one per partition),
 * the topic's `:meta` (its partition count) and, in ordered mode, partition
 * leases and the group's member set: see `internal/keys.ts` and the repository's
 * docs/brokers.md. Entries are written in the compact layout by default
 * (`Envelope.toCompactFields`: `ce`, the CloudEvents attributes as one JSON
 * field, and `data`), or with `layout: "fields"` one field per attribute
 * (`Envelope.toFields`, the CloudEvents Kafka binary binding: `ce_id`,
 * `ce_type`, ..., `data`); subscriptions read both, so any Redis client can
 * write and read Converge messages.
 *
 * ## How it works
 *
 * - publish: one Lua call per partition stream and batch (one round trip)
 *   with an outcome per message (`publishEach`: a refused entry fails alone,
 *   a server error stops the rest of its partition's batch); then the
 *   durability wait (`reply`, or `WAITAOF`, checked to be possible when the
 *   layer is built).
 * - subscribe: groups created from `0` (`MKSTREAM`); a **reserved connection**
 *   runs `XREADGROUP ... BLOCK` (bounded): first this consumer's own pending
 *   history, then new entries, one read kept ahead; other consumers' entries
 *   idle longer than `claimIdle` are claimed (never its own), deleted ones
 *   reported as `LostInBroker`; `NOGROUP` recreates the groups with backoff;
 *   on close the unsettled entries are released for others to claim at once.
 * - ordered mode: partition leases taken and renewed on their own schedule;
 *   every settlement fenced by the lease token; per-key parking per lease.
 * - nack with delay: a Lua script acks the entry and adds it, with its attempt
 *   and delivery count, to the group's sorted set; a mover script (run by the
 *   subscriptions) re-adds due entries to the group's retry stream, and
 *   dead-letters one it cannot move. Only that group sees the redelivery.
 * - dead-letter: a Lua script acks the entry and appends it, with
 *   `cv_dlq_*` reason fields, to the topic's dead-letter stream.
 *
 * The module is split by concern under `internal/`: `keys` (the layout),
 * `scripts` (Lua), `delivery` (settlement), `publish` (batches, durability,
 * trim), `subscription` (the read loop), `parking` and `leases` (ordered
 * mode), `deadLetterQueue`.
 *
 * @since 0.1.0
 */
import { Broker, BrokerError } from "@converge/core"
import { Config, Duration, Effect, Layer, type Scope } from "effect"
import * as Redis from "effect/persistence/Redis"
import type { BrokerContext } from "./internal/context.ts"
import * as DeadLetterQueue from "./internal/deadLetterQueue.ts"
import { ackAll, type Impl } from "./internal/delivery.ts"
import { fail } from "./internal/errors.ts"
import * as GroupStats from "./internal/groupStats.ts"
import * as Keys from "./internal/keys.ts"
import * as Publish from "./internal/publish.ts"
import * as Replies from "./internal/replies.ts"
import { subscribe } from "./internal/subscription.ts"

/**
 * When a publish counts as stored (see the README for what each level survives).
 *
 * - `reply`: Redis answered; lost on a crash before the next fsync (about a
 *   second with `appendfsync everysec`) or on a failover.
 * - `waitaof-local`: `WAITAOF 1 0`: written to the local AOF and fsynced;
 *   survives a process or machine crash, not the loss of the disk.
 * - `waitaof-replicas`: `WAITAOF 1 N`: also fsynced by `N` replicas; survives
 *   a failover. Needs Redis >= 7.2.
 *
 * @since 0.1.0
 */
export type Durability = "reply" | "waitaof-local" | "waitaof-replicas"

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Prefix of every key (default `converge`). Letters, digits, `.`, `_`, `-`, `:`. */
  readonly prefix?: string | undefined
  /** Longest `BLOCK` of an `XREADGROUP` (default 2 seconds). */
  readonly block?: Duration.Input | undefined
  /** When a publish counts as stored (default `reply`); see {@link Durability}. */
  readonly durability?: Durability | undefined
  /** Replicas that must confirm with `waitaof-replicas` (default 1). */
  readonly replicas?: number | undefined
  /** How long `WAITAOF` may wait (default 1 second). */
  readonly durabilityTimeout?: Duration.Input | undefined
  /** How often subscriptions move due delayed redeliveries (default 100 ms). */
  readonly moveInterval?: Duration.Input | undefined
  /**
   * Keep about this many entries per topic stream (default: no trimming).
   * Trimming never removes an entry still pending in a group, nor one not yet
   * delivered to a group (`XTRIM MINID` at the oldest such entry), so a slow
   * group keeps the stream longer. It runs at most every `trimInterval`.
   */
  readonly maxLen?: number | undefined
  /** How often a topic is trimmed while publishing (default 1 second). */
  readonly trimInterval?: Duration.Input | undefined
  /**
   * Split every topic into this many partition streams by a hash of the
   * message key (default 1). Publishers and consumers of a topic must agree.
   */
  readonly partitions?: number | undefined
  /**
   * Per-key order (default false): each partition is consumed by one consumer
   * of a group at a time (a lease, renewed while the consumer lives), and a
   * key whose message is in flight or backing off is parked: its later
   * messages wait. Partitions are shared fairly among the group's live
   * consumers.
   */
  readonly orderedPerKey?: boolean | undefined
  /** How long a partition lease lasts without renewal (default 5 seconds). */
  readonly leaseTime?: Duration.Input | undefined
  /**
   * The field layout of the entries this broker publishes (default `compact`): `compact` writes two fields,
   * `ce` (the CloudEvents attributes as JSON) and `data` (`Envelope.toCompactFields`); `fields` writes one
   * field per attribute (`ce_id`, `ce_type`, ..., `data`: the CloudEvents Kafka binary binding,
   * `Envelope.toFields`), for consumers that read attributes as fields. Subscriptions read both, whatever
   * this option says.
   */
  readonly layout?: Layout | undefined
  /**
   * Where a topic's keys hash in a Redis Cluster (default `partition`): each partition of a topic under a
   * hash tag of its own (`{<topic>:p<i>}`), so partitions spread over the cluster's nodes; `topic` keeps
   * every key of a topic under `{<topic>}`, the layout of earlier versions. A layer with the default refuses
   * (at the first publish or subscribe, naming this option) a partitioned topic whose streams were written
   * under the earlier layout. One partition is the same either way.
   */
  readonly hashTag?: Keys.HashTag | undefined
}

/**
 * The entry layout a broker publishes: see {@link Options.layout}.
 *
 * @since 0.1.0
 */
export type Layout = "compact" | "fields"

/**
 * Refuses, at construction, a durability level the server cannot meet, instead of failing (or, before,
 * republishing) on every publish: `WAITAOF` needs Redis >= 7.2, `waitaof-local` an AOF
 * (`appendonly yes`), `waitaof-replicas` at least `replicas` connected replicas (checked now; fewer later
 * makes a publish fail `NotConfirmed`, retryable).
 */
const checkDurability = (redis: Redis.Redis["Service"], durability: Durability, replicas: number) =>
  Effect.gen(function* () {
    const refuse = (message: string) =>
      fail(new BrokerError.InvalidArgument({ argument: "durability", message: `durability ${durability}: ${message}` }))
    const probe = yield* Effect.result(redis.send<unknown>("WAITAOF", "0", "0", "0"))
    if (probe._tag === "Failure") {
      const info = yield* redis.send<string>("INFO", "server").pipe(Effect.orElseSucceed(() => ""))
      const version = /redis_version:([\d.]+)/.exec(String(info))?.[1] ?? "unknown"
      return yield* refuse(`this server (Redis ${version}) has no WAITAOF, which needs Redis >= 7.2; use "reply"`)
    }
    const aof = yield* Effect.result(redis.send<unknown>("CONFIG", "GET", "appendonly"))
    if (aof._tag === "Success" && Replies.configOf(aof.success).appendonly === "no") {
      return yield* refuse("this server runs without an AOF (appendonly no), so nothing is ever fsynced to one")
    }
    if (durability === "waitaof-replicas") {
      const info = yield* redis.send<string>("INFO", "replication").pipe(Effect.orElseSucceed(() => ""))
      const connected = Number(/connected_slaves:(\d+)/.exec(String(info))?.[1] ?? 0)
      if (connected < replicas) {
        return yield* refuse(`${replicas} replica(s) must confirm, and ${connected} are connected`)
      }
    }
  })

/**
 * Builds the broker over the `Redis` service in context. Invalid options
 * fail with `InvalidArgument` naming the option.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<Broker.Broker["Service"], BrokerError.BrokerError, Redis.Redis | Scope.Scope> =>
  Effect.gen(function* () {
    const redis = yield* Redis.Redis
    const prefix = options?.prefix ?? "converge"
    if (!Keys.prefixPattern.test(prefix)) {
      return yield* fail(
        new BrokerError.InvalidArgument({
          argument: "prefix",
          message: `prefix ${JSON.stringify(prefix)} must be 1-100 letters, digits, '.', '_', '-' or ':'`
        })
      )
    }
    const partitions = yield* Broker.checkInteger("partitions", options?.partitions ?? 1, 1, 1024)
    const replicas = yield* Broker.checkInteger("replicas", options?.replicas ?? 1, 1, 64)
    const maxLen = options?.maxLen
    if (maxLen !== undefined) yield* Broker.checkInteger("maxLen", maxLen, 1, Number.MAX_SAFE_INTEGER)
    const hashTag = options?.hashTag ?? "partition"
    const keys = Keys.make(prefix, partitions, hashTag)
    const impl: Impl = { redis, keys }
    // On shutdown, release every subscription's reserved connection: the Redis pool waits for its
    // reservations, so a subscription that outlives the layer must not keep one.
    let closed = false
    const sessions = new Set<Effect.Effect<void>>()
    yield* Effect.addFinalizer(() =>
      Effect.suspend(() => {
        closed = true
        return Effect.forEach(sessions, (drop) => drop, { discard: true })
      })
    )
    // on a Redis Cluster one command may only touch keys of one slot: partitions are read one command each
    const cluster = yield* redis.send<string>("INFO", "cluster").pipe(
      Effect.map((info) => /cluster_enabled:1/.test(String(info))),
      Effect.orElseSucceed(() => false)
    )
    const ctx: BrokerContext = {
      redis,
      impl,
      prefix,
      hashTag,
      keys,
      partitions,
      ordered: options?.orderedPerKey ?? false,
      leaseMs: Math.max(100, Duration.toMillis(options?.leaseTime ?? "5 seconds")),
      blockMs: Math.max(1, Duration.toMillis(options?.block ?? "2 seconds")),
      moveEvery: Math.max(1, Duration.toMillis(options?.moveInterval ?? "100 millis")),
      durability: options?.durability ?? "reply",
      replicas,
      durabilityTimeoutMs: Duration.toMillis(options?.durabilityTimeout ?? "1 second"),
      maxLen,
      trimEvery: Duration.toMillis(options?.trimInterval ?? "1 second"),
      sessions,
      compact: options?.layout !== "fields",
      isClosed: () => closed,
      cluster,
      partitionsChecked: new Set()
    }

    if (ctx.durability !== "reply") yield* checkDurability(redis, ctx.durability, replicas)

    // docs/reliability.md, trap 3: an evicting Redis can drop a stream key with its groups
    yield* redis.send<unknown>("CONFIG", "GET", "maxmemory-policy").pipe(
      Effect.flatMap((reply) => {
        const policy = Replies.configOf(reply)["maxmemory-policy"]
        return policy !== undefined && policy !== "noeviction"
          ? Effect.logWarning(
              `redis maxmemory-policy is ${policy}: under memory pressure Redis may evict stream keys and lose messages and consumer groups; set it to noeviction`
            )
          : Effect.void
      }),
      Effect.catch((e) => Effect.logDebug("could not read maxmemory-policy (CONFIG may be disabled)", e))
    )

    const { publish, publishEach } = Publish.make(ctx)
    return Broker.Broker.of({
      publish,
      publishEach,
      subscribe: (sub) => subscribe(ctx, sub),
      ackAll: ackAll(impl),
      deadLetters: DeadLetterQueue.list(ctx),
      purgeDeadLetters: DeadLetterQueue.purge(ctx),
      groupStats: GroupStats.make(ctx),
      topics: GroupStats.topics(ctx)
    })
  })

/**
 * The Redis Streams broker as a Layer (requires `Redis` from
 * `effect/persistence/Redis`, e.g. `NodeRedis.layer({ url })`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Broker.Broker, BrokerError.BrokerError, Redis.Redis> =>
  Layer.effect(Broker.Broker, make(options))

/**
 * The layer with its options from configuration: `CONVERGE_REDIS_PREFIX`
 * (default `converge`), `CONVERGE_REDIS_DURABILITY` (`reply` |
 * `waitaof-local` | `waitaof-replicas`, default `reply`),
 * `CONVERGE_REDIS_PARTITIONS` (default 1), `CONVERGE_REDIS_ORDERED`
 * (`true` | `false`, default `false`) and `CONVERGE_REDIS_LAYOUT`
 * (`compact` | `fields`, default `compact`) and `CONVERGE_REDIS_HASH_TAG`
 * (`partition` | `topic`, default `partition`). A bad value is a `ConfigError` naming
 * the variable.
 *
 * @since 0.1.0
 */
export const layerConfig: Layer.Layer<Broker.Broker, BrokerError.BrokerError | Config.ConfigError, Redis.Redis> =
  Layer.unwrap(
    Effect.gen(function* () {
      const prefix = yield* Config.String("CONVERGE_REDIS_PREFIX").pipe(Config.withDefault("converge"))
      const durability = yield* Config.Literals(
        ["reply", "waitaof-local", "waitaof-replicas"],
        "CONVERGE_REDIS_DURABILITY"
      ).pipe(Config.withDefault("reply" as const))
      const partitions = yield* Config.Int("CONVERGE_REDIS_PARTITIONS").pipe(Config.withDefault(1))
      const orderedPerKey = yield* Config.Boolean("CONVERGE_REDIS_ORDERED").pipe(Config.withDefault(false))
      const layout = yield* Config.Literals(["compact", "fields"], "CONVERGE_REDIS_LAYOUT").pipe(
        Config.withDefault("compact" as const)
      )
      const hashTag = yield* Config.Literals(["partition", "topic"], "CONVERGE_REDIS_HASH_TAG").pipe(
        Config.withDefault("partition" as const)
      )
      return layer({ prefix, durability, partitions, orderedPerKey, layout, hashTag })
    })
  )
