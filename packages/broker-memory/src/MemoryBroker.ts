/**
 * `MemoryBroker` — an in-memory `Broker` for tests and demos.
 *
 * Deterministic and driven by `Clock` (so `TestClock` controls redelivery
 * delays, claim timeouts and injected delays), it models the same semantics as
 * the Redis Streams layer: consumer groups (fan-out across groups, sharing
 * within one), a pending list with delivery counts, claim of entries idle
 * longer than a threshold, nack with delay, a dead-letter queue per topic,
 * optional per-key ordering and retained history for new groups.
 *
 * It also has **fault knobs** ({@link Faults}) to simulate what real brokers
 * do to you: duplicate the next delivery, drop an ack, reorder within a
 * window, delay deliveries, lose unconfirmed writes on a restart, delete or
 * trim a topic, kill a consumer, write a malformed entry.
 *
 * It is not a stand-in for the real broker in integration tests: it makes the
 * fast, deterministic ones.
 *
 * @example
 * ```ts
 * import { MemoryBroker } from "@converge/broker-memory"
 * const BrokerLive = MemoryBroker.layer({ orderedPerKey: true })
 * ```
 *
 * @since 0.1.0
 */
import { Broker, BrokerError, Envelope, Name } from "@converge/core"
import { Clock, Context, Duration, Effect, Layer, Result, Schedule, type Scope, Stream } from "effect"
import type * as Cause from "effect/Cause"
import type * as Scheduler from "effect/Scheduler"

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /**
   * Per-key ordering within each group: a message is not delivered while an
   * earlier message of the same key is pending (also while it backs off after
   * a nack). Messages without a key are not ordered. Default `false`.
   */
  readonly orderedPerKey?: boolean | undefined
  /**
   * Simulated `appendfsync everysec`: writes become durable only at the next
   * tick of this interval (by `Clock`), and `Faults.restart` loses the rest.
   * Default: every write is durable at once.
   */
  readonly fsyncInterval?: Duration.Input | undefined
  /**
   * Keep about this many entries per topic (trimmed in steps of 100 to 1000
   * entries or 10%, like Redis `MAXLEN ~`). Trimming never removes an entry that is still
   * pending, or not yet read, in any group. Default: unbounded.
   */
  readonly retention?: number | undefined
  /** Seed of the pseudo-random generator used by the reorder knob (default 1). */
  readonly seed?: number | undefined
}

/**
 * A pending entry, as {@link MemoryBroker} reports it.
 *
 * @since 0.1.0
 */
export interface PendingInfo {
  readonly entryId: string
  readonly messageId: string | undefined
  readonly consumer: string
  readonly deliveryCount: number
  /** Waiting for a delayed redelivery (nacked with a delay). */
  readonly delayed: boolean
}

/**
 * Fault injection. Every knob applies to one topic unless said otherwise.
 *
 * @since 0.1.0
 */
export interface Faults {
  /** The next `times` deliveries of the topic are delivered twice (the copy counts as a redelivery). */
  readonly duplicateNext: (topic: string, times?: number) => Effect.Effect<void>
  /** The next `times` acks of the topic report success but do nothing (the entry stays pending, to be claimed). */
  readonly dropNextAck: (topic: string, times?: number) => Effect.Effect<void>
  /** Shuffle new deliveries of the topic within windows of `window` messages (1 = off). Deterministic by seed. */
  readonly reorder: (topic: string, window: number) => Effect.Effect<void>
  /** New messages of the topic become visible only `delay` after their publish (0 = off). */
  readonly delay: (topic: string, delay: Duration.Input) => Effect.Effect<void>
  /** Marks every write durable now (a simulated fsync). */
  readonly fsync: Effect.Effect<void>
  /**
   * A simulated broker restart: writes not yet durable (see
   * `Options.fsyncInterval`) are lost, with their pending state. Returns how
   * many entries were lost. Subscriptions keep running (they reconnect).
   */
  readonly restart: Effect.Effect<number>
  /** Deletes the topic: entries, groups, pending lists and dead letters (like `DEL` of a stream key). */
  readonly deleteTopic: (topic: string) => Effect.Effect<void>
  /** Trims the topic to its newest `maxLen` entries, pending ones included; returns the removed entry ids. */
  readonly trim: (topic: string, maxLen: number) => Effect.Effect<ReadonlyArray<string>>
  /**
   * Kills every subscription of `consumer` in `group`, as a crash would: its
   * streams fail, and its unsettled deliveries cannot be acked any more (they
   * stay pending for a claim). Returns how many subscriptions were killed.
   */
  readonly killConsumer: (topic: string, group: string, consumer: string) => Effect.Effect<number>
  /** Appends raw fields as an entry, as a foreign client could (e.g. a malformed entry). Returns its id. */
  readonly appendRaw: (topic: string, fields: Envelope.Fields) => Effect.Effect<string>
}

