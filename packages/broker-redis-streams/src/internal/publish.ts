/**
 * Publishing: one atomic Lua call per partition stream and batch (one round
 * trip, all or none), streams in parallel; then the durability wait
 * (`WAITAOF` for the durable levels); and, when `maxLen` is set, a periodic
 * trim that never removes what a group still needs.
 *
 * @internal
 */
import { type Broker, BrokerError, Envelope, Partition } from "@converge/core"
import { Clock, Effect } from "effect"
import { type BrokerContext, checkName } from "./context.ts"
import { fail, fromRedis } from "./errors.ts"
import { addBatchScript, trimScript } from "./scripts.ts"

/** The publish operation of one broker instance. */
export const make = (ctx: BrokerContext): Broker.Broker["Service"]["publish"] => {
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
  const awaitDurability = Effect.gen(function* () {
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

  const validTopics = new Set<string>()
  return (messages) =>
    Effect.gen(function* () {
      for (const m of messages) {
        if (validTopics.has(m.topic)) continue
        yield* checkName("topic", m.topic)
        validTopics.add(m.topic)
      }
      // one atomic script call per stream and batch (one round trip, all or none), streams in parallel
      const byStream = new Map<string, { topic: string; indexes: Array<number> }>()
      for (let i = 0; i < messages.length; i++) {
        const m = messages[i]!
        // the key's partition (a message without a key spreads by its id)
        const stream = partitionStreams(m.topic)[Partition.ofMessage(m, partitions)]!
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
      yield* awaitDurability
      return ids
    })
}
