/**
 * One delivery of the NATS layer and its settlement: `ack` is a double ack (the server confirms it), `nack`
 * a `NAK` with the delay (the server redelivers it then, its delivery count one higher; a new attempt number
 * is kept in the attempts stream, since a redelivered message is the stored one), `deadLetter` a publish to
 * the dead-letter stream (confirmed) followed by `TERM` (the server never redelivers it).
 *
 * @internal
 */
import { type Broker, BrokerError, type Envelope } from "@converge/core"
import type { JsMsg } from "@nats-io/jetstream"
import { Clock, Duration, Effect } from "effect"
import { type DeadLetterInfo, fieldsOf, toDeadLetterMessage } from "./codec.ts"
import { type Context, ensureAttempts, ensureDeadLetters, releaseDelayMs } from "./context.ts"
import { attempt, fail } from "./errors.ts"

const encoder = new TextEncoder()

/**
 * Sends an acknowledgement (`+ACK`, `-NAK {...}`, `+TERM ...`) as a request, so the server's answer confirms it
 * was processed (what `ackAck` does for `+ACK`; the client has no confirmed form of the others).
 */
export const confirmed = (ctx: Context, msg: JsMsg, what: string, payload: string) =>
  attempt(what, () =>
    ctx.connection.request((msg as unknown as { readonly reply: string }).reply, encoder.encode(payload), {
      timeout: ctx.publishTimeoutMs
    })
  ).pipe(Effect.asVoid)

/** What a subscription tracks of its deliveries: the unsettled ones, and whether it closed. */
export interface Tracker {
  readonly unsettled: Set<NatsDelivery>
  closed: boolean
}

/** A delivery read from a group's consumer. */
export class NatsDelivery implements Broker.Delivery {
  readonly entryId: string
  readonly deliveryCount: number
  readonly ctx: Context
  readonly tracker: Tracker
  readonly msg: JsMsg
  readonly envelope: Envelope.Encoded
  readonly topic: string
  readonly group: string
  readonly consumer: string
  settled = false
  constructor(
    ctx: Context,
    tracker: Tracker,
    msg: JsMsg,
    envelope: Envelope.Encoded,
    topic: string,
    group: string,
    consumer: string
  ) {
    this.ctx = ctx
    this.tracker = tracker
    this.msg = msg
    this.envelope = envelope
    this.topic = topic
    this.group = group
    this.consumer = consumer
    this.entryId = String(msg.seq)
    this.deliveryCount = msg.info.deliveryCount
  }

  /** Runs `f` once, if the delivery is still open (not settled, its subscription not closed). */
  settle<A>(what: string, f: Effect.Effect<A, BrokerError.BrokerError>): Effect.Effect<A, BrokerError.BrokerError> {
    return Effect.suspend(() => {
      if (this.settled || this.tracker.closed) {
        return fail(
          new BrokerError.DeliveryClosed({
            entryId: this.entryId,
            message: `cannot ${what} entry ${this.entryId} of ${this.topic}/${this.group}: ${this.settled ? "already settled" : "its subscription closed (the message was given back)"}`
          })
        )
      }
      this.settled = true
      this.tracker.unsettled.delete(this)
      return f
    })
  }

  get ack(): Effect.Effect<void, BrokerError.BrokerError> {
    return this.settle("ack", attempt("ack", () => this.msg.ackAck()).pipe(Effect.asVoid))
  }

  nack(delay: Duration.Input, options?: Broker.NackOptions): Effect.Effect<void, BrokerError.BrokerError> {
    const ms = Math.max(0, Math.round(Duration.toMillis(Duration.fromInputUnsafe(delay))))
    const next = options?.attempt
    const self = this
    return this.settle(
      "nack",
      Effect.gen(function* () {
        if (next !== undefined && next !== self.envelope.attempt) {
          yield* ensureAttempts(self.ctx)
          yield* attempt("attempt record", () =>
            self.ctx.js.publish(self.ctx.names.attemptSubject(self.topic, self.group, self.msg.seq), String(next), {
              timeout: self.ctx.publishTimeoutMs
            })
          )
        }
        // at least 1 ms: a NAK without delay, sent while no pull wants the message, is not counted as a
        // delivery by the 2.9 server
        yield* confirmed(self.ctx, self.msg, "nak", `-NAK ${JSON.stringify({ delay: Math.max(1, ms) * 1_000_000 })}`)
      })
    )
  }

  deadLetter(reason: Broker.DeadLetterReason): Effect.Effect<void, BrokerError.BrokerError> {
    const self = this
    return this.settle(
      "dead-letter",
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeMillis
        const info: DeadLetterInfo = {
          reason: reason.reason,
          error: reason.error,
          group: self.group,
          entry: self.entryId,
          attempts: reason.attempts ?? self.envelope.attempt,
          deliveries: self.deliveryCount,
          time: new Date(now).toISOString()
        }
        yield* ensureDeadLetters(self.ctx)
        const { headers, data } = toDeadLetterMessage(fieldsOf(self.msg.headers, self.msg.data), info)
        yield* attempt("dead-letter publish", () =>
          self.ctx.js.publish(self.ctx.names.dlqSubject(self.topic), data, {
            headers,
            timeout: self.ctx.publishTimeoutMs
          })
        )
        // a plain +TERM: servers before 2.10 do not read a reason after it (and ignore the whole ack); the reason
        // is in the dead-letter entry
        yield* confirmed(self.ctx, self.msg, "term", "+TERM")
      })
    )
  }

  /**
   * Gives the message back (subscription closing): redelivered to the group's other consumers after
   * `releaseDelayMs`, once the closing subscription's last pull request has expired on the server.
   */
  release(): void {
    if (this.settled) return
    this.settled = true
    this.msg.nak(releaseDelayMs)
  }
}

/**
 * Acknowledges deliveries: one `ACK` each, then one round trip (`flush`) to know the server has them; the
 * ones that can no longer be settled are skipped. Returns how many were acknowledged.
 */
export const ackAll =
  (ctx: Context) =>
  (deliveries: ReadonlyArray<Broker.Delivery>): Effect.Effect<number, BrokerError.BrokerError> =>
    Effect.suspend(() => {
      let n = 0
      for (const d of deliveries) {
        if (!(d instanceof NatsDelivery) || d.settled || d.tracker.closed) continue
        d.settled = true
        d.tracker.unsettled.delete(d)
        d.msg.ack()
        n++
      }
      return n === 0
        ? Effect.succeed(0)
        : Effect.as(
            attempt("ack", () => ctx.connection.flush()),
            n
          )
    })
