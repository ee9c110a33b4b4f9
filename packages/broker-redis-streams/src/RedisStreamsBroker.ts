/**
 * `RedisStreamsBroker` — the `Broker` on Redis Streams, for production.
 *
 * It requires the abstract `Redis` service of `effect/persistence/Redis`;
 * applications supply `NodeRedis.layer(...)` from `@effect/platform-node`.
 *
 * ## Keys (all of a topic share the hash tag `{topic}`: one Redis Cluster slot)
 *
 * | key | type | what |
 * | --- | --- | --- |
 * | `<prefix>:{<topic>}` | stream | the topic; every group reads it |
 * | `<prefix>:{<topic>}:retry:<group>` | stream | delayed redeliveries of one group |
 * | `<prefix>:{<topic>}:delayed:<group>` | sorted set | nacked messages waiting for their time |
 * | `<prefix>:{<topic>}:dlq` | stream | the dead-letter queue |
 *
 * Entries use the field layout of `Envelope.toFields` (CloudEvents Kafka binary
 * binding: `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_topic`, ...,
 * `data`), so any Redis client can write and read Converge messages.
 *
 * ## How it works
 *
 * - publish: one Lua call per topic and batch that `XADD`s every message
 *   (one round trip; a batch is stored all or none); then the confirmation
 *   (`reply`, or `WAITAOF` for the durable levels).
 * - subscribe: `XGROUP CREATE ... 0 MKSTREAM` (BUSYGROUP ignored) on the topic
 *   and the group's retry stream; a **reserved connection** runs
 *   `XREADGROUP ... BLOCK` (bounded) over both; first this consumer's own
 *   pending history (id `0`), then new entries (`>`); `XAUTOCLAIM` claims
 *   entries idle longer than `claimIdle`, and the ids it reports deleted become
 *   a `LostInBroker` event (never acked silently); `NOGROUP` recreates the
 *   groups from `0` with exponential backoff.
 * - nack with delay: a Lua script acks the entry and adds it, with its attempt
 *   and delivery count, to the group's sorted set; a mover script (run by the
 *   subscriptions) re-adds due entries to the group's retry stream atomically.
 *   Only that group sees the redelivery.
 * - dead-letter: a Lua script acks the entry and appends it, with
 *   `cv_dlq_*` reason fields, to the topic's dead-letter stream.
 *
 * @since 0.1.0
 */
import { Broker, BrokerError, Envelope, Name } from "@converge/core"
import { Clock, Config, Duration, Effect, Exit, Fiber, Layer, Result, Scope, Stream } from "effect"
import * as Redis from "effect/persistence/Redis"
import * as Replies from "./internal/replies.ts"

/**
 * When a publish counts as confirmed (see the README for what each survives).
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
export type Confirmation = "reply" | "waitaof-local" | "waitaof-replicas"

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
  /** Publish confirmation level (default `reply`). */
  readonly confirm?: Confirmation | undefined
  /** Replicas that must confirm with `waitaof-replicas` (default 1). */
  readonly replicas?: number | undefined
  /** How long `WAITAOF` may wait (default 1 second). */
  readonly confirmTimeout?: Duration.Input | undefined
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
}

const prefixPattern = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/

const fail = (reason: BrokerError.BrokerErrorReason) => Effect.fail(BrokerError.make(reason))

/** Maps a `RedisError` to a `BrokerError` (retryable unless the server refused the command). */
const fromRedis =
  (command: string) =>
  (error: Redis.RedisError): BrokerError.BrokerError => {
    const text = String((error.cause as { message?: unknown } | undefined)?.message ?? error.cause)
    const refused = /^(ERR|WRONGTYPE|NOSCRIPT|BUSYGROUP|NOGROUP|NOPERM|NOAUTH|READONLY|OOM|LOADING|MISCONF)\b/.test(
      text
    )
    return BrokerError.make(
      refused
        ? new BrokerError.CommandFailed({ command, message: text, cause: error })
        : new BrokerError.ConnectionLost({ message: `${command}: ${text}`, cause: error })
    )
  }

const isNoGroup = (e: Redis.RedisError | BrokerError.BrokerError): boolean => String(e.cause).includes("NOGROUP")

// ---------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------