/**
 * The memory broker's own service: fault knobs and inspection, beside the
 * `Broker` it provides.
 *
 * @since 0.1.0
 */
export class MemoryBroker extends Context.Service<
  MemoryBroker,
  {
    readonly faults: Faults
    /** The pending list of a group, oldest first. */
    readonly pending: (topic: string, group: string) => Effect.Effect<ReadonlyArray<PendingInfo>>
    /** How many entries a topic retains. */
    readonly length: (topic: string) => Effect.Effect<number>
    /**
     * The consumer groups of a topic, in creation order (like `XINFO GROUPS`). A group exists from its
     * first subscription on; entries it has not read are retained for it whatever the `retention`.
     */
    readonly groups: (topic: string) => Effect.Effect<ReadonlyArray<string>>
  }
>()("@converge/broker-memory/MemoryBroker") {}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

interface Entry {
  readonly seq: number
  readonly id: string
  readonly key: string | undefined
  readonly visibleAt: number
  durable: boolean
  deleted: boolean
  /** Fields written by `appendRaw`; undefined for entries published as envelopes. */
  readonly raw: Envelope.Fields | undefined
  /** The envelope: as published, or read from `raw` on first delivery. */
  envelope: Envelope.Encoded | undefined
  /** Why `raw` could not be read as an envelope. */
  malformed: string | undefined
}

/** The stored fields of an entry (computed for published envelopes). */
const fieldsOf = (entry: Entry): Envelope.Fields => entry.raw ?? Envelope.toFields(entry.envelope!)

/** Reads a raw entry as an envelope once; returns the envelope or undefined when malformed. */
const envelopeOf = (entry: Entry): Envelope.Encoded | undefined => {
  if (entry.envelope !== undefined || entry.malformed !== undefined) return entry.envelope
  const read = Envelope.fromFields(entry.raw!)
  if (Result.isSuccess(read)) entry.envelope = read.success
  else entry.malformed = read.failure.message
  return entry.envelope
}

interface Pending {
  readonly entry: Entry
  consumer: string
  count: number
  deliveredAt: number
  /** Set while waiting for a delayed redelivery. */
  dueAt: number | undefined
  /** Identifies the current delivery; 0 when none is live. */
  token: number
  /** The attempt the next delivery carries, when a nack set one. */
  attempt: number | undefined
}

interface Sub {
  readonly topic: string
  readonly group: string
  readonly consumer: string
  closed: boolean
  killed: boolean
  firstRead: boolean
  /** No claim is possible before this time (a lower bound kept by the claim scan). */
  nextClaimAt: number
  /** The last read stopped at its batch size with deliverable work left behind. */
  leftWork: boolean
  /** The most deliveries one read returns (`batchSize`). */
  readonly batch: number
  /** Resumes the subscription's reader now, if it is waiting (kill, close). */
  wake: () => void
}

/** A subscription's reader waiting for work. */
interface Waiter {
  readonly sub: Sub
  /** Resumes the reader now, inside the caller, and removes the waiter. */
  readonly now: () => void
  /**
   * Resumes the reader at the waiting fiber's dispatcher's next turn, i.e. after the caller yields. The
   * waiter stays listed until then, so another wake-up can still make it `now`; calling it again is a no-op.
   */
  readonly soon: () => void
}

class GroupState {
  readonly name: string
  cursor: number
  /** By entry seq (a number key hashes cheaper than the entry id string). */
  readonly pending = new Map<number, Pending>()
  readonly lockedKeys = new Set<string>()
  readonly parked = new Map<string, Array<Entry>>()
  readonly ready: Array<Entry> = []
  lost: Array<string> = []
  delayed = 0
  constructor(name: string, cursor: number) {
    this.name = name
    this.cursor = cursor
  }
}

