/**
 * The operator views of the Redis layer. `groupStats`: a group's position on a topic, summed over the
 * topic's partitions — `XINFO GROUPS` of each partition stream and its retry stream (`pending`, `lag`,
 * Redis 7+) and the size of its delayed set. `topics`: the topics under the prefix (`SCAN` for their meta
 * keys), each with its groups and dead-letter count. Both read the partition count the topic recorded in
 * Redis, so an operator tool needs no partition setting of its own.
 */
import type { Broker } from "@converge/core"
import { Effect } from "effect"
import { type BrokerContext, checkName, keysOf } from "./context.ts"
import { fromRedis } from "./errors.ts"

/** The fields of one group in an `XINFO GROUPS` reply (RESP2 flat array or RESP3 map). */
const groupOf = (reply: unknown, group: string): { pending: number; lag: number } | undefined => {
  if (!Array.isArray(reply)) return undefined
  for (const item of reply) {
    let fields: Record<string, unknown> = {}
    if (Array.isArray(item)) {
      for (let i = 0; i + 1 < item.length; i += 2) fields[String(item[i])] = item[i + 1]
    } else if (item instanceof Map) {
      fields = Object.fromEntries(item)
    } else if (item !== null && typeof item === "object") {
      fields = item as Record<string, unknown>
    }
    if (String(fields.name) === group) {
      return { pending: Number(fields.pending ?? 0), lag: Number(fields.lag ?? 0) }
    }
  }
  return undefined
}

const xinfo = (ctx: BrokerContext, stream: string, group: string) =>
  ctx.redis.send<unknown>("XINFO", "GROUPS", stream).pipe(
    Effect.map((reply) => groupOf(reply, group) ?? { pending: 0, lag: 0 }),
    // no such stream yet: nothing pending, nothing behind
    Effect.catchIf(
      (e) => /no such key/i.test(String((e.cause as { message?: unknown } | undefined)?.message ?? e.cause)),
      () => Effect.succeed({ pending: 0, lag: 0 })
    ),
    Effect.mapError(fromRedis("XINFO"))
  )

/** `Broker.groupStats` for the Redis Streams layer. */
export const make =
  (ctx: BrokerContext): NonNullable<Broker.Broker["Service"]["groupStats"]> =>
  (topic, group) =>
    Effect.gen(function* () {
      yield* checkName("topic", topic)
      yield* checkName("group", group)
      const keys = yield* keysOf(ctx, topic)
      const partitions = keys.partitions
      let pending = 0
      let lag = 0
      for (let i = 0; i < partitions; i++) {
        const part = keys.partition(group, i)
        for (const stream of [part.stream, part.retry]) {
          const s = yield* xinfo(ctx, stream, group)
          pending += s.pending
          lag += s.lag
        }
        lag += yield* ctx.redis.send<number>("ZCARD", part.delayed).pipe(Effect.mapError(fromRedis("ZCARD")))
      }
      return { pending, lag }
    })

/** The names of the groups in an `XINFO GROUPS` reply. */
const groupNames = (reply: unknown): Array<string> => {
  if (!Array.isArray(reply)) return []
  const names: Array<string> = []
  for (const item of reply) {
    if (Array.isArray(item)) {
      const at = item.findIndex((v, i) => i % 2 === 0 && String(v) === "name")
      if (at >= 0) names.push(String(item[at + 1]))
    } else if (item instanceof Map) names.push(String(item.get("name")))
    else if (item !== null && typeof item === "object") names.push(String((item as { name?: unknown }).name))
  }
  return names
}

const groupsOf = (ctx: BrokerContext, stream: string) =>
  ctx.redis.send<unknown>("XINFO", "GROUPS", stream).pipe(
    Effect.map(groupNames),
    Effect.catchIf(
      (e) => /no such key/i.test(String((e.cause as { message?: unknown } | undefined)?.message ?? e.cause)),
      () => Effect.succeed([] as Array<string>)
    ),
    Effect.mapError(fromRedis("XINFO"))
  )

/** `Broker.topics` for the Redis Streams layer: every topic with a meta key under the prefix. */
export const topics = (ctx: BrokerContext): NonNullable<Broker.Broker["Service"]["topics"]> =>
  Effect.gen(function* () {
    // the prefix is letters, digits and `._:-`, none of them special in a SCAN pattern
    const head = `${ctx.prefix}:{`
    const tail = "}:meta"
    const names = new Set<string>()
    let cursor = "0"
    do {
      const reply = yield* ctx.redis
        .send<[unknown, ReadonlyArray<unknown>]>("SCAN", cursor, "MATCH", `${head}*${tail}`, "COUNT", "1000")
        .pipe(Effect.mapError(fromRedis("SCAN")))
      cursor = String(reply[0])
      for (const key of reply[1]) {
        const k = String(key)
        if (k.startsWith(head) && k.endsWith(tail)) names.add(k.slice(head.length, k.length - tail.length))
      }
    } while (cursor !== "0")
    return yield* Effect.forEach([...names].sort(), (name) =>
      Effect.gen(function* () {
        const keys = yield* keysOf(ctx, name)
        const groups = new Set<string>()
        for (let i = 0; i < keys.partitions; i++) {
          for (const g of yield* groupsOf(ctx, keys.partition("", i).stream)) groups.add(g)
        }
        let deadLetters = 0
        for (const dlq of keys.dlqs) {
          deadLetters += Number(yield* ctx.redis.send<number>("XLEN", dlq).pipe(Effect.mapError(fromRedis("XLEN"))))
        }
        return { name, groups: [...groups].sort(), deadLetters }
      })
    )
  })
