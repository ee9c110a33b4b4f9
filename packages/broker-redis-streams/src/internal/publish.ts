/**
 * Publishing: one Lua call per partition stream and batch (one round trip; the compact layout sends each
 * entry's two values alone), streams in parallel, with an
 * outcome per message (`publishEach`; `publish` is its all-or-error form); then the durability wait
 * (`WAITAOF` for the durable levels); and, when `maxLen` is set, a periodic trim that never removes what a
 * group still needs. A topic's partition count is checked against Redis at its first publish.
 *
 * @internal
 */
import { type Broker, BrokerError, Envelope, Partition } from "@converge/core"
import { Clock, Effect } from "effect"
import { type BrokerContext, checkName, checkPartitions } from "./context.ts"
import { commandFailed, fail, fromRedis } from "./errors.ts"
import { addBatchScript, addCompactBatchScript, trimScript } from "./scripts.ts"

/** A `CommandFailed` with an explicit verdict. */
const commandFailedFor = (command: string, message: string, retryable: boolean) =>
  new BrokerError.CommandFailed({ command, message, retryable })

/** The publish operations of one broker instance. */
export const make = (ctx: BrokerContext) => {
  const { redis, keys, partitions, durability, replicas, durabilityTimeoutMs, maxLen, trimEvery } = ctx

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

  const nextTrimAt = new Map<string, number>()
  /** Trims a topic when due; a failed trim is logged, never a failed publish. */
  const trimIfDue = (topic: string, now: number) => {
    if (maxLen === undefined || now < (nextTrimAt.get(topic) ?? 0)) return Effect.void
    nextTrimAt.set(topic, now + trimEvery)
    return Effect.forEach(partitionStreams(topic), (stream) => redis.eval(trimScript)(stream, maxLen), {
      discard: true
    }).pipe(Effect.catch((e) => Effect.logWarning(`redis-streams: trimming ${topic} failed`, e)))
  }

  /** Waits until the configured durability level holds for what this connection wrote. */
  const awaitDurability: Effect.Effect<void, BrokerError.BrokerError> = Effect.gen(function* () {
    if (durability === "reply") return
    const reply = yield* redis
      .send<ReadonlyArray<number>>(
        "WAITAOF",
        "1",
        durability === "waitaof-replicas" ? String(replicas) : "0",
        String(durabilityTimeoutMs)
      )
      .pipe(Effect.mapError(fromRedis("WAITAOF")))
    const [local, remote] = [Number(reply[0]), Number(reply[1])]
    if (local < 1 || (durability === "waitaof-replicas" && remote < replicas)) {
      return yield* fail(
        new BrokerError.NotConfirmed({
          message: `WAITAOF confirmed local=${local} replicas=${remote}, wanted local=1${durability === "waitaof-replicas" ? ` replicas=${replicas}` : ""}`
        })
      )
    }
  })

  /** One script reply element to an outcome. */
  const outcomeOf = (reply: unknown): Broker.PublishOutcome => {
    if (!Array.isArray(reply)) return { _tag: "Stored", entryId: String(reply) }
    const [kind, why] = [String(reply[0]), String(reply[1])]
    if (kind === "refused") {
      return { _tag: "Failed", error: BrokerError.make(commandFailedFor("XADD", why, false)) }
    }
    const error = commandFailed("XADD", why)
    return {
      _tag: "Failed",
      error: BrokerError.make(
        kind === "skipped"
          ? commandFailedFor(
              "XADD",
              `not attempted: an earlier message of its partition failed (${why})`,
              error.retryable
            )
          : error
      )
    }
  }

  /** One script call for one stream's part of a batch; fills that part's outcomes (never fails). */
  const publishToStream = (
    messages: ReadonlyArray<Envelope.Encoded>,
    outcomes: Array<Broker.PublishOutcome>,
    stream: string,
    { topic, indexes }: { readonly topic: string; readonly indexes: ReadonlyArray<number> }
  ): Effect.Effect<void> => {
    const args: Array<string> = []
    if (ctx.compact) {
      // the compact layout's two values alone (the script names the fields)
      for (const i of indexes) {
        const fields = Envelope.toCompactFields(messages[i]!)
        args.push(fields.ce!, fields.data!)
      }
    } else {
      for (const i of indexes) {
        const fields = Envelope.toFields(messages[i]!)
        const start = args.length
        args.push("")
        for (const name in fields) args.push(name, fields[name]!)
        args[start] = String(args.length - start - 1)
      }
    }
    return redis
      .eval(ctx.compact ? addCompactBatchScript : addBatchScript)(stream, ...args)
      .pipe(
        Effect.matchEffect({
          onSuccess: (replies) => {
            for (let k = 0; k < indexes.length; k++) outcomes[indexes[k]!] = outcomeOf(replies[k])
            return maxLen === undefined
              ? Effect.void
              : Effect.flatMap(Clock.currentTimeMillis, (now) => trimIfDue(topic, now))
          },
          // nothing known of this stream's part of the batch (a lost connection): all of it failed
          onFailure: (e) => {
            const error = fromRedis("XADD")(e)
            for (const i of indexes) outcomes[i] = { _tag: "Failed", error }
            return Effect.void
          }
        })
      )
  }

  const validTopics = new Set<string>()
  const publishEach = (
    messages: ReadonlyArray<Envelope.Encoded>
  ): Effect.Effect<ReadonlyArray<Broker.PublishOutcome>, BrokerError.BrokerError> =>
    Effect.gen(function* () {
      const outcomes: Array<Broker.PublishOutcome> = new Array(messages.length)
      // one script call per stream and batch (one round trip), streams in parallel
      const byStream = new Map<string, { topic: string; indexes: Array<number> }>()
      for (let i = 0; i < messages.length; i++) {
        const m = messages[i]!
        if (!validTopics.has(m.topic)) {
          const invalid = yield* Effect.flip(checkName("topic", m.topic)).pipe(Effect.option)
          if (invalid._tag === "Some") {
            outcomes[i] = { _tag: "Failed", error: invalid.value }
            continue
          }
          const mismatch = yield* Effect.flip(checkPartitions(ctx, ctx.partitionsChecked, m.topic)).pipe(Effect.option)
          if (mismatch._tag === "Some") {
            outcomes[i] = { _tag: "Failed", error: mismatch.value }
            continue
          }
          validTopics.add(m.topic)
        }
        // the key's partition (a message without a key spreads by its id; one partition needs no hash)
        const stream = partitionStreams(m.topic)[partitions === 1 ? 0 : Partition.ofMessage(m, partitions)]!
        const at = byStream.get(stream)
        if (at === undefined) byStream.set(stream, { topic: m.topic, indexes: [i] })
        else at.indexes.push(i)
      }
      // one stream (every batch on a one-partition topic) is sent from this fiber: forking costs a
      // scheduler hop per batch, measured at ~13% of publish throughput
      if (byStream.size === 1) {
        for (const [stream, part] of byStream) yield* publishToStream(messages, outcomes, stream, part)
      } else if (byStream.size > 1) {
        yield* Effect.forEach(byStream, ([stream, part]) => publishToStream(messages, outcomes, stream, part), {
          concurrency: "unbounded",
          discard: true
        })
      }
      if (durability !== "reply" && outcomes.some((o) => o._tag === "Stored")) {
        const confirmed = yield* Effect.result(awaitDurability)
        if (confirmed._tag === "Failure") {
          // stored, but not at the level asked for: not confirmed, to be published again
          for (let i = 0; i < outcomes.length; i++) {
            if (outcomes[i]!._tag === "Stored") outcomes[i] = { _tag: "Failed", error: confirmed.failure }
          }
        }
      }
      return outcomes
    })

  /** All or an error: the first failure of the batch (what was stored before it stays stored). */
  const publish = (messages: ReadonlyArray<Envelope.Encoded>) =>
    Effect.flatMap(publishEach(messages), (outcomes) => {
      const ids: Array<string> = new Array(outcomes.length)
      for (let i = 0; i < outcomes.length; i++) {
        const o = outcomes[i]!
        if (o._tag === "Failed") return Effect.fail(o.error)
        ids[i] = o.entryId
      }
      return Effect.succeed(ids as ReadonlyArray<string>)
    })

  return { publish, publishEach }
}