class TopicState {
  readonly name: string
  readonly entries: Array<Entry> = []
  readonly groups = new Map<string, GroupState>()
  readonly dlq: Array<Broker.DeadLetter> = []
  duplicate = 0
  dropAck = 0
  reorderWindow = 1
  delayMs = 0
  /** Set when the topic is deleted: its deliveries can no longer be settled (groups live and die with it). */
  deleted = false
  constructor(name: string) {
    this.name = name
  }
  firstSeq(): number {
    return this.entries.length === 0 ? Number.MAX_SAFE_INTEGER : this.entries[0]!.seq
  }
  /** Index of the first entry with seq >= `seq`. */
  indexFrom(seq: number): number {
    const e = this.entries
    let lo = 0
    let hi = e.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (e[mid]!.seq < seq) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}

const closedError = (entryId: string, message: string) =>
  BrokerError.make(new BrokerError.DeliveryClosed({ entryId, message }))

const invalid = (argument: string, e: Name.InvalidName) =>
  BrokerError.make(new BrokerError.InvalidArgument({ argument, message: e.message }))

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

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

class Core {
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

  constructor(options: Options | undefined) {
    this.ordered = options?.orderedPerKey ?? false
    this.retention = options?.retention ?? Number.POSITIVE_INFINITY
    // trim at most every 100..1000 appends: the scan of what groups still need is amortised
    this.retentionSlack = Number.isFinite(this.retention)
      ? Math.max(100, Math.min(1000, Math.ceil(this.retention / 10)))
      : 0
    this.fsyncEnabled = options?.fsyncInterval !== undefined
    this.rng = (options?.seed ?? 1) >>> 0 || 1
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

class MemoryDelivery implements Broker.Delivery {
  readonly entryId: string
  readonly envelope: Envelope.Encoded
  readonly deliveryCount: number
  readonly token: number
  readonly sub: Sub
  readonly core: Core
  readonly t: TopicState
  readonly g: GroupState
  readonly p: Pending
  constructor(core: Core, sub: Sub, t: TopicState, g: GroupState, p: Pending, envelope: Envelope.Encoded) {
    this.entryId = p.entry.id
    this.envelope = envelope
    this.deliveryCount = p.count
    this.token = p.token
    this.sub = sub
    this.core = core
    this.t = t
    this.g = g
    this.p = p
  }
  get topic(): string {
    return this.sub.topic
  }
  get group(): string {
    return this.sub.group
  }
  get consumer(): string {
    return this.sub.consumer
  }

  /** Why this delivery can no longer be settled, or undefined while it can. */
  closed(): BrokerError.BrokerError | undefined {
    if (this.sub.killed) return closedError(this.entryId, "the consumer was killed")
    const { t, g, p } = this
    if (p.token !== this.token || t.deleted || g.pending.get(p.entry.seq) !== p) {
      return closedError(this.entryId, "the delivery was already settled, claimed or lost")
    }
    return undefined
  }

  /** Acks a live delivery; false when the drop-ack fault swallowed it. */
  settleAck(): boolean {
    const { t, g, p } = this
    if (t.dropAck > 0) {
      // fault: the ack is "lost on the wire"; the entry stays pending for a claim
      t.dropAck--
      p.token = 0
      return false
    }
    g.pending.delete(p.entry.seq)
    this.core.release(t, g, p.entry)
    return true
  }

  get ack(): Effect.Effect<void, BrokerError.BrokerError> {
    return Effect.suspend(() => {
      const closed = this.closed()
      if (closed !== undefined) return Effect.fail(closed)
      this.settleAck()
      return Effect.void
    })
  }

  nack(delay: Duration.Input, options?: Broker.NackOptions): Effect.Effect<void, BrokerError.BrokerError> {
    const attempt = options?.attempt
    if (attempt !== undefined && (!Number.isInteger(attempt) || attempt < 1)) {
      return Effect.fail(
        BrokerError.make(
          new BrokerError.InvalidArgument({ argument: "attempt", message: "attempt must be an integer >= 1" })
        )
      )
    }
    return Effect.flatMap(Clock.currentTimeMillis, (now) => {
      const closed = this.closed()
      if (closed !== undefined) return Effect.fail(closed)
      const { t, g, p } = this
      p.token = 0
      if (attempt !== undefined) p.attempt = attempt
      p.dueAt = now + Math.max(0, Duration.toMillis(delay))
      g.delayed++
      this.core.wake(t.name)
      return Effect.void
    })
  }

  deadLetter(reason: Broker.DeadLetterReason): Effect.Effect<void, BrokerError.BrokerError> {
    return Effect.flatMap(Clock.currentTimeMillis, (now) => {
      const closed = this.closed()
      if (closed !== undefined) return Effect.fail(closed)
      const { t, g, p } = this
      g.pending.delete(p.entry.seq)
      this.core.deadLetterEntry(t, g.name, p.entry, reason, p.count, now)
      this.core.release(t, g, p.entry)
      return Effect.void
    })
  }
}

/**
 * Builds the broker and its fault knobs in the current scope.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<
  { readonly broker: Broker.Broker["Service"]; readonly memory: MemoryBroker["Service"] },
  never,
  Scope.Scope
> =>
  Effect.gen(function* () {
    const core = new Core(options)
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        core.closed = true
        for (const s of core.subs) s.wake()
      })
    )
    if (options?.fsyncInterval !== undefined) {
      const fsync = Effect.sync(() => {
        for (const t of core.topics.values()) for (const e of t.entries) e.durable = true
      })
      yield* Effect.forkScoped(Effect.repeat(fsync, Schedule.spaced(options.fsyncInterval)))
    }

    const publish = (messages: ReadonlyArray<Envelope.Encoded>) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) => {
        if (core.closed)
          return Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
        // a batch is nearly always of one topic: each check and set below runs once per run of a topic
        let last = ""
        for (const m of messages) {
          if (m.topic === last || core.validTopics.has(m.topic)) {
            last = m.topic
            continue
          }
          const ok = Name.check("topic", m.topic)
          if (Result.isFailure(ok)) return Effect.fail(invalid("topic", ok.failure))
          core.validTopics.add(m.topic)
          last = m.topic
        }
        const ids: Array<string> = new Array(messages.length)
        const touched = new Set<string>()
        let t: TopicState | undefined
        for (let i = 0; i < messages.length; i++) {
          const m = messages[i]!
          if (t === undefined || m.topic !== t.name) {
            t = core.topic(m.topic)
            touched.add(m.topic)
          }
          ids[i] = core.append(t, m, undefined, m.key, now).id
        }
        for (const topic of touched) {
          const t = core.topics.get(topic)!
          // trim once per batch and in steps (like MAXLEN ~), so the cost is amortised
          if (t.entries.length > core.retention + core.retentionSlack) core.applyRetention(t)
          core.wakeOne(topic)
        }
        return Effect.succeed(ids)
      })

    /** Reads up to `max` deliveries for `sub`; may report events. */
    const read = (
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
    const nextWakeIn = (sub: Sub, t: TopicState, g: GroupState, claimIdle: number, now: number): number | undefined => {
      let next = Number.POSITIVE_INFINITY
      for (const p of g.pending.values()) {
        if (p.dueAt !== undefined) next = Math.min(next, p.dueAt)
        else if (p.consumer !== sub.consumer) next = Math.min(next, p.deliveredAt + claimIdle)
      }
      const i = t.indexFrom(g.cursor)
      if (i < t.entries.length && t.entries[i]!.visibleAt > now) next = Math.min(next, t.entries[i]!.visibleAt)
      return next === Number.POSITIVE_INFINITY ? undefined : Math.max(1, next - now)
    }

    const subscribe = (options: Broker.SubscribeOptions): Stream.Stream<Broker.Delivery, BrokerError.BrokerError> =>
      Stream.unwrap(
        Effect.gen(function* () {
          for (const [kind, value] of [
            ["topic", options.topic],
            ["group", options.group],
            ["consumer", options.consumer]
          ] as const) {
            const ok = Name.check(kind, value)
            if (Result.isFailure(ok)) return yield* Effect.fail(invalid(kind, ok.failure))
          }
          if (core.closed)
            return yield* Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
          const max = Math.max(1, Math.floor(options.batchSize ?? 100))
          const claimIdle = Duration.toMillis(options.claimIdle ?? "30 seconds")
          const onEvent = options.onEvent ?? Broker.logEvent
          const sub: Sub = {
            topic: options.topic,
            group: options.group,
            consumer: options.consumer,
            closed: false,
            killed: false,
            firstRead: true,
            nextClaimAt: 0,
            leftWork: false,
            batch: max,
            wake: () => {}
          }
          core.subs.add(sub)
          yield* Effect.addFinalizer(() =>
            Effect.sync(() => {
              sub.closed = true
              core.subs.delete(sub)
              // this subscription may have been woken for work it never read: pass it on
              core.wakeOne(options.topic, options.group)
            })
          )
          let t = core.topic(options.topic)
          let g = core.group(t, options.group)
          let recreations = 0

          const pull: Effect.Effect<
            readonly [Broker.Delivery, ...Array<Broker.Delivery>],
            BrokerError.BrokerError | Cause.Done
          > = Effect.gen(function* () {
            while (true) {
              if (sub.killed) {
                return yield* Effect.fail(
                  BrokerError.make(new BrokerError.ConnectionLost({ message: `consumer ${sub.consumer} was killed` }))
                )
              }
              if (core.closed) {
                return yield* Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
              }
              if (core.topics.get(options.topic) !== t || t.groups.get(options.group) !== g) {
                // the topic or the group vanished (NOGROUP): recreate from the oldest entry, with backoff
                const delay = Duration.toMillis(
                  Duration.min(Duration.times(Duration.millis(100), 2 ** Math.min(recreations, 6)), Duration.seconds(5))
                )
                recreations++
                yield* Effect.sleep(delay)
                t = core.topic(options.topic)
                g = core.group(t, options.group)
                sub.firstRead = true
                yield* onEvent({ _tag: "GroupRecreated", topic: t.name, group: g.name })
                continue
              }
              const now = yield* Clock.currentTimeMillis
              const events: Array<Broker.SubscriptionEvent> = []
              const batch = read(sub, t, g, max, claimIdle, now, events)
              for (const event of events) yield* onEvent(event)
              if (batch.length > 0) {
                recreations = 0
                // a full batch that left work behind: the next waiting reader of the group takes it
                if (sub.leftWork) core.wakeOne(t.name, g.name)
                return batch as unknown as readonly [Broker.Delivery, ...Array<Broker.Delivery>]
              }
              if (events.length > 0) continue
              const wakeIn = nextWakeIn(sub, t, g, claimIdle, now)
              const signal = core.waitFor(options.topic, sub)
              yield* wakeIn === undefined ? signal : Effect.raceFirst(signal, Effect.sleep(wakeIn))
            }
          })
          return Stream.fromPull(Effect.succeed(pull))
        })
      )

    const ackAll = (deliveries: ReadonlyArray<Broker.Delivery>) =>
      Effect.suspend(() => {
        let acked = 0
        for (const d of deliveries) {
          if (!(d instanceof MemoryDelivery) || d.core !== core) {
            return Effect.fail(
              BrokerError.make(
                new BrokerError.InvalidArgument({ argument: "deliveries", message: "a delivery of another broker" })
              )
            )
          }
          if (d.sub.killed) return Effect.fail(closedError(d.entryId, "the consumer was killed"))
          if (d.closed() !== undefined) continue
          if (d.settleAck()) acked++
        }
        return Effect.succeed(acked)
      })

    const deadLetters = (topic: string, opts?: { readonly limit?: number | undefined }) =>
      Effect.sync(() => {
        const dlq = core.topics.get(topic)?.dlq ?? []
        return opts?.limit === undefined ? dlq.slice() : dlq.slice(0, opts.limit)
      })

    const purgeDeadLetters = (topic: string, ids?: ReadonlyArray<string>) =>
      Effect.sync(() => {
        const t = core.topics.get(topic)
        if (t === undefined) return 0
        const before = t.dlq.length
        if (ids === undefined) t.dlq.length = 0
        else {
          const drop = new Set(ids)
          const keep = t.dlq.filter((d) => !drop.has(d.id))
          t.dlq.length = 0
          t.dlq.push(...keep)
        }
        return before - t.dlq.length
      })

    const faults: Faults = {
      duplicateNext: (topic, times = 1) =>
        Effect.sync(() => {
          core.topic(topic).duplicate += times
        }),
      dropNextAck: (topic, times = 1) =>
        Effect.sync(() => {
          core.topic(topic).dropAck += times
        }),
      reorder: (topic, window) =>
        Effect.sync(() => {
          core.topic(topic).reorderWindow = Math.max(1, Math.floor(window))
        }),
      delay: (topic, delay) =>
        Effect.sync(() => {
          core.topic(topic).delayMs = Duration.toMillis(delay)
        }),
      fsync: Effect.sync(() => {
        for (const t of core.topics.values()) for (const e of t.entries) e.durable = true
      }),
      restart: Effect.sync(() => {
        let lost = 0
        for (const t of core.topics.values()) {
          const keep: Array<Entry> = []
          for (const e of t.entries) {
            if (e.durable) keep.push(e)
            else {
              lost++
              e.deleted = true
              // its pending state was never durable either
              for (const g of t.groups.values()) {
                if (g.pending.delete(e.seq) && e.key !== undefined) g.lockedKeys.delete(e.key)
              }
            }
          }
          t.entries.length = 0
          t.entries.push(...keep)
          core.wake(t.name)
        }
        return lost
      }),
      deleteTopic: (topic) =>
        Effect.sync(() => {
          const t = core.topics.get(topic)
          if (t === undefined) return
          for (const e of t.entries) e.deleted = true
          t.deleted = true
          core.topics.delete(topic)
          core.wake(topic)
        }),
      trim: (topic, maxLen) =>
        Effect.sync(() => {
          const t = core.topics.get(topic)
          if (t === undefined || t.entries.length <= maxLen) return []
          const removed = t.entries.splice(0, t.entries.length - Math.max(0, maxLen))
          for (const e of removed) {
            e.deleted = true
          }
          for (const g of t.groups.values()) {
            for (const e of removed) {
              if (g.pending.delete(e.seq)) {
                g.lost.push(e.id)
                core.release(t, g, e)
              }
            }
            const gone = new Set(removed)
            const ready = g.ready.filter((e) => !gone.has(e))
            g.ready.length = 0
            g.ready.push(...ready)
          }
          core.wake(topic)
          return removed.map((e) => e.id)
        }),
      killConsumer: (topic, group, consumer) =>
        Effect.sync(() => {
          let n = 0
          for (const s of core.subs) {
            if (s.topic === topic && s.group === group && s.consumer === consumer && !s.killed) {
              s.killed = true
              n++
              s.wake()
            }
          }
          return n
        }),
      appendRaw: (topic, fields) =>
        Effect.flatMap(Clock.currentTimeMillis, (now) =>
          Effect.sync(() => {
            const entry = core.append(
              core.topic(topic),
              undefined,
              { ...fields },
              fields[Envelope.FieldNames.subject],
              now
            )
            core.wakeOne(topic)
            return entry.id
          })
        )
    }

    const memory = MemoryBroker.of({
      faults,
      pending: (topic, group) =>
        Effect.sync(() => {
          const g = core.topics.get(topic)?.groups.get(group)
          if (g === undefined) return []
          return Array.from(g.pending.values(), (p) => ({
            entryId: p.entry.id,
            messageId: envelopeOf(p.entry)?.id,
            consumer: p.consumer,
            deliveryCount: p.count,
            delayed: p.dueAt !== undefined
          }))
        }),
      length: (topic) => Effect.sync(() => core.topics.get(topic)?.entries.length ?? 0),
      groups: (topic) => Effect.sync(() => Array.from(core.topics.get(topic)?.groups.keys() ?? []))
    })

    return { broker: Broker.Broker.of({ publish, subscribe, ackAll, deadLetters, purgeDeadLetters }), memory }
  })

/**
 * The memory broker as a Layer: provides the `Broker` and its
 * {@link MemoryBroker} fault knobs.
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Broker.Broker | MemoryBroker> =>
  Layer.effectContext(
    Effect.map(make(options), ({ broker, memory }) =>
      Context.make(Broker.Broker, broker).pipe(Context.add(MemoryBroker, memory))
    )
  )
