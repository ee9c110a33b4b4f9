/**
 * The memory broker's engine: appends, retention, wake-ups of waiting
 * readers, per-key hand-over, dead-lettering, and the read that a
 * subscription's pull runs (own history, due redeliveries, claims, released
 * keys, fresh entries).
 *
 * @internal
 */
import type { Broker, Envelope } from "@converge/core"
import { Effect } from "effect"
import type * as Scheduler from "effect/Scheduler"
import { MemoryDelivery } from "./delivery.ts"
import {
  type Entry,
  envelopeOf,
  fieldsOf,
  GroupState,
  type Pending,
  type Settler,
  type Sub,
  TopicState,
  type Waiter
} from "./state.ts"

/** The engine's settings, resolved from the layer's options. */
export interface EngineOptions {
  readonly ordered: boolean
  /** Entries kept per topic (`Infinity`: unbounded). */
  readonly retention: number
  /** Writes are durable only at the next simulated fsync. */
  readonly fsyncEnabled: boolean
  /** Seed of the reorder knob's generator. */
  readonly seed: number
}

/**
 * Wakes the first waiter of a group: now, inside the caller, when a full batch of it is waiting (a
 * publisher runs at most one batch ahead of a reader that keeps up); else soon, after the caller yields, so
 * the messages it publishes meanwhile come in one read instead of one read each.
 */
const wakeFirst = (set: Set<Waiter>, unread: number): void => {
  for (const w of set) {
    if (unread >= w.sub.batch) w.now()
    else w.soon()
    return
  }
}

export class Core implements Settler {
  readonly topics = new Map<string, TopicState>()
  /** Waiting readers: topic → group → waiters, in the order they began to wait. */
  readonly waiters = new Map<string, Map<string, Set<Waiter>>>()
  readonly subs = new Set<Sub>()
  /** Topic names already validated (names are checked once, not per message). */
  readonly validTopics = new Set<string>()
  readonly ordered: boolean
  readonly retention: number
  readonly retentionSlack: number
  readonly fsyncEnabled: boolean
  nextSeq = 1
  nextToken = 1
  nextDlq = 1
  closed = false
  rng: number

  constructor(options: EngineOptions) {
    this.ordered = options.ordered
    this.retention = options.retention
    // trim at most every 100..1000 appends: the scan of what groups still need is amortised
    this.retentionSlack = Number.isFinite(this.retention)
      ? Math.max(100, Math.min(1000, Math.ceil(this.retention / 10)))
      : 0
    this.fsyncEnabled = options.fsyncEnabled
    this.rng = options.seed >>> 0 || 1
  }

  random(): number {
    // xorshift32: deterministic, seedable
    let x = this.rng
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    this.rng = x >>> 0
    return this.rng / 0x100000000
  }

  topic(name: string): TopicState {
    let t = this.topics.get(name)
    if (t === undefined) {
      t = new TopicState(name)
      this.topics.set(name, t)
    }
    return t
  }

  /** Wakes every waiting subscription of a topic: a change each of them must see (faults, nacks, deletes). */
  wake(topic: string): void {
    const groups = this.waiters.get(topic)
    if (groups === undefined) return
    for (const set of groups.values()) {
      if (set.size === 0) continue
      for (const w of Array.from(set)) w.now()
    }
  }

  /**
   * Wakes one waiting subscription of `group`, or of every group of the
   * topic: new work that one reader takes (a publish, a key handed over).
   * Waking every competing consumer for it would make all but one read
   * nothing; a reader that fills its batch wakes the next one, and a
   * subscription that ends passes its wake-up on, so none is lost. Whether
   * the reader runs now or after the caller yields: see `wakeFirst`.
   */
  wakeOne(topic: string, group?: string): void {
    const groups = this.waiters.get(topic)
    if (groups === undefined) return
    if (group !== undefined) {
      const set = groups.get(group)
      if (set !== undefined && set.size > 0) wakeFirst(set, this.unread(topic, group))
      return
    }
    for (const [name, set] of groups) if (set.size > 0) wakeFirst(set, this.unread(topic, name))
  }

  /** Entries a group can read without a claim: fresh ones past its cursor and keys handed over. */
  unread(topic: string, group: string): number {
    const t = this.topics.get(topic)
    const g = t?.groups.get(group)
    if (t === undefined || g === undefined) return Number.POSITIVE_INFINITY // let the reader find out
    return t.entries.length - t.indexFrom(g.cursor) + g.ready.length
  }

  waitFor(topic: string, sub: Sub): Effect.Effect<void> {
    return Effect.withFiber((fiber) => this.waitOn(topic, sub, fiber.currentDispatcher))
  }

