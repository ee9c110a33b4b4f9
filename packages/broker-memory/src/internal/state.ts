/**
 * The memory broker's state: topics with their entries, consumer groups with
 * their pending lists and per-key parking, subscriptions and their waiting
 * readers. Plain mutable data, changed only by the engine, the deliveries and
 * the fault knobs.
 *
 * @internal
 */
import { type Broker, BrokerError, Envelope, type Name } from "@converge/core"
import { Result } from "effect"

/** A stored entry. */
export interface Entry {
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
export const fieldsOf = (entry: Entry): Envelope.Fields => entry.raw ?? Envelope.toFields(entry.envelope!)

/** Reads a raw entry as an envelope once; returns the envelope or undefined when malformed. */
export const envelopeOf = (entry: Entry): Envelope.Encoded | undefined => {
  if (entry.envelope !== undefined || entry.malformed !== undefined) return entry.envelope
  const read = Envelope.fromFields(entry.raw!)
  if (Result.isSuccess(read)) entry.envelope = read.success
  else entry.malformed = read.failure.message
  return entry.envelope
}

export interface Pending {
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

export interface Sub {
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
export interface Waiter {
  readonly sub: Sub
  /** Resumes the reader now, inside the caller, and removes the waiter. */
  readonly now: () => void
  /**
   * Resumes the reader at the waiting fiber's dispatcher's next turn, i.e. after the caller yields. The
   * waiter stays listed until then, so another wake-up can still make it `now`; calling it again is a no-op.
   */
  readonly soon: () => void
}

export class GroupState {
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

export class TopicState {
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

export const closedError = (entryId: string, message: string) =>
  BrokerError.make(new BrokerError.DeliveryClosed({ entryId, message }))

export const invalid = (argument: string, e: Name.InvalidName) =>
  BrokerError.make(new BrokerError.InvalidArgument({ argument, message: e.message }))

/** What a delivery needs of the engine to settle (the engine implements it; passed in, never imported). */
export interface Settler {
  /** Hands a key to its next parked message, or unlocks it. */
  readonly release: (t: TopicState, g: GroupState, entry: Entry) => void
  /** Appends an entry to the topic's dead-letter queue. */
  readonly deadLetterEntry: (
    t: TopicState,
    group: string,
    entry: Entry,
    reason: Broker.DeadLetterReason,
    count: number,
    now: number
  ) => void
  /** Wakes every waiting reader of a topic. */
  readonly wake: (topic: string) => void
}
