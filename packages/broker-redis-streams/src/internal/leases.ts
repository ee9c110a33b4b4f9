/**
 * Partition leases of an ordered subscription: each partition of a topic is
 * read by one consumer of a group at a time. Consumers register in the
 * group's member set with a heartbeat; each takes a fair share of the
 * partitions (`SET lease NX PX`), renews what it holds, and gives back what
 * is beyond its share once nothing of it is in flight. A takeover claims the
 * previous owner's pending entries (`XCLAIM ... JUSTID`, so the delivery
 * count grows once, on redelivery) and parks the keys whose head waits in the
 * delayed set.
 *
 * @internal
 */
import { type Broker, BrokerError, Envelope } from "@converge/core"
import { Effect } from "effect"
import type { BrokerContext } from "./context.ts"
import { fromRedis } from "./errors.ts"
import type { Keys, Part } from "./keys.ts"
import type { Parking } from "./parking.ts"
import { releaseScript, renewScript } from "./scripts.ts"

/** The partitions one subscription reads, and where its own-pending history read resumes. */
export interface Ownership {
  /** partition index -> its keys */
  readonly owned: Map<number, Part>
  /** stream -> the id the own-pending read resumes from */
  readonly history: Map<string, string>
}

/** Takes a partition: read it, starting with this consumer's own pending entries. */
export const own = (ownership: Ownership, p: Part): void => {
  ownership.owned.set(p.index, p)
  ownership.history.set(p.retry, "0")
  ownership.history.set(p.stream, "0")
}

/** The lease protocol of one ordered subscription. */
export const make = (
  ctx: BrokerContext,
  sub: Broker.SubscribeOptions,
  k: Keys,
  all: ReadonlyArray<Part>,
  ownership: Ownership,
  parking: Parking,
  ensureGroups: (parts: ReadonlyArray<Part>) => Effect.Effect<void, BrokerError.BrokerError>
) => {
  const { redis, leaseMs, partitions } = ctx
  const { owned } = ownership

  /** Keys whose head waits in a partition's delayed set (after a takeover). */
  const delayedKeys = (p: Part) =>
    Effect.map(redis.send<ReadonlyArray<string>>("ZRANGE", p.delayed, "0", "-1"), (members) => {
      for (const member of members) {
        const flat = JSON.parse(String(member)) as Array<string>
        const at = flat.indexOf(Envelope.FieldNames.subject)
        if (at >= 0 && at % 2 === 0 && flat[at + 1] !== undefined) parking.blockDelayed(flat[at + 1]!)
      }
    })

  /** Heartbeat, renew, give back beyond the fair share, take up to it. */
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
        if (parking.busy(p.index)) continue
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
        own(ownership, p)
      }
    }).pipe(Effect.mapError((e) => (BrokerError.isBrokerError(e) ? e : fromRedis("lease")(e))))

  /** Gives back every lease and leaves the member set (on close; failures ignored). */
  const releaseAll = Effect.forEach(owned.values(), (p) => redis.eval(releaseScript)(p.lease, sub.consumer), {
    discard: true
  }).pipe(Effect.andThen(redis.send("ZREM", k.members(sub.group), sub.consumer)), Effect.ignore)

  return { rebalance, releaseAll }
}