/** Ack an entry and park it in the delayed set (atomic). Returns 0 when it was not pending. */
const nackScript = Redis.script(
  (stream: string, delayed: string, group: string, id: string, dueAt: number, member: string) => [
    stream,
    delayed,
    group,
    id,
    dueAt,
    member
  ],
  {
    numberOfKeys: 2,
    lua: `
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1`
  }
).withReturnType<number>()

/** Ack an entry and append it with the reason to the dead-letter stream (atomic). */
const deadLetterScript = Redis.script(
  (stream: string, dlq: string, group: string, id: string, ...fields: Array<string>) => [
    stream,
    dlq,
    group,
    id,
    ...fields
  ],
  {
    numberOfKeys: 2,
    lua: `
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
return 1`
  }
).withReturnType<number>()

/**
 * Append a batch to one stream in one round trip (atomic: all or none).
 * ARGV: for each entry, its field count followed by its fields.
 */
const addBatchScript = Redis.script((stream: string, ...args: Array<string>) => [stream, ...args], {
  numberOfKeys: 1,
  lua: `
local ids = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return ids`
}).withReturnType<ReadonlyArray<string>>()

/**
 * Trim a stream to about `maxLen` entries, never removing an entry that is
 * pending in a group or not yet delivered to one: `XTRIM MINID` at the oldest
 * of (the oldest entry `maxLen` keeps, each group's oldest pending entry, each
 * group's last delivered entry). Returns how many entries were removed.
 */
const trimScript = Redis.script((stream: string, maxLen: number) => [stream, maxLen], {
  numberOfKeys: 1,
  lua: `
local maxLen = tonumber(ARGV[1])
if redis.call('XLEN', KEYS[1]) <= maxLen then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local kept = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', maxLen)
local bound = kept[#kept][1]
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local limit = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    limit = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if older(limit, bound) then bound = limit end
end
return redis.call('XTRIM', KEYS[1], 'MINID', bound)`
}).withReturnType<number>()

/** Move due delayed entries to the group's retry stream (atomic). Returns how many. */
const moveScript = Redis.script(
  (delayed: string, retry: string, now: number, limit: number) => [delayed, retry, now, limit],
  {
    numberOfKeys: 2,
    lua: `
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(member)))
  redis.call('ZREM', KEYS[1], member)
end
return #due`
  }
).withReturnType<number>()

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/** Fields Converge adds to entries it re-adds or dead-letters. */
const internalFields = {
  deliveries: "cv_deliveries",
  origin: "cv_origin",
  dlqReason: "cv_dlq_reason",
  dlqError: "cv_dlq_error",
  dlqGroup: "cv_dlq_group",
  dlqEntry: "cv_dlq_entry",
  dlqAttempts: "cv_dlq_attempts",
  dlqDeliveries: "cv_dlq_deliveries",
  dlqTime: "cv_dlq_time"
} as const

const isInternal = (field: string) => field.startsWith("cv_")

