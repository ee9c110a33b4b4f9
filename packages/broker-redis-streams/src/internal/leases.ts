/**
 * Partition leases of an ordered subscription: each partition of a topic is read by one consumer of a group
 * at a time, and every settlement is fenced by the lease (see `scripts.ts`).
 *
 * - **Taking and renewing** run on a schedule of their own (every `leaseTime / 3`), independent of reading
 *   and handling (docs/reliability.md, trap 9): a slow batch, or the drain at shutdown, never lets a lease
 *   lapse while this consumer lives. Consumers register in the group's member set with a heartbeat; each
 *   takes free partitions up to its fair share (`SET lease token NX PX`, a token new for every taking).
 *   Taking a partition claims the previous owner's pending entries (`XCLAIM ... JUSTID`, so the delivery
 *   count grows once, on redelivery) and starts the partition's parking state afresh, rebuilt from its
 *   delayed set.
 * - **Giving back** what is beyond the fair share happens between reads (no read of the partition is on the
 *   wire then), and only once nothing of it is in flight or parked.
 * - **Losing** a lease (a renewal that finds another token, or no renewal for a whole `leaseTime`) drops
 *   the partition and its parking state at once (trap 12); settlements of what was read under it fail with
 *   `DeliveryClosed`.
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

/** A partition this subscription reads, under which lease token (`""` when unordered). */
export interface Owned {
  readonly part: Part
  readonly token: string
  /** When the lease was last taken or renewed (ms). */
  renewedAt: number
}

/** The partitions one subscription reads, and where its own-pending history read resumes. */
export interface Ownership {
  /** partition index -> what is owned */
  readonly owned: Map<number, Owned>
  /** stream -> the id the own-pending read resumes from */
  readonly history: Map<string, string>
}

/** Starts reading a partition, with this consumer's own pending entries first. */
export const own = (ownership: Ownership, part: Part, token: string, now: number): void => {
  ownership.owned.set(part.index, { part, token, renewedAt: now })
  ownership.history.set(part.retry, "0")
  ownership.history.set(part.stream, "0")
}

/** Stops reading a partition. */
const disown = (ownership: Ownership, index: number): void => {
  const o = ownership.owned.get(index)
  if (o === undefined) return
  ownership.owned.delete(index)
  ownership.history.delete(o.part.retry)
  ownership.history.delete(o.part.stream)
}

let tokens = 0

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
  /** The fair share at the last heartbeat. */
  let share = partitions

  const lose = (index: number) => {
    disown(ownership, index)
    parking.drop(index)
  }

  /** Keys whose head waits in a partition's delayed set (when its lease is taken). */
  const delayedKeys = (p: Part) =>
    Effect.map(redis.send<ReadonlyArray<string>>("ZRANGE", p.delayed, "0", "-1"), (members) => {
      for (const member of members) {
        const flat = JSON.parse(String(member)) as Array<string>
        const fields: Record<string, string> = {}
        for (let i = 0; i + 1 < flat.length; i += 2) fields[flat[i]!] = flat[i + 1]!
        const key = Envelope.subjectOfFields(fields)
        if (key !== undefined) parking.blockDelayed(p.index, key)
      }
    })

  /** Claims every pending entry of other consumers in a stream (pages of 1 000). */
  const claimAll = (stream: string) =>
    Effect.gen(function* () {
      let start = "-"
      while (true) {
        const pending = yield* redis.send<unknown>("XPENDING", stream, sub.group, start, "+", "1000")
        const rows = (Array.isArray(pending) ? pending : []).filter((row): row is Array<unknown> => Array.isArray(row))
        const others = rows.filter((row) => String(row[1]) !== sub.consumer).map((row) => String(row[0]))
        // JUSTID: the delivery count grows once, when the history read delivers them
        if (others.length > 0) yield* redis.send("XCLAIM", stream, sub.group, sub.consumer, "0", ...others, "JUSTID")
        if (rows.length < 1000) return
        start = `(${String(rows[rows.length - 1]![0])}`
      }
    })

  /** Heartbeat, renewal of what is held, and taking free partitions up to the fair share. */
  const renewAndTake = (now: number) =>
    Effect.gen(function* () {
      const members = k.members(sub.group)
      yield* redis.send("ZADD", members, String(now), sub.consumer)
      yield* redis.send("ZREMRANGEBYSCORE", members, "-inf", String(now - leaseMs))
      const live = Math.max(1, Number(yield* redis.send<number>("ZCARD", members)))
      share = Math.ceil(partitions / live)
      for (const o of Array.from(owned.values())) {
        if ((yield* redis.eval(renewScript)(o.part.lease, o.token, leaseMs)) === 1) o.renewedAt = now
        else lose(o.part.index)
      }
      for (const p of all) {
        if (owned.size >= share) break
        if (owned.has(p.index)) continue
        const token = `${sub.consumer}/${now.toString(36)}.${(++tokens).toString(36)}`
        const got = yield* redis.send<string | null>("SET", p.lease, token, "NX", "PX", String(leaseMs))
        if (got === null) continue
        // taking over: the previous owner's pending entries become ours, in order, and keys whose head
        // backs off in the delayed set stay parked
        yield* ensureGroups([p])
        yield* claimAll(p.retry)
        yield* claimAll(p.stream)
        parking.open(p.index, token)
        yield* delayedKeys(p)
        own(ownership, p, token, now)
      }
    }).pipe(Effect.mapError((e) => (BrokerError.isBrokerError(e) ? e : fromRedis("lease")(e))))

  /**
   * The lease loop's step: renew and take; when Redis cannot be reached, a partition not renewed for a
   * whole lease time is lost (another consumer may hold it by now).
   */
  const tick = (now: number) =>
    renewAndTake(now).pipe(
      Effect.catch((e) =>
        Effect.suspend(() => {
          for (const o of Array.from(owned.values())) if (now - o.renewedAt >= leaseMs) lose(o.part.index)
          return Effect.logDebug("redis-streams: lease renewal failed; retrying", e)
        })
      )
    )

  /** Gives back what is beyond the fair share, once nothing of it is in flight or parked (between reads). */
  const giveBack = Effect.gen(function* () {
    for (const o of Array.from(owned.values())) {
      if (owned.size <= share) return
      if (parking.busy(o.part.index)) continue
      yield* redis.eval(releaseScript)(o.part.lease, o.token)
      lose(o.part.index)
    }
  }).pipe(Effect.mapError(fromRedis("lease")))

  /** Gives back every lease and leaves the member set (on close; failures ignored). */
  const releaseAll = Effect.suspend(() =>
    Effect.forEach(Array.from(owned.values()), (o) => redis.eval(releaseScript)(o.part.lease, o.token), {
      discard: true
    })
  ).pipe(Effect.andThen(redis.send("ZREM", k.members(sub.group), sub.consumer)), Effect.ignore)

  return { tick, giveBack, releaseAll }
}
