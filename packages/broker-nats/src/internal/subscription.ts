/**
 * The read loop of one subscription: the group's durable consumer, read with the client's `consume()` (it
 * keeps pull requests open and refills them, and recovers its pulls across reconnects), bridged into a
 * bounded queue so a read never runs further ahead than one batch; attempt numbers of nacked messages
 * looked up for redeliveries; malformed messages dead-lettered on receipt; a consumer or stream deleted
 * under the subscription recreated with backoff; and on close the unsettled messages given back (`NAK` with
 * `releaseDelayMs`, past the life of the subscription's last pull request), so the group's other consumers get
 * them without waiting for `claimIdle`. Ordered: one consumer (and session) per partition.
 *
 * @internal
 */
import { Broker, BrokerError, Envelope } from "@converge/core"
import type { ConsumerMessages, JsMsg } from "@nats-io/jetstream"
import { Duration, Effect, Queue, Result, Stream } from "effect"
import { fieldsOf } from "./codec.ts"
import { type Context, ensureAttempts, ensureGroup, ensureTopic, pullExpiresMs, releaseDelayMs } from "./context.ts"
import { NatsDelivery, type Tracker } from "./delivery.ts"
import { attempt, fail } from "./errors.ts"

const decoder = new TextDecoder()

export const subscribe = (
  ctx: Context,
  sub: Broker.SubscribeOptions
): Stream.Stream<Broker.Delivery, BrokerError.BrokerError> =>
  Stream.unwrap(
    Effect.gen(function* () {
      yield* Broker.checkSubscribe(sub, 10_000)
      const batch = sub.batchSize ?? 100
      const ackWaitMs = Math.max(
        1,
        Math.round(Duration.toMillis(Duration.fromInputUnsafe(sub.claimIdle ?? "30 seconds")))
      )
      const onEvent = sub.onEvent ?? Broker.logEvent
      const stream = ctx.names.stream(sub.topic)
      const durables = ctx.ordered
        ? Array.from({ length: ctx.partitions }, (_, i) => ctx.names.partitionDurable(sub.group, i))
        : [ctx.names.durable(sub.group)]
      const ensure = Effect.andThen(ensureTopic(ctx, sub.topic), ensureGroup(ctx, sub.topic, sub.group, ackWaitMs))
      yield* ensure

      const tracker: Tracker = { unsettled: new Set(), closed: false }
      const queue = yield* Queue.bounded<JsMsg, BrokerError.BrokerError>(batch)
      // the consume sessions (one per consumer: per partition when ordered) and their iterators
      const sessions = new Map<
        string,
        { readonly messages: ConsumerMessages; readonly iterator: AsyncIterator<JsMsg> }
      >()
      yield* Effect.addFinalizer(() =>
        Effect.gen(function* () {
          tracker.closed = true
          // stop pulling first, so nothing given back is delivered to this subscription again; `close()` settles
          // once the iterator is read to its end (below), so it is not awaited first
          const open = Array.from(sessions.values())
          sessions.clear()
          const closing = open.map((o) => o.messages.close().catch(() => undefined))
          // give back what was read and never settled, what waits in the queue, and what the client still holds
          for (const d of tracker.unsettled) d.release()
          tracker.unsettled.clear()
          for (const m of yield* Queue.clear(queue).pipe(Effect.orElseSucceed(() => [] as Array<JsMsg>))) {
            m.nak(releaseDelayMs)
          }
          yield* Effect.promise(() =>
            Promise.all(
              open.map(async ({ iterator }) => {
                for (let r = await iterator.next(); r.done !== true; r = await iterator.next()) {
                  r.value.nak(releaseDelayMs)
                }
              })
            ).then(() => Promise.all(closing))
          ).pipe(Effect.timeout("1 second"), Effect.ignore)
          yield* Effect.promise(() => ctx.connection.flush().catch(() => undefined))
        })
      )

      /** One `consume()` session of a consumer fed into the queue; ends when the consumer or its stream is gone. */
      const session = (durable: string) =>
        Effect.gen(function* () {
          const consumer = yield* attempt("consumer get", () => ctx.js.consumers.get(stream, durable))
          const messages = yield* attempt("consume", () =>
            // pull requests of 1 s (the client refills them): a request outlives its session by at most that
            // long on the server, where a message given back at close could be handed to it (`releaseDelayMs`)
            consumer.consume({ max_messages: batch, expires: pullExpiresMs, abort_on_missing_resource: true })
          )
          const it = messages[Symbol.asyncIterator]()
          sessions.set(durable, { messages, iterator: it })
          while (!tracker.closed) {
            // a message arriving once the subscription closed (this read was cut off) is given back at once
            const next = yield* attempt("consume", () =>
              it.next().then((r) => {
                if (tracker.closed && r.done !== true) r.value.nak(releaseDelayMs)
                return r
              })
            )
            if (next.done === true || tracker.closed) break
            const m = next.value
            yield* Queue.offer(queue, m).pipe(Effect.onInterrupt(() => Effect.sync(() => m.nak(releaseDelayMs))))
          }
        })
      const feeder = (durable: string) =>
        Effect.gen(function* () {
          let recreations = 0
          while (!tracker.closed) {
            const ended = yield* Effect.result(session(durable))
            if (tracker.closed || ctx.isClosed()) return
            // the consumer or its stream was deleted (or the session failed): recreate, with backoff
            const delay = Math.min(100 * 2 ** Math.min(recreations, 6), 5_000)
            recreations++
            yield* Effect.logWarning(
              `nats: the consume session of ${sub.topic}/${sub.group} (${durable}) ended${Result.isFailure(ended) ? `: ${ended.failure.message}` : ""}; recreating in ${delay} ms`
            )
            yield* Effect.sleep(delay)
            ctx.streams.delete(stream)
            const again = yield* Effect.result(ensure)
            if (Result.isSuccess(again)) yield* onEvent({ _tag: "GroupRecreated", topic: sub.topic, group: sub.group })
          }
        })
      for (const durable of durables) yield* Effect.forkScoped(feeder(durable))

      /** Attempt numbers recorded by nacks, for redelivered messages. */
      const attemptsOf = (msgs: ReadonlyArray<JsMsg>) =>
        Effect.gen(function* () {
          const out = new Map<number, number>()
          const redelivered = msgs.filter((m) => m.info.deliveryCount > 1)
          if (redelivered.length === 0) return out
          yield* ensureAttempts(ctx)
          yield* Effect.forEach(
            redelivered,
            (m) =>
              attempt("attempt lookup", () =>
                ctx.jsm.direct.getMessage(ctx.names.attemptsStream, {
                  last_by_subj: ctx.names.attemptSubject(sub.topic, sub.group, m.seq)
                })
              ).pipe(
                Effect.map((stored) => (stored === null ? out : out.set(m.seq, Number(decoder.decode(stored.data))))),
                Effect.catch(() => Effect.void)
              ),
            { concurrency: 16, discard: true }
          )
          return out
        })

      type Batch = readonly [Broker.Delivery, ...Array<Broker.Delivery>]
      const pull: Effect.Effect<Batch, BrokerError.BrokerError> = Effect.gen(function* () {
        while (true) {
          if (ctx.isClosed())
            return yield* fail(new BrokerError.BrokerClosed({ message: "the broker layer was shut down" }))
          const msgs = yield* Queue.takeBetween(queue, 1, batch)
          const attempts = yield* attemptsOf(msgs)
          const out: Array<Broker.Delivery> = []
          for (const m of msgs) {
            const read = Envelope.fromFields(fieldsOf(m.headers, m.data))
            if (Result.isFailure(read)) {
              const malformed = new NatsDelivery(
                ctx,
                tracker,
                m,
                Broker.malformedEnvelope,
                sub.topic,
                sub.group,
                sub.consumer
              )
              yield* malformed.deadLetter({ reason: "malformed", error: read.failure.message, attempts: 0 })
              yield* onEvent({
                _tag: "Malformed",
                topic: sub.topic,
                entryId: String(m.seq),
                reason: read.failure.message
              })
              continue
            }
            const recorded = attempts.get(m.seq)
            const envelope = recorded === undefined ? read.success : { ...read.success, attempt: recorded }
            const d = new NatsDelivery(ctx, tracker, m, envelope, sub.topic, sub.group, sub.consumer)
            tracker.unsettled.add(d)
            out.push(d)
          }
          if (out.length > 0) return out as unknown as Batch
        }
      })
      return Stream.fromPull(Effect.succeed(pull))
    })
  )
