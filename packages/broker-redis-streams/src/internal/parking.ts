/**
 * Per-key parking of an ordered subscription: one message of a key in flight or backing off at a time. A
 * delivery whose key is blocked is parked (it stays pending to this consumer) and released, in order, when
 * the head of its key settles; a key whose head was nacked stays blocked until its redelivery comes back
 * from the retry stream.
 *
 * The state is kept per partition and belongs to the partition's lease (docs/reliability.md, trap 12): it
 * is dropped when the lease goes (lost, or given back) and rebuilt from Redis when a lease is taken (the
 * delayed set says which keys back off). A settlement of a delivery read under an earlier lease of its
 * partition changes nothing here.
 *
 * @internal
 */
import type { Broker } from "@converge/core"
import type { RedisDelivery } from "./delivery.ts"

/** The parking state of one partition, under one lease. */
interface PartitionState {
  /** The lease token this state belongs to. */
  readonly token: string
  /** key -> entry id in flight, or "delayed" while its head backs off */
  readonly blocked: Map<string, string>
  /** key -> deliveries waiting behind the head, in order */
  readonly parked: Map<string, Array<RedisDelivery>>
  /** deliveries out and not settled */
  inFlight: number
}

/** The parking state of one subscription. */
export class Parking {
  readonly partitions = new Map<number, PartitionState>()
  /** deliveries released by settlements, handed out at the next pull */
  readonly released: Array<Broker.Delivery> = []
  /** wakes a pull that waits on a blocked read when something is released */
  wakeReleased: (() => void) | undefined = undefined

  /** Starts the state of a partition under a new lease (anything kept from an earlier lease is dropped). */
  open(index: number, token: string): void {
    this.drop(index)
    this.partitions.set(index, { token, blocked: new Map(), parked: new Map(), inFlight: 0 })
  }

  /** Drops the state of a partition whose lease went: its parked and released deliveries are not handed out. */
  drop(index: number): void {
    this.partitions.delete(index)
    for (let i = this.released.length - 1; i >= 0; i--) {
      if ((this.released[i] as RedisDelivery).part.index === index) this.released.splice(i, 1)
    }
  }

  /** The state a delivery belongs to, if it was read under the partition's current lease. */
  private stateOf(d: RedisDelivery): PartitionState | undefined {
    const state = this.partitions.get(d.part.index)
    return state !== undefined && state.token === d.token ? state : undefined
  }

  /** Settlement of a delivery (from `RedisDelivery.settled`): release the next message of its key. */
  readonly onSettled = (d: RedisDelivery, outcome: "done" | "delayed"): void => {
    const state = this.stateOf(d)
    if (state === undefined) return
    state.inFlight = Math.max(0, state.inFlight - 1)
    const key = d.envelope.key
    if (key === undefined || state.blocked.get(key) !== d.entryId) return
    if (outcome === "delayed") {
      state.blocked.set(key, "delayed")
      return
    }
    const queue = state.parked.get(key)
    const next = queue?.shift()
    if (queue !== undefined && queue.length === 0) state.parked.delete(key)
    if (next === undefined) {
      state.blocked.delete(key)
      return
    }
    state.blocked.set(key, next.entryId)
    state.inFlight++
    this.released.push(next)
    this.wakeReleased?.()
  }

  /**
   * True when the delivery may go out now; false when it is parked behind its key, or was read under a lease
   * this subscription no longer holds (it stays pending, for the partition's owner).
   */
  admit(d: RedisDelivery): boolean {
    const state = this.stateOf(d)
    if (state === undefined) return false
    d.onSettled = this.onSettled
    const key = d.envelope.key
    const b = key === undefined ? undefined : state.blocked.get(key)
    if (key !== undefined && b !== undefined && b !== d.entryId && !(b === "delayed" && d.fromRetry)) {
      const queue = state.parked.get(key)
      if (queue === undefined) state.parked.set(key, [d])
      else if (!queue.some((q) => q.entryId === d.entryId)) queue.push(d)
      return false
    }
    if (key !== undefined) state.blocked.set(key, d.entryId)
    state.inFlight++
    return true
  }

  /** A key whose head waits in the partition's delayed set (found when its lease is taken): later messages wait. */
  blockDelayed(index: number, key: string): void {
    this.partitions.get(index)?.blocked.set(key, "delayed")
  }

  /** True while something of partition `index` is in flight or parked (its lease is not given back). */
  busy(index: number): boolean {
    const state = this.partitions.get(index)
    if (state === undefined) return false
    if (state.inFlight > 0) return true
    for (const queue of state.parked.values()) if (queue.length > 0) return true
    return false
  }

  /** Takes what settlements released. */
  takeReleased(): ReadonlyArray<Broker.Delivery> {
    return this.released.splice(0, this.released.length)
  }
}
