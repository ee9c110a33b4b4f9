/**
 * A group's position on a topic, summed over the partitions: `XINFO GROUPS` of each partition stream and
 * its retry stream (`pending`, `lag`, Redis 7+) and the size of its delayed set.
 */
import type { Broker } from "@converge/core"
import { Effect } from "effect"
import { type BrokerContext, checkName } from "./context.ts"
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
      const keys = ctx.keys(topic)
      let pending = 0
      let lag = 0
      for (let i = 0; i < ctx.partitions; i++) {
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