  private waitOn(topic: string, sub: Sub, dispatcher: Scheduler.SchedulerDispatcher): Effect.Effect<void> {
    return Effect.callback<void>((resume) => {
      let groups = this.waiters.get(topic)
      if (groups === undefined) {
        groups = new Map()
        this.waiters.set(topic, groups)
      }
      let set = groups.get(sub.group)
      if (set === undefined) {
        set = new Set()
        groups.set(sub.group, set)
      }
      const waiting = set
      // a wake-up removes its waiter however it comes (one, all, kill, close, interruption): a stale one
      // left in the set would swallow a later wakeOne
      let done = false
      let scheduled = false
      const now = () => {
        if (done) return
        done = true
        waiting.delete(w)
        resume(Effect.void)
      }
      const w: Waiter = {
        sub,
        now,
        soon: () => {
          if (scheduled || done) return
          scheduled = true
          dispatcher.scheduleTask(now, 0)
        }
      }
      set.add(w)
      sub.wake = now
      return Effect.sync(() => {
        done = true
        set.delete(w)
      })
    })
  }

  append(
    t: TopicState,
    envelope: Envelope.Encoded | undefined,
    raw: Envelope.Fields | undefined,
    key: string | undefined,
    now: number
  ): Entry {
    const seq = this.nextSeq++
    const entry: Entry = {
      seq,
      id: `${seq}-0`,
      key,
      visibleAt: t.delayMs > 0 ? now + t.delayMs : 0,
      durable: !this.fsyncEnabled,
      deleted: false,
      raw,
      envelope,
      malformed: undefined
    }
    t.entries.push(entry)
    return entry
  }

  applyRetention(t: TopicState): void {
    // never trim what a group still needs: pending, parked or not yet read
    let minSeq = Number.MAX_SAFE_INTEGER
    for (const g of t.groups.values()) {
      minSeq = Math.min(minSeq, g.cursor)
      for (const p of g.pending.values()) minSeq = Math.min(minSeq, p.entry.seq)
      for (const e of g.ready) minSeq = Math.min(minSeq, e.seq)
      for (const list of g.parked.values()) for (const e of list) minSeq = Math.min(minSeq, e.seq)
    }
    const limit = Math.min(t.entries.length - this.retention, t.indexFrom(minSeq))
    if (limit <= 0) return
    for (const e of t.entries.splice(0, limit)) {
      e.deleted = true
    }
  }

  group(t: TopicState, name: string): GroupState {
    let g = t.groups.get(name)
    if (g === undefined) {
      // a new group reads the retained history, from the oldest entry (XGROUP CREATE ... 0)
      g = new GroupState(name, t.entries.length === 0 ? this.nextSeq : t.entries[0]!.seq)
      t.groups.set(name, g)
    }
    return g
  }

  release(t: TopicState, g: GroupState, entry: Entry): void {
    if (!this.ordered || entry.key === undefined) return
    const parked = g.parked.get(entry.key)
    if (parked !== undefined && parked.length > 0) {
      // hand the key to its next message, still locked
      g.ready.push(parked.shift()!)
      if (parked.length === 0) g.parked.delete(entry.key)
      this.wakeOne(t.name, g.name)
    } else {
      // nothing was waiting for this key: no reader has anything new
      g.lockedKeys.delete(entry.key)
    }
  }

  deadLetterEntry(
    t: TopicState,
    group: string,
    entry: Entry,
    reason: Broker.DeadLetterReason,
    count: number,
    now: number
  ): void {
    const envelope = envelopeOf(entry)
    t.dlq.push({
      id: `${this.nextDlq++}-0`,
      topic: t.name,
      group,
      originalEntryId: entry.id,
      reason: reason.reason,
      error: reason.error,
      attempts: reason.attempts ?? envelope?.attempt ?? 1,
      deliveryCount: count,
      time: new Date(now).toISOString(),
      fields: fieldsOf(entry),
      envelope
    })
  }
}

