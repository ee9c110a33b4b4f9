/**
 * Per-key parking of an ordered subscription: one message of a key in
 * flight or backing off at a time. A delivery whose key is blocked is parked
 * (it stays pending to this consumer) and released, in order, when the head
 * of its key settles; a key whose head was nacked stays blocked until its
 * redelivery comes back from the retry stream.
 *
 * @internal
 */
import type { Broker } from "@converge/core"
import type { RedisDelivery } from "./delivery.ts"

/** The parking state of one subscription. */
export class Parking {
  /** key -> entry id in flight, or "delayed" while its head backs off */
  readonly blocked = new Map<string, string>()
  /** key -> deliveries waiting behind the head, in order */
  readonly parked = new Map<string, Array<RedisDelivery>>()
  /** deliveries released by settlements, handed out at the next pull */
  readonly released: Array<Broker.Delivery> = []
  /** partition -> deliveries out and not settled */
  readonly inFlight = new Map<number, number>()
  /** wakes a pull that waits on a blocked read when something is released */
  wakeReleased: (() => void) | undefined = undefined

  /** Settlement of a delivery (from `RedisDelivery.settled`): release the next message of its key. */
  readonly onSettled = (d: RedisDelivery, outcome: "done" | "delayed"): void => {
    this.inFlight.set(d.part.index, Math.max(0, (this.inFlight.get(d.part.index) ?? 0) - 1))
    const key = d.envelope.key
    if (key === undefined || this.blocked.get(key) !== d.entryId) return
    if (outcome === "delayed") {
      this.blocked.set(key, "delayed")
      return
    }
    const queue = this.parked.get(key)
    const next = queue?.shift()
    if (queue !== undefined && queue.length === 0) this.parked.delete(key)
    if (next === undefined) {
      this.blocked.delete(key)
      return
    }
    this.blocked.set(key, next.entryId)
    this.inFlight.set(next.part.index, (this.inFlight.get(next.part.index) ?? 0) + 1)
    this.released.push(next)
    this.wakeReleased?.()
  }

  /** True when the delivery may go out now; otherwise it is parked behind its key. */
  admit(d: RedisDelivery): boolean {
    d.onSettled = this.onSettled
    const key = d.envelope.key
    const b = key === undefined ? undefined : this.blocked.get(key)
    if (key !== undefined && b !== undefined && b !== d.entryId && !(b === "delayed" && d.fromRetry)) {
      const queue = this.parked.get(key)
      if (queue === undefined) this.parked.set(key, [d])
      else if (!queue.some((q) => q.entryId === d.entryId)) queue.push(d)
      return false
    }
    if (key !== undefined) this.blocked.set(key, d.entryId)
    this.inFlight.set(d.part.index, (this.inFlight.get(d.part.index) ?? 0) + 1)
    return true
  }

  /** A key whose head waits in the delayed set (found at a takeover): its later messages wait. */
  blockDelayed(key: string): void {
    this.blocked.set(key, "delayed")
  }

  /** True while something of partition `index` is in flight or parked (it cannot be given back). */
  busy(index: number): boolean {
    if ((this.inFlight.get(index) ?? 0) > 0) return true
    for (const queue of this.parked.values()) if (queue.some((d) => d.part.index === index)) return true
    return false
  }

  /** Takes what settlements released. */
  takeReleased(): ReadonlyArray<Broker.Delivery> {
    return this.released.splice(0, this.released.length)
  }
}
