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
  readonly part: Part
  readonly fromRetry: boolean
  /** Told about a settlement (per-key parking of ordered subscriptions). */
  onSettled: ((delivery: RedisDelivery, outcome: "done" | "delayed") => void) | undefined
  constructor(
    impl: Impl,
    sub: Broker.SubscribeOptions,
    part: Part,
    stream: string,
    entryId: string,
    fields: Record<string, string>,
    envelope: Envelope.Encoded,
    deliveryCount: number
  ) {
    this.impl = impl
    this.part = part
    this.fromRetry = stream === part.retry
    this.onSettled = undefined
    this.topic = sub.topic
    this.group = sub.group
    this.consumer = sub.consumer
    this.stream = stream
    this.entryId = entryId
    this.fields = fields
    this.envelope = envelope
    this.deliveryCount = deliveryCount
  }
  /** Reports the settlement, once the broker confirmed it. */
  settled(outcome: "done" | "delayed"): void {
    this.onSettled?.(this, outcome)
  }
  /** A settling command's reply: 1 settles the delivery; 0 means the entry was no longer pending. */
  confirm(n: number, outcome: "done" | "delayed"): Effect.Effect<void, BrokerError.BrokerError> {
    if (n !== 1) {
      return fail(new BrokerError.DeliveryClosed({ entryId: this.entryId, message: "the entry is no longer pending" }))
    }
    this.settled(outcome)
    return Effect.void
  }
  get ack(): Effect.Effect<void, BrokerError.BrokerError> {
    return Effect.flatMap(
      Effect.mapError(this.impl.redis.send<number>("XACK", this.stream, this.group, this.entryId), fromRedis("XACK")),
      (n) => this.confirm(n, "done")
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
      return Effect.flatMap(
        Effect.mapError(
          this.impl.redis.eval(nackScript)(
            this.stream,
            this.part.delayed,
            this.group,
            this.entryId,
            now + Math.max(0, Duration.toMillis(delay)),
            member
          ),
          fromRedis("nack")
        ),
        (n) => this.confirm(n, "delayed")
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
        (n) => this.confirm(n, "done")
      )
    })
  }
}

interface Keys {
  readonly dlq: string
  readonly partition: (group: string, index: number) => Part
  readonly members: (group: string) => string
}

/** The keys of one partition of a topic, for one group. */
interface Part {
  readonly index: number
  readonly stream: string
  readonly retry: string
  readonly delayed: string
  readonly lease: string
}