class RedisDelivery implements Broker.Delivery {
  readonly entryId: string
  readonly envelope: Envelope.Encoded
  readonly deliveryCount: number
  readonly topic: string
  readonly group: string
  readonly consumer: string
  readonly stream: string
  readonly fields: Record<string, string>
  readonly impl: Impl
  constructor(
    impl: Impl,
    sub: Broker.SubscribeOptions,
    stream: string,
    entryId: string,
    fields: Record<string, string>,
    envelope: Envelope.Encoded,
    deliveryCount: number
  ) {
    this.impl = impl
    this.topic = sub.topic
    this.group = sub.group
    this.consumer = sub.consumer
    this.stream = stream
    this.entryId = entryId
    this.fields = fields
    this.envelope = envelope
    this.deliveryCount = deliveryCount
  }
  get ack(): Effect.Effect<void, BrokerError.BrokerError> {
    return Effect.flatMap(
      Effect.mapError(this.impl.redis.send<number>("XACK", this.stream, this.group, this.entryId), fromRedis("XACK")),
      (n) =>
        n === 1
          ? Effect.void
          : fail(new BrokerError.DeliveryClosed({ entryId: this.entryId, message: "the entry is no longer pending" }))
    )
  }
  nack(delay: Duration.Input, options?: Broker.NackOptions): Effect.Effect<void, BrokerError.BrokerError> {
    const attempt = options?.attempt ?? this.envelope.attempt
    if (!Number.isInteger(attempt) || attempt < 1) {
      return fail(new BrokerError.InvalidArgument({ argument: "attempt", message: "attempt must be an integer >= 1" }))
    }
    return Effect.flatMap(Clock.currentTimeMillis, (now) => {
      const fields: Record<string, string> = { ...this.fields }
      fields[Envelope.FieldNames.attempt] = String(attempt)
      fields[internalFields.deliveries] = String(this.deliveryCount)
      fields[internalFields.origin] = this.entryId
      const member = JSON.stringify(Object.entries(fields).flat())
      const keys = this.impl.keys(this.topic)
      return Effect.flatMap(
        Effect.mapError(
          this.impl.redis.eval(nackScript)(
            this.stream,
            keys.delayed(this.group),
            this.group,
            this.entryId,
            now + Math.max(0, Duration.toMillis(delay)),
            member
          ),
          fromRedis("nack")
        ),
        (n) =>
          n === 1
            ? Effect.void
            : fail(new BrokerError.DeliveryClosed({ entryId: this.entryId, message: "the entry is no longer pending" }))
      )
    })
  }
  deadLetter(reason: Broker.DeadLetterReason): Effect.Effect<void, BrokerError.BrokerError> {
    return Effect.flatMap(Clock.currentTimeMillis, (now) => {
      const fields: Array<string> = []
      for (const [k, v] of Object.entries(this.fields)) if (!isInternal(k)) fields.push(k, v)
      fields.push(internalFields.dlqReason, reason.reason)
      if (reason.error !== undefined) fields.push(internalFields.dlqError, reason.error)
      fields.push(
        internalFields.dlqGroup,
        this.group,
        internalFields.dlqEntry,
        this.entryId,
        internalFields.dlqAttempts,
        String(reason.attempts ?? this.envelope.attempt),
        internalFields.dlqDeliveries,
        String(this.deliveryCount),
        internalFields.dlqTime,
        new Date(now).toISOString()
      )
      return Effect.flatMap(
        Effect.mapError(
          this.impl.redis.eval(deadLetterScript)(
            this.stream,
            this.impl.keys(this.topic).dlq,
            this.group,
            this.entryId,
            ...fields
          ),
          fromRedis("dead-letter")
        ),
        (n) =>
          n === 1
            ? Effect.void
            : fail(new BrokerError.DeliveryClosed({ entryId: this.entryId, message: "the entry is no longer pending" }))
      )
    })
  }
}

interface Keys {
  readonly stream: string
  readonly dlq: string
  readonly retry: (group: string) => string
  readonly delayed: (group: string) => string
}

interface Impl {
  readonly redis: Redis.Redis["Service"]
  readonly keys: (topic: string) => Keys
}