/** Reads up to `max` deliveries for `sub`; may report events. */
export const read = (
  core: Core,
  sub: Sub,
  t: TopicState,
  g: GroupState,
  max: number,
  claimIdle: number,
  now: number,
  events: Array<Broker.SubscriptionEvent>
): Array<MemoryDelivery> => {
  const out: Array<MemoryDelivery> = []
  sub.leftWork = false
  if (g.lost.length > 0) {
    events.push({ _tag: "LostInBroker", topic: t.name, group: g.name, entryIds: g.lost })
    g.lost = []
  }
  const deliver = (entry: Entry, p: Pending | undefined): void => {
    const envelope = envelopeOf(entry)
    if (envelope === undefined) {
      // malformed: dead-letter it, report it, and carry on
      if (p !== undefined) g.pending.delete(entry.seq)
      core.deadLetterEntry(t, g.name, entry, { reason: "malformed", error: entry.malformed }, 1, now)
      events.push({ _tag: "Malformed", topic: t.name, entryId: entry.id, reason: entry.malformed! })
      core.release(t, g, entry)
      return
    }
    const token = core.nextToken++
    if (p === undefined) {
      p = { entry, consumer: sub.consumer, count: 1, deliveredAt: now, dueAt: undefined, token, attempt: undefined }
      g.pending.set(entry.seq, p)
    } else {
      p.consumer = sub.consumer
      p.count++
      p.deliveredAt = now
      p.token = token
    }
    const delivered =
      p.attempt === undefined || p.attempt === envelope.attempt ? envelope : { ...envelope, attempt: p.attempt }
    out.push(new MemoryDelivery(core, sub, t, g, p, delivered))
    if (t.duplicate > 0) {
      t.duplicate--
      p.count++
      out.push(new MemoryDelivery(core, sub, t, g, p, delivered))
    }
  }
  // 1. this consumer's own pending history, once per subscription (XREADGROUP ... 0)
  if (sub.firstRead) {
    sub.firstRead = false
    for (const p of g.pending.values()) {
      if (p.consumer === sub.consumer && p.dueAt === undefined && !p.entry.deleted) deliver(p.entry, p)
    }
  }
  // 2. delayed redeliveries that are due, then 3. claims of idle entries of other consumers
  const scanClaims = now >= sub.nextClaimAt
  if (g.pending.size > 0 && (g.delayed > 0 || scanClaims)) {
    let nextClaimAt = now + claimIdle
    for (const p of g.pending.values()) {
      if (out.length >= max) {
        nextClaimAt = now
        sub.leftWork = true
        break
      }
      if (p.dueAt !== undefined) {
        if (p.dueAt <= now) {
          p.dueAt = undefined
          g.delayed--
          deliver(p.entry, p)
        }
      } else if (scanClaims && p.consumer !== sub.consumer) {
        if (now - p.deliveredAt >= claimIdle) deliver(p.entry, p)
        else nextClaimAt = Math.min(nextClaimAt, p.deliveredAt + claimIdle)
      }
    }
    if (scanClaims) sub.nextClaimAt = nextClaimAt
  } else if (scanClaims) {
    sub.nextClaimAt = now + claimIdle
  }
  // 4. keys released by an ack (ordered mode)
  while (g.ready.length > 0 && out.length < max) deliver(g.ready.shift()!, undefined)
  if (g.ready.length > 0) sub.leftWork = true
  // 5. new entries
  const fresh: Array<Entry> = []
  let i = t.indexFrom(g.cursor)
  while (i < t.entries.length && out.length + fresh.length < max) {
    const entry = t.entries[i]!
    if (entry.visibleAt > now) break
    g.cursor = entry.seq + 1
    i++
    if (core.ordered && entry.key !== undefined) {
      if (g.lockedKeys.has(entry.key)) {
        const list = g.parked.get(entry.key)
        if (list === undefined) g.parked.set(entry.key, [entry])
        else list.push(entry)
        continue
      }
      g.lockedKeys.add(entry.key)
    }
    fresh.push(entry)
  }
  if (i < t.entries.length && t.entries[i]!.visibleAt <= now) sub.leftWork = true
  if (t.reorderWindow > 1 && fresh.length > 1) {
    for (let w = 0; w < fresh.length; w += t.reorderWindow) {
      const end = Math.min(fresh.length, w + t.reorderWindow)
      for (let k = end - 1; k > w; k--) {
        const j = w + Math.floor(core.random() * (k - w + 1))
        const tmp = fresh[k]!
        fresh[k] = fresh[j]!
        fresh[j] = tmp
      }
    }
  }
  for (const entry of fresh) deliver(entry, undefined)
  return out
}

/** Milliseconds until something may become deliverable without a signal, or undefined. */
export const nextWakeIn = (
  sub: Sub,
  t: TopicState,
  g: GroupState,
  claimIdle: number,
  now: number
): number | undefined => {
  let next = Number.POSITIVE_INFINITY
  for (const p of g.pending.values()) {
    if (p.dueAt !== undefined) next = Math.min(next, p.dueAt)
    else if (p.consumer !== sub.consumer) next = Math.min(next, p.deliveredAt + claimIdle)
  }
  const i = t.indexFrom(g.cursor)
  if (i < t.entries.length && t.entries[i]!.visibleAt > now) next = Math.min(next, t.entries[i]!.visibleAt)
  return next === Number.POSITIVE_INFINITY ? undefined : Math.max(1, next - now)
}
