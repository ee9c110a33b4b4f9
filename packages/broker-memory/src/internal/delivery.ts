/**
 * One delivery of the memory broker, and the batch ack. A delivery can be
 * settled while its pending record still carries its token: a redelivery, a
 * claim, a trim or a killed consumer closes it (`DeliveryClosed`).
 *
 * @internal
 */
import { type Broker, BrokerError, type Envelope } from "@converge/core"
import { Clock, Duration, Effect } from "effect"
import { closedError, type GroupState, type Pending, type Settler, type Sub, type TopicState } from "./state.ts"

/** A memory delivery: a view of one pending record at one token. */
export class MemoryDelivery implements Broker.Delivery {
  readonly entryId: string
  readonly envelope: Envelope.Encoded
  readonly deliveryCount: number
  readonly token: number
  readonly sub: Sub
  readonly core: Settler
  readonly t: TopicState
  readonly g: GroupState
  readonly p: Pending
  constructor(core: Settler, sub: Sub, t: TopicState, g: GroupState, p: Pending, envelope: Envelope.Encoded) {
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

/** Acknowledges the deliveries that can still be settled; returns how many were acked. */
export const ackAll = (core: Settler) => (deliveries: ReadonlyArray<Broker.Delivery>) =>
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