/**
 * Builds the broker over the `Redis` service in context.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<Broker.Broker["Service"], BrokerError.BrokerError, Redis.Redis | Scope.Scope> =>
  Effect.gen(function* () {
    const redis = yield* Redis.Redis
    const prefix = options?.prefix ?? "converge"
    if (!prefixPattern.test(prefix)) {
      return yield* fail(
        new BrokerError.InvalidArgument({
          argument: "prefix",
          message: `prefix ${JSON.stringify(prefix)} must be 1-100 letters, digits, '.', '_', '-' or ':'`
        })
      )
    }
    const blockMs = Math.max(1, Duration.toMillis(options?.block ?? "2 seconds"))
    const moveEvery = Math.max(1, Duration.toMillis(options?.moveInterval ?? "100 millis"))
    const confirm = options?.confirm ?? "reply"
    const replicas = options?.replicas ?? 1
    const confirmTimeout = Duration.toMillis(options?.confirmTimeout ?? "1 second")
    const maxLen = options?.maxLen
    if (maxLen !== undefined && (!Number.isInteger(maxLen) || maxLen < 1)) {
      return yield* fail(
        new BrokerError.InvalidArgument({ argument: "maxLen", message: "maxLen must be an integer >= 1" })
      )
    }
    const trimEvery = Duration.toMillis(options?.trimInterval ?? "1 second")
    const nextTrimAt = new Map<string, number>()
    /** Trims a topic when due; a failed trim is logged, never a failed publish. */
    const trimIfDue = (topic: string, now: number) => {
      if (maxLen === undefined || now < (nextTrimAt.get(topic) ?? 0)) return Effect.void
      nextTrimAt.set(topic, now + trimEvery)
      return redis
        .eval(trimScript)(keys(topic).stream, maxLen)
        .pipe(
          Effect.catch((e) => Effect.logWarning(`redis-streams: trimming ${topic} failed`, e)),
          Effect.asVoid
        )
    }

    const keys = (topic: string): Keys => {
      const base = `${prefix}:{${topic}}`
      return {
        stream: base,
        dlq: `${base}:dlq`,
        retry: (group) => `${base}:retry:${group}`,
        delayed: (group) => `${base}:delayed:${group}`
      }
    }
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

    // RELIABILITY trap 3: an evicting Redis can drop a stream key with its groups
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

    const validTopics = new Set<string>()
    const checkName = (kind: Name.NameKind, value: string) => {
      const ok = Name.check(kind, value)
      return Result.isFailure(ok)
        ? fail(new BrokerError.InvalidArgument({ argument: kind, message: ok.failure.message }))
        : Effect.void
    }

    const publish = (messages: ReadonlyArray<Envelope.Encoded>) =>
      Effect.gen(function* () {
        for (const m of messages) {
          if (validTopics.has(m.topic)) continue
          yield* checkName("topic", m.topic)
          validTopics.add(m.topic)
        }
        // one atomic script call per topic and batch (one round trip, all or none), topics in parallel
        const byTopic = new Map<string, Array<number>>()
        for (let i = 0; i < messages.length; i++) {
          const at = byTopic.get(messages[i]!.topic)
          if (at === undefined) byTopic.set(messages[i]!.topic, [i])
          else at.push(i)
        }
        const ids: Array<string> = new Array(messages.length)
        yield* Effect.forEach(
          byTopic,
          ([topic, indexes]) => {
            const args: Array<string> = []
            for (const i of indexes) {
              const fields = Envelope.toFields(messages[i]!)
              const start = args.length
              args.push("")
              for (const name in fields) args.push(name, fields[name]!)
              args[start] = String(args.length - start - 1)
            }
            return redis
              .eval(addBatchScript)(keys(topic).stream, ...args)
              .pipe(
                Effect.tap(() => Effect.flatMap(Clock.currentTimeMillis, (now) => trimIfDue(topic, now))),
                Effect.mapError(fromRedis("XADD")),
                Effect.map((added) => {
                  for (let k = 0; k < indexes.length; k++) ids[indexes[k]!] = String(added[k])
                  return added.length
                })
              )
          },
          { concurrency: "unbounded", discard: true }
        )
        if (confirm !== "reply") {
          const reply = yield* redis
            .send<ReadonlyArray<number>>(
              "WAITAOF",
              "1",
              confirm === "waitaof-replicas" ? String(replicas) : "0",
              String(confirmTimeout)
            )
            .pipe(Effect.mapError(fromRedis("WAITAOF")))
          const [local, remote] = [Number(reply[0]), Number(reply[1])]
          if (local < 1 || (confirm === "waitaof-replicas" && remote < replicas)) {
            return yield* fail(
              new BrokerError.NotConfirmed({
                message: `WAITAOF confirmed local=${local} replicas=${remote}, wanted local=1${confirm === "waitaof-replicas" ? ` replicas=${replicas}` : ""}`
              })
            )
          }
        }
        return ids
      })

    const createGroup = (stream: string, group: string) =>
      redis.send("XGROUP", "CREATE", stream, group, "0", "MKSTREAM").pipe(
        Effect.catchIf(
          (e) => String(e.cause).includes("BUSYGROUP"),
          () => Effect.void
        ),
        Effect.mapError(fromRedis("XGROUP CREATE")),
        Effect.asVoid
      )

    const subscribe = (sub: Broker.SubscribeOptions): Stream.Stream<Broker.Delivery, BrokerError.BrokerError> =>
      Stream.unwrap(
        Effect.gen(function* () {
          yield* checkName("topic", sub.topic)
          yield* checkName("group", sub.group)
          yield* checkName("consumer", sub.consumer)
          const k = keys(sub.topic)
          const retry = k.retry(sub.group)
          const delayed = k.delayed(sub.group)
          const count = String(Math.max(1, Math.floor(sub.batchSize ?? 100)))
          const claimIdle = Math.max(1, Duration.toMillis(sub.claimIdle ?? "30 seconds"))
          const onEvent = sub.onEvent ?? Broker.logEvent
          const ensureGroups = Effect.andThen(createGroup(k.stream, sub.group), createGroup(retry, sub.group))
          yield* ensureGroups

          let history = true
          const historyFrom = new Map<string, string>()
          const resetHistory = () => {
            history = true
            historyFrom.set(k.stream, "0")
            historyFrom.set(retry, "0")
          }
          resetHistory()
          let nextMoveAt = 0
          let nextClaimAt = 0
          let recreations = 0

          /** Delivery counts of entries read from history or claimed (one XPENDING per stream). */
          const countsOf = (stream: string, entries: ReadonlyArray<Replies.StreamEntry>) =>
            entries.length === 0
              ? Effect.succeed(new Map<string, number>())
              : redis
                  .send<unknown>(
                    "XPENDING",
                    stream,
                    sub.group,
                    entries[0]!.id,
                    entries[entries.length - 1]!.id,
                    String(entries.length),
                    sub.consumer
                  )
                  .pipe(Effect.map(Replies.pendingCountsOf), Effect.mapError(fromRedis("XPENDING")))

          /** Turns entries into deliveries; malformed ones are dead-lettered, deleted ones reported. */
          const toDeliveries = (
            stream: string,
            entries: ReadonlyArray<Replies.StreamEntry>,
            counts: Map<string, number> | undefined
          ) =>
            Effect.gen(function* () {
              const out: Array<Broker.Delivery> = []
              const lost: Array<string> = []
              for (const entry of entries) {
                if (entry.fields === undefined) {
                  lost.push(entry.id)
                  continue
                }
                const base = Number(entry.fields[internalFields.deliveries] ?? 0)
                const count = base + (counts?.get(entry.id) ?? 1)
                const read = Envelope.fromFields(entry.fields)
                if (Result.isFailure(read)) {
                  const malformed = new RedisDelivery(impl, sub, stream, entry.id, entry.fields, placeholder, count)
                  yield* malformed.deadLetter({ reason: "malformed", error: read.failure.message, attempts: 0 })
                  yield* onEvent({
                    _tag: "Malformed",
                    topic: sub.topic,
                    entryId: entry.id,
                    reason: read.failure.message
                  })
                  continue
                }
                out.push(new RedisDelivery(impl, sub, stream, entry.id, entry.fields, read.success, count))
              }
              if (lost.length > 0) {
                // deleted while pending (a trim): report them, then drop them from the PEL
                yield* onEvent({ _tag: "LostInBroker", topic: sub.topic, group: sub.group, entryIds: lost })
                yield* redis.send("XACK", stream, sub.group, ...lost).pipe(Effect.mapError(fromRedis("XACK")))
              }
              return out
            })

          const readOnce = (conn: Redis.Connection) =>
            Effect.gen(function* () {
              const now = yield* Clock.currentTimeMillis
              const out: Array<Broker.Delivery> = []
              if (now >= nextMoveAt) {
                nextMoveAt = now + moveEvery
                yield* redis
                  .eval(moveScript)(delayed, retry, now, 1000)
                  .pipe(Effect.mapError(fromRedis("move delayed")))
              }
              if (now >= nextClaimAt) {
                nextClaimAt = now + Math.max(50, Math.floor(claimIdle / 2))
                for (const stream of [k.stream, retry]) {
                  const reply = Replies.autoclaimOf(
                    yield* redis
                      .send<unknown>(
                        "XAUTOCLAIM",
                        stream,
                        sub.group,
                        sub.consumer,
                        String(claimIdle),
                        "0-0",
                        "COUNT",
                        count
                      )
                      .pipe(Effect.mapError(fromRedis("XAUTOCLAIM")))
                  )
                  if (reply.deleted.length > 0) {
                    yield* onEvent({
                      _tag: "LostInBroker",
                      topic: sub.topic,
                      group: sub.group,
                      entryIds: reply.deleted
                    })
                  }
                  const counts = yield* countsOf(stream, reply.claimed)
                  out.push(...(yield* toDeliveries(stream, reply.claimed, counts)))
                }
                if (out.length > 0) return out
              }
              // own pending history first (from where the last history read stopped), then new entries
              const ids = history ? [historyFrom.get(k.stream)!, historyFrom.get(retry)!] : [">", ">"]
              const args = ["GROUP", sub.group, sub.consumer, "COUNT", count]
              if (!history) args.push("BLOCK", String(Math.min(blockMs, Math.max(1, nextMoveAt - now))))
              const reply = Replies.streamsOf(
                yield* conn
                  .send<unknown>("XREADGROUP", ...args, "STREAMS", k.stream, retry, ...ids)
                  .pipe(Effect.mapError(fromRedis("XREADGROUP")))
              )
              let read = 0
              for (const [stream, entries] of reply) {
                read += entries.length
                if (history && entries.length > 0) historyFrom.set(stream, entries[entries.length - 1]!.id)
                const counts = history ? yield* countsOf(stream, entries) : undefined
                out.push(...(yield* toDeliveries(stream, entries, counts)))
              }
              if (history && read === 0) history = false
              return out
            })

          const backoff = () =>
            Duration.toMillis(
              Duration.min(Duration.times(Duration.millis(100), 2 ** Math.min(recreations, 6)), Duration.seconds(5))
            )

          // The reserved connection lives in a scope of its own: when it fails (a restart, a
          // dropped socket) that scope is closed and a fresh connection reserved, with backoff.
          let connScope: Scope.Closeable | undefined
          let conn: Redis.Connection | undefined
          const dropConnection = Effect.suspend(() => {
            const scope = connScope
            connScope = undefined
            conn = undefined
            return scope === undefined ? Effect.void : Scope.close(scope, Exit.void)
          })
          sessions.add(dropConnection)
          yield* Effect.addFinalizer(() =>
            Effect.suspend(() => {
              sessions.delete(dropConnection)
              return dropConnection
            })
          )

          type Batch = readonly [Broker.Delivery, ...Array<Broker.Delivery>]
          /** Reads until there is a non-empty batch (or a permanent failure). */
          const fetch: Effect.Effect<Batch, BrokerError.BrokerError> = Effect.gen(function* () {
            while (true) {
              if (closed)
                return yield* fail(new BrokerError.BrokerClosed({ message: "the broker layer was shut down" }))
              if (conn === undefined) {
                const scope = yield* Scope.make()
                connScope = scope
                const reserved = yield* Effect.result(
                  redis.reserve.pipe(Scope.provide(scope), Effect.mapError(fromRedis("reserve")))
                )
                if (Result.isFailure(reserved)) {
                  yield* dropConnection
                  yield* Effect.logWarning(`redis-streams: ${reserved.failure.message}; retrying`)
                  yield* Effect.sleep(backoff())
                  recreations++
                  continue
                }
                conn = reserved.success
              }
              const result = yield* Effect.result(readOnce(conn))
              if (Result.isSuccess(result)) {
                recreations = 0
                if (result.success.length > 0) {
                  return result.success as unknown as readonly [Broker.Delivery, ...Array<Broker.Delivery>]
                }
                continue
              }
              const error = result.failure
              if (isNoGroup(error)) {
                // RELIABILITY trap 3: the key (and its groups) vanished: recreate from 0, with backoff
                yield* Effect.sleep(backoff())
                recreations++
                yield* ensureGroups
                resetHistory()
                yield* onEvent({ _tag: "GroupRecreated", topic: sub.topic, group: sub.group })
                continue
              }
              if (!error.isRetryable) return yield* Effect.fail(error)
              // the connection dropped: a fresh reserved connection, with backoff
              yield* Effect.logWarning(`redis-streams: ${error.message}; reconnecting`)
              yield* dropConnection
              yield* Effect.sleep(backoff())
              recreations++
            }
          })
          // Read one batch ahead: while the consumer handles and acks a batch, the next
          // XREADGROUP is already on the wire (prefetched entries that are never handled stay
          // pending, and are redelivered like any unacked entry).
          const streamScope = yield* Effect.scope
          let ahead: Fiber.Fiber<Batch, BrokerError.BrokerError> | undefined
          const pull: Effect.Effect<Batch, BrokerError.BrokerError> = Effect.gen(function* () {
            const current = ahead === undefined ? yield* fetch : yield* Fiber.join(ahead)
            ahead = yield* Effect.forkIn(fetch, streamScope)
            return current
          })
          return Stream.fromPull(Effect.succeed(pull))
        })
      )

    const ackAll = (deliveries: ReadonlyArray<Broker.Delivery>) =>
      Effect.gen(function* () {
        const byStream = new Map<string, { group: string; ids: Array<string> }>()
        for (const d of deliveries) {
          if (!(d instanceof RedisDelivery) || d.impl !== impl) {
            return yield* fail(
              new BrokerError.InvalidArgument({ argument: "deliveries", message: "a delivery of another broker" })
            )
          }
          const key = `${d.group}\u0000${d.stream}`
          const entry = byStream.get(key)
          if (entry === undefined) byStream.set(key, { group: d.group, ids: [d.entryId] })
          else entry.ids.push(d.entryId)
        }
        let acked = 0
        for (const [key, { group, ids }] of byStream) {
          const stream = key.slice(key.indexOf("\u0000") + 1)
          acked += yield* redis.send<number>("XACK", stream, group, ...ids).pipe(Effect.mapError(fromRedis("XACK")))
        }
        return acked
      })

    const deadLetters = (topic: string, opts?: { readonly limit?: number | undefined }) =>
      Effect.gen(function* () {
        yield* checkName("topic", topic)
        const args = opts?.limit === undefined ? [] : ["COUNT", String(opts.limit)]
        const entries = Replies.entriesOf(
          yield* redis
            .send<unknown>("XRANGE", keys(topic).dlq, "-", "+", ...args)
            .pipe(Effect.mapError(fromRedis("XRANGE")))
        )
        return entries.map((entry): Broker.DeadLetter => {
          const all = entry.fields ?? {}
          const fields: Record<string, string> = {}
          for (const [k, v] of Object.entries(all)) if (!isInternal(k)) fields[k] = v
          const read = Envelope.fromFields(fields)
          return {
            id: entry.id,
            topic,
            group: all[internalFields.dlqGroup] ?? "",
            originalEntryId: all[internalFields.dlqEntry] ?? "",
            reason: all[internalFields.dlqReason] ?? "unknown",
            error: all[internalFields.dlqError],
            attempts: Number(all[internalFields.dlqAttempts] ?? 0),
            deliveryCount: Number(all[internalFields.dlqDeliveries] ?? 0),
            time: all[internalFields.dlqTime] ?? "",
            fields,
            envelope: Result.isSuccess(read) ? read.success : undefined
          }
        })
      })

    const purgeDeadLetters = (topic: string, ids?: ReadonlyArray<string>) =>
      Effect.gen(function* () {
        yield* checkName("topic", topic)
        const dlq = keys(topic).dlq
        if (ids !== undefined) {
          if (ids.length === 0) return 0
          return yield* redis.send<number>("XDEL", dlq, ...ids).pipe(Effect.mapError(fromRedis("XDEL")))
        }
        const n = yield* redis.send<number>("XLEN", dlq).pipe(Effect.mapError(fromRedis("XLEN")))
        yield* redis.send("DEL", dlq).pipe(Effect.mapError(fromRedis("DEL")))
        return Number(n)
      })

    return Broker.Broker.of({ publish, subscribe, ackAll, deadLetters, purgeDeadLetters })
  })