/** FNV-1a, 32 bits: a stable hash of the ordering key. */
const fnv1a = (text: string): number => {
  let h = 0x811c9dc5
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  return h >>> 0
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
    const partitions = options?.partitions ?? 1
    if (!Number.isInteger(partitions) || partitions < 1 || partitions > 1024) {
      return yield* fail(
        new BrokerError.InvalidArgument({
          argument: "partitions",
          message: "partitions must be an integer from 1 to 1024"
        })
      )
    }
    const ordered = options?.orderedPerKey ?? false
    const leaseMs = Math.max(100, Duration.toMillis(options?.leaseTime ?? "5 seconds"))
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
      return Effect.forEach(partitionStreams(topic), (stream) => redis.eval(trimScript)(stream, maxLen), {
        discard: true
      }).pipe(Effect.catch((e) => Effect.logWarning(`redis-streams: trimming ${topic} failed`, e)))
    }

    const keys = (topic: string): Keys => {
      const base = `${prefix}:{${topic}}`
      const one = partitions === 1
      return {
        dlq: `${base}:dlq`,
        members: (group) => `${base}:members:${group}`,
        // one partition keeps the plain key names (compatible with a single-stream layout)
        partition: (group, index) => ({
          index,
          stream: one ? base : `${base}:p${index}`,
          retry: one ? `${base}:retry:${group}` : `${base}:retry:${group}:p${index}`,
          delayed: one ? `${base}:delayed:${group}` : `${base}:delayed:${group}:p${index}`,
          lease: `${base}:lease:${group}:p${index}`
        })
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

    /** The partition stream keys of a topic (computed once per topic, not per message). */
    const streamCache = new Map<string, ReadonlyArray<string>>()
    const partitionStreams = (topic: string): ReadonlyArray<string> => {
      let streams = streamCache.get(topic)
      if (streams === undefined) {
        const k = keys(topic)
        streams = Array.from({ length: partitions }, (_, i) => k.partition("", i).stream)
        streamCache.set(topic, streams)
      }
      return streams
    }
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
        const byStream = new Map<string, { topic: string; indexes: Array<number> }>()
        for (let i = 0; i < messages.length; i++) {
          const m = messages[i]!
          // the key's partition (a message without a key spreads by its id)
          const stream = partitionStreams(m.topic)[partitions === 1 ? 0 : fnv1a(m.key ?? m.id) % partitions]!
          const at = byStream.get(stream)
          if (at === undefined) byStream.set(stream, { topic: m.topic, indexes: [i] })
          else at.indexes.push(i)
        }
        const ids: Array<string> = new Array(messages.length)
        yield* Effect.forEach(
          byStream,
          ([stream, { topic, indexes }]) => {
            const args: Array<string> = []
            for (const i of indexes) {
              const fields = Envelope.toFields(messages[i]!)
              const start = args.length
              args.push("")
              for (const name in fields) args.push(name, fields[name]!)
              args[start] = String(args.length - start - 1)
            }
            return redis
              .eval(addBatchScript)(stream, ...args)
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
          const all = Array.from({ length: partitions }, (_, i) => k.partition(sub.group, i))
          const count = String(Math.max(1, Math.floor(sub.batchSize ?? 100)))
          const claimIdle = Math.max(1, Duration.toMillis(sub.claimIdle ?? "30 seconds"))
          const onEvent = sub.onEvent ?? Broker.logEvent
          const ensureGroups = (parts: ReadonlyArray<Part>) =>
            Effect.forEach(
              parts,
              (p) => Effect.andThen(createGroup(p.stream, sub.group), createGroup(p.retry, sub.group)),
              {
                discard: true
              }
            )

          // Partitions this subscription reads: all of them, or (ordered) the ones it holds a lease on.
          const owned = new Map<number, Part>()
          const history = new Map<string, string>() // stream -> id to resume the own-pending read from
          const own = (p: Part) => {
            owned.set(p.index, p)
            history.set(p.retry, "0")
            history.set(p.stream, "0")
          }
          const resetHistory = () => {
            for (const p of owned.values()) own(p)
          }
          if (!ordered) {
            yield* ensureGroups(all)
            for (const p of all) own(p)
          }

          // --- per-key parking (ordered): one message of a key in flight or backing off at a time
          const blocked = new Map<string, string>() // key -> entry id in flight, or "delayed"
          const parked = new Map<string, Array<RedisDelivery>>()
          const released: Array<Broker.Delivery> = []
          const inFlight = new Map<number, number>() // partition -> deliveries out and not settled
          let wakeReleased: (() => void) | undefined
          const onSettled = (d: RedisDelivery, outcome: "done" | "delayed") => {
            inFlight.set(d.part.index, Math.max(0, (inFlight.get(d.part.index) ?? 0) - 1))
            const key = d.envelope.key
            if (key === undefined || blocked.get(key) !== d.entryId) return
            if (outcome === "delayed") {
              blocked.set(key, "delayed")
              return
            }
            const queue = parked.get(key)
            const next = queue?.shift()
            if (queue !== undefined && queue.length === 0) parked.delete(key)
            if (next === undefined) {
              blocked.delete(key)
              return
            }
            blocked.set(key, next.entryId)
            inFlight.set(next.part.index, (inFlight.get(next.part.index) ?? 0) + 1)
            released.push(next)
            wakeReleased?.()
          }
          /** True when the delivery may go out now; otherwise it is parked behind its key. */
          const admit = (d: RedisDelivery): boolean => {
            if (!ordered) return true
            d.onSettled = onSettled
            const key = d.envelope.key
            const b = key === undefined ? undefined : blocked.get(key)
            if (key !== undefined && b !== undefined && b !== d.entryId && !(b === "delayed" && d.fromRetry)) {
              const queue = parked.get(key)
              if (queue === undefined) parked.set(key, [d])
              else if (!queue.some((q) => q.entryId === d.entryId)) queue.push(d)
              return false
            }
            if (key !== undefined) blocked.set(key, d.entryId)
            inFlight.set(d.part.index, (inFlight.get(d.part.index) ?? 0) + 1)
            return true
          }

          let nextMoveAt = 0
          let nextClaimAt = 0
          let nextLeaseAt = 0
          let recreations = 0

          // --- leases (ordered): each partition read by one consumer of the group at a time
          const renewScript = Redis.script((lease: string, me: string, ms: number) => [lease, me, ms], {
            numberOfKeys: 1,
            lua: `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0`
          }).withReturnType<number>()
          const releaseScript = Redis.script((lease: string, me: string) => [lease, me], {
            numberOfKeys: 1,
            lua: `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`
          }).withReturnType<number>()
          /** Keys whose head waits in a partition's delayed set (after a takeover). */
          const delayedKeys = (p: Part) =>
            Effect.map(redis.send<ReadonlyArray<string>>("ZRANGE", p.delayed, "0", "-1"), (members) => {
              for (const member of members) {
                const flat = JSON.parse(String(member)) as Array<string>
                const at = flat.indexOf(Envelope.FieldNames.subject)
                if (at >= 0 && at % 2 === 0 && flat[at + 1] !== undefined) blocked.set(flat[at + 1]!, "delayed")
              }
            })
          const rebalance = (now: number) =>
            Effect.gen(function* () {
              const members = k.members(sub.group)
              yield* redis.send("ZADD", members, String(now), sub.consumer)
              yield* redis.send("ZREMRANGEBYSCORE", members, "-inf", String(now - leaseMs))
              const live = Math.max(1, Number(yield* redis.send<number>("ZCARD", members)))
              const share = Math.ceil(partitions / live)
              for (const p of Array.from(owned.values())) {
                if ((yield* redis.eval(renewScript)(p.lease, sub.consumer, leaseMs)) !== 1) owned.delete(p.index)
              }
              // give back what is beyond the fair share, once nothing of it is in flight
              for (const p of Array.from(owned.values())) {
                if (owned.size <= share) break
                if ((inFlight.get(p.index) ?? 0) > 0) continue
                if ([...parked.values()].some((q) => q.some((d) => d.part.index === p.index))) continue
                yield* redis.eval(releaseScript)(p.lease, sub.consumer)
                owned.delete(p.index)
              }
              for (const p of all) {
                if (owned.size >= share) break
                if (owned.has(p.index)) continue
                const got = yield* redis.send<string | null>("SET", p.lease, sub.consumer, "NX", "PX", String(leaseMs))
                if (got === null) continue
                // taking over: the previous owner's pending entries become ours, in order, and keys
                // whose head backs off in the delayed set stay parked
                yield* ensureGroups([p])
                for (const stream of [p.retry, p.stream]) {
                  // JUSTID: the delivery count grows once, when our history read delivers them
                  const pending = yield* redis.send<unknown>("XPENDING", stream, sub.group, "-", "+", "10000")
                  const others = (Array.isArray(pending) ? pending : [])
                    .filter((row): row is Array<unknown> => Array.isArray(row) && String(row[1]) !== sub.consumer)
                    .map((row) => String(row[0]))
                  if (others.length > 0) {
                    yield* redis.send("XCLAIM", stream, sub.group, sub.consumer, "0", ...others, "JUSTID")
                  }
                }
                yield* delayedKeys(p)
                own(p)
              }
            }).pipe(Effect.mapError((e) => (BrokerError.isBrokerError(e) ? e : fromRedis("lease")(e))))
          if (ordered) {
            yield* Effect.addFinalizer(() =>
              Effect.forEach(owned.values(), (p) => redis.eval(releaseScript)(p.lease, sub.consumer), {
                discard: true
              }).pipe(Effect.andThen(redis.send("ZREM", k.members(sub.group), sub.consumer)), Effect.ignore)
            )
          }

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
            part: Part,
            stream: string,
            entries: ReadonlyArray<Replies.StreamEntry>,
            counts: Map<string, number> | undefined
          ): Effect.Effect<Array<Broker.Delivery>, BrokerError.BrokerError> =>
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
                  const malformed = new RedisDelivery(
                    impl,
                    sub,
                    part,
                    stream,
                    entry.id,
                    entry.fields,
                    placeholder,
                    count
                  )
                  yield* malformed.deadLetter({ reason: "malformed", error: read.failure.message, attempts: 0 })
                  yield* onEvent({
                    _tag: "Malformed",
                    topic: sub.topic,
                    entryId: entry.id,
                    reason: read.failure.message
                  })
                  continue
                }
                const d = new RedisDelivery(impl, sub, part, stream, entry.id, entry.fields, read.success, count)
                if (admit(d)) out.push(d)
              }
              if (lost.length > 0) {
                // deleted while pending (a trim): report them, then drop them from the PEL
                yield* onEvent({ _tag: "LostInBroker", topic: sub.topic, group: sub.group, entryIds: lost })
                yield* redis.send("XACK", stream, sub.group, ...lost).pipe(Effect.mapError(fromRedis("XACK")))
              }
              return out
            })

          const readOnce = (conn: Redis.Connection): Effect.Effect<Array<Broker.Delivery>, BrokerError.BrokerError> =>
            Effect.gen(function* () {
              const now = yield* Clock.currentTimeMillis
              const out: Array<Broker.Delivery> = []
              if (ordered && now >= nextLeaseAt) {
                nextLeaseAt = now + Math.max(50, Math.floor(leaseMs / 3))
                yield* rebalance(now)
              }
              const parts = Array.from(owned.values())
              if (parts.length === 0) {
                // no partition to read (ordered, the others hold them): wait for the next rebalance
                yield* Effect.sleep(Math.max(1, nextLeaseAt - now))
                return out
              }
              if (now >= nextMoveAt) {
                nextMoveAt = now + moveEvery
                for (const p of parts) {
                  yield* redis
                    .eval(moveScript)(p.delayed, p.retry, now, 1000)
                    .pipe(Effect.mapError(fromRedis("move delayed")))
                }
              }
              if (now >= nextClaimAt) {
                nextClaimAt = now + Math.max(50, Math.floor(claimIdle / 2))
                for (const p of parts) {
                  for (const stream of [p.retry, p.stream]) {
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
                    out.push(...(yield* toDeliveries(p, stream, reply.claimed, counts)))
                  }
                }
                if (out.length > 0) return out
              }
              // own pending history first (from where the last history read stopped), then new
              // entries; retry streams first, since a redelivery is the head of its key
              const streams: Array<[Part, string]> = []
              for (const p of parts) streams.push([p, p.retry], [p, p.stream])
              const inHistory = streams.some(([, stream]) => history.has(stream))
              const ids = streams.map(([, stream]) => (inHistory ? (history.get(stream) ?? ">") : ">"))
              const args = ["GROUP", sub.group, sub.consumer, "COUNT", count]
              if (!inHistory) {
                const wait = Math.min(blockMs, nextMoveAt - now, ordered ? nextLeaseAt - now : blockMs)
                args.push("BLOCK", String(Math.max(1, wait)))
              }
              const reply = Replies.streamsOf(
                yield* conn
                  .send<unknown>("XREADGROUP", ...args, "STREAMS", ...streams.map(([, s]) => s), ...ids)
                  .pipe(Effect.mapError(fromRedis("XREADGROUP")))
              )
              for (const [part, stream] of streams) {
                const entries = reply.get(stream) ?? []
                if (inHistory && history.has(stream)) {
                  if (entries.length === 0) history.delete(stream)
                  else history.set(stream, entries[entries.length - 1]!.id)
                }
                const counts = inHistory ? yield* countsOf(stream, entries) : undefined
                out.push(...(yield* toDeliveries(part, stream, entries, counts)))
              }
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
                yield* ensureGroups(Array.from(owned.values()))
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
          const takeReleased = (): Batch => released.splice(0, released.length) as unknown as Batch
          const pull: Effect.Effect<Batch, BrokerError.BrokerError> = Effect.gen(function* () {
            if (released.length > 0) return takeReleased()
            if (ahead === undefined) ahead = yield* Effect.forkIn(fetch, streamScope)
            const reading = ahead
            // ordered: a settlement can release a parked message while a read is blocked
            const current = ordered
              ? yield* Effect.raceFirst(
                  Effect.map(Fiber.join(reading), (batch) => ({ batch })),
                  Effect.callback<{ readonly batch: undefined }>((resume) => {
                    wakeReleased = () => resume(Effect.succeed({ batch: undefined }))
                    if (released.length > 0) wakeReleased()
                    return Effect.sync(() => {
                      wakeReleased = undefined
                    })
                  })
                )
              : { batch: yield* Fiber.join(reading) }
            if (current.batch === undefined) return takeReleased()
            ahead = yield* Effect.forkIn(fetch, streamScope)
            return current.batch
          })
          return Stream.fromPull(Effect.succeed(pull))
        })
      )

    const ackAll = (deliveries: ReadonlyArray<Broker.Delivery>) =>
      Effect.gen(function* () {
        const byStream = new Map<string, { group: string; stream: string; batch: Array<RedisDelivery> }>()
        for (const d of deliveries) {
          if (!(d instanceof RedisDelivery) || d.impl !== impl) {
            return yield* fail(
              new BrokerError.InvalidArgument({ argument: "deliveries", message: "a delivery of another broker" })
            )
          }
          const key = `${d.group}\u0000${d.stream}`
          const entry = byStream.get(key)
          if (entry === undefined) byStream.set(key, { group: d.group, stream: d.stream, batch: [d] })
          else entry.batch.push(d)
        }
        let acked = 0
        for (const { group, stream, batch } of byStream.values()) {
          acked += yield* redis
            .send<number>("XACK", stream, group, ...batch.map((d) => d.entryId))
            .pipe(Effect.mapError(fromRedis("XACK")))
          // ordered subscriptions release the keys of what was acked (a no-op for a stale delivery)
          for (const d of batch) d.settled("done")
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