const placeholder: Envelope.Encoded = {
  id: "malformed",
  topic: "malformed",
  type: "malformed",
  source: "malformed",
  key: undefined,
  time: "1970-01-01T00:00:00.000Z",
  attempt: 1,
  headers: {},
  data: "null"
}

/**
 * The Redis Streams broker as a Layer (requires `Redis` from
 * `effect/persistence/Redis`, e.g. `NodeRedis.layer({ url })`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Broker.Broker, BrokerError.BrokerError, Redis.Redis> =>
  Layer.effect(Broker.Broker, make(options))

/**
 * The layer with its options from configuration: `CONVERGE_REDIS_PREFIX`,
 * `CONVERGE_REDIS_CONFIRM` (`reply` | `waitaof-local` | `waitaof-replicas`).
 *
 * @since 0.1.0
 */
export const layerConfig: Layer.Layer<Broker.Broker, BrokerError.BrokerError | Config.ConfigError, Redis.Redis> =
  Layer.unwrap(
    Effect.gen(function* () {
      const prefix = yield* Config.String("CONVERGE_REDIS_PREFIX").pipe(Config.withDefault("converge"))
      const confirm = yield* Config.Literals(
        ["reply", "waitaof-local", "waitaof-replicas"],
        "CONVERGE_REDIS_CONFIRM"
      ).pipe(Config.withDefault("reply" as const))
      return layer({ prefix, confirm })
    })
  )
