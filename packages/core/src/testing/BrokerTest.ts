/**
 * `BrokerTest` — the broker conformance suite (cases C01–C27; each case's
 * name says what it checks). Every broker layer, a custom one included, runs
 * it in one line from a vitest file:
 *
 * ```ts
 * import { BrokerTest } from "@converge/core/testing"
 * import { MemoryBroker } from "@converge/broker-memory"
 *
 * BrokerTest.suite("memory", MemoryBroker.layer({ orderedPerKey: true }), {
 *   clock: "test", persistent: true, orderedPerKey: true, delayedDelivery: true
 * })
 * ```
 *
 * A layer declares what it supports with {@link Features}; the suite skips
 * only what a layer lacks, and every skipped case says why in its name.
 * The layer is built afresh for every case, and every case uses topic names
 * of its own.
 *
 * @since 0.1.0
 */

import { randomUUID } from "node:crypto"
import { assert, describe, it } from "@effect/vitest"
import {
  Cause,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  type Layer,
  Ref,
  Result,
  Schema,
  type Scope,
  Stream
} from "effect"
import { TestClock } from "effect/testing"
import * as Broker from "../Broker.ts"
import * as BrokerError from "../BrokerError.ts"
import * as Envelope from "../Envelope.ts"
import * as Name from "../Name.ts"
import * as Topic from "../Topic.ts"

// Settling from the exit of a handler, as the `Consumer` runtime does, in the few lines a conformance case
// needs: success → ack (or one `ackAll` per read), typed failure → the settlement `onFailure` picks,
// interruption → nothing (the message stays pending).

/** How a failed delivery is settled. */
type Settlement =
  | { readonly _tag: "Nack"; readonly delay: Duration.Input }
  | { readonly _tag: "DeadLetter"; readonly reason: Broker.DeadLetterReason }

const nack = (delay: Duration.Input = 0): Settlement => ({ _tag: "Nack", delay })

const settle = (delivery: Broker.Delivery, settlement: Settlement): Effect.Effect<void, BrokerError.BrokerError> =>
  settlement._tag === "Nack" ? delivery.nack(settlement.delay) : delivery.deadLetter(settlement.reason)

const processOne = <E>(
  delivery: Broker.Delivery,
  effect: Effect.Effect<void, E>,
  onFailure: (cause: Cause.Cause<E>) => Settlement = () => nack(0)
): Effect.Effect<void, E | BrokerError.BrokerError> =>
  Effect.matchCauseEffect(effect, {
    onSuccess: () => delivery.ack,
    onFailure: (cause) =>
      Cause.hasInterruptsOnly(cause)
        ? Effect.failCause(cause)
        : Effect.andThen(Effect.uninterruptible(settle(delivery, onFailure(cause))), Effect.failCause(cause))
  })

const processAll = <E>(
  broker: Broker.Broker["Service"],
  deliveries: ReadonlyArray<Broker.Delivery>,
  handle: (delivery: Broker.Delivery) => Effect.Effect<void, E>,
  onFailure: (cause: Cause.Cause<E>) => Settlement = () => nack(0)
): Effect.Effect<number, BrokerError.BrokerError> =>
  Effect.suspend(() => {
    const done: Array<Broker.Delivery> = []
    const one = (d: Broker.Delivery): Effect.Effect<void, BrokerError.BrokerError> =>
      Effect.matchCauseEffect(handle(d), {
        onSuccess: () => {
          done.push(d)
          return Effect.void
        },
        onFailure: (cause) =>
          Cause.hasInterruptsOnly(cause) ? Effect.interrupt : Effect.uninterruptible(settle(d, onFailure(cause)))
      })
    return Effect.andThen(
      Effect.forEach(deliveries, one, { discard: true }),
      Effect.suspend(() => (done.length === 0 ? Effect.succeed(0) : broker.ackAll(done)))
    )
  })

/**
 * What a broker layer supports, and the hooks the suite needs for the cases
 * that simulate faults. A missing hook or a `false` skips the cases that need
 * it, with the reason in the case name.
 *
 * @since 0.1.0
 */
export interface Features<R> {
  /**
   * `"test"`: the layer reads `Clock`, and the suite drives time with
   * `TestClock`. `"live"`: real time (a real server).
   */
  readonly clock: "test" | "live"
  /** Messages survive consumer close and reopen (C06, C10, C13, C16). */
  readonly persistent: boolean
  /** Per-key order within a group (C05's ordered branch, C09). */
  readonly orderedPerKey: boolean
  /** Nack with a delay (C19). */
  readonly delayedDelivery: boolean
  /** `Broker.topics` and `Broker.groupStats`, the optional operator views (C27). */
  readonly operatorViews?: boolean | undefined
  /** Restarts the broker (C14). */
  readonly restart?: Effect.Effect<void, unknown, R> | undefined
  /** Deletes a topic's storage under running consumers (C21). */
  readonly deleteTopic?: ((topic: string) => Effect.Effect<void, unknown, R>) | undefined
  /** Trims a topic to its newest `maxLen` entries, pending ones included (C22). */
  readonly trim?: ((topic: string, maxLen: number) => Effect.Effect<void, unknown, R>) | undefined
  /** Writes raw fields as an entry, as a foreign client could (C23). */
  readonly appendRaw?: ((topic: string, fields: Envelope.Fields) => Effect.Effect<void, unknown, R>) | undefined
  /**
   * A claim never hands a message back to the consumer that still holds it (default true). A broker whose
   * server redelivers an expired message to whichever pull asks first (NATS JetStream) sets `false`: the
   * holder's own open pull may take it, which counts as a delivery, so C17's exact delivery count does not
   * hold there.
   */
  readonly claimSkipsHolder?: boolean | undefined
  /** Claim idle time used by the claim cases (default 1 second). */
  readonly claimIdle?: Duration.Input | undefined
  /** Register only these cases (e.g. `["C14"]` for a second run against a special server). */
  readonly only?: ReadonlyArray<string> | undefined
}

const Payload = Schema.Struct({ n: Schema.Number, text: Schema.String })
type Payload = typeof Payload.Type

let topicCounter = 0
const uniqueTopic = (caseId: string): string => `${caseId}-${randomUUID().slice(0, 8)}-${(topicCounter++).toString(36)}`

/**
 * Encoded messages for a topic: payload `{ n, text }`, key from `keyOf`.
 *
 * @since 0.1.0
 */
export const messages = (
  topicName: string,
  count: number,
  options?: {
    readonly keyOf?: ((n: number) => string | undefined) | undefined
    readonly headers?: Readonly<Record<string, string>> | undefined
    readonly text?: string | undefined
    readonly from?: number | undefined
  }
): Array<Envelope.Encoded> => {
  const topic = Topic.make(topicName, Payload)
  const out: Array<Envelope.Encoded> = []
  const from = options?.from ?? 0
  for (let n = from; n < from + count; n++) {
    const envelope = Envelope.makeUnsafeResult(
      topic,
      { n, text: options?.text ?? `message ${n}` },
      1_700_000_000_000 + n,
      {
        key: options?.keyOf?.(n),
        headers: options?.headers,
        correlationId: `corr-${n}`
      }
    )
    if (Result.isFailure(envelope)) throw envelope.failure
    const encoded = Envelope.encodeResult(topic, envelope.success)
    if (Result.isFailure(encoded)) throw encoded.failure
    out.push(encoded.success)
  }
  return out
}

const payloadOf = (d: Broker.Delivery): Payload => JSON.parse(d.envelope.data) as Payload

/**
 * Registers the conformance suite for a broker layer.
 *
 * @since 0.1.0
 */
export const suite = <R, E>(name: string, layer: Layer.Layer<Broker.Broker | R, E>, features: Features<R>): void => {
  const live = features.clock === "live"
  const claimIdle = features.claimIdle ?? "1 second"
  const claimIdleMs = Duration.toMillis(claimIdle)

  /** Lets time pass: `TestClock.adjust` under the test clock, a real sleep otherwise. */
  const pass = (d: Duration.Input): Effect.Effect<void> => (live ? Effect.sleep(d) : TestClock.adjust(d))
  /** Gives background consumers a chance to run (and, live, to do a broker round trip). */
  const quiesce: Effect.Effect<void> = live
    ? Effect.sleep("150 millis")
    : Effect.repeat(Effect.yieldNow, { times: 50 }).pipe(Effect.asVoid)
  /** Waits until `cond` holds, letting time pass in small steps; fails the case after `limit`. */
  const eventually = <A, E, R>(read: Effect.Effect<A, E, R>, cond: (a: A) => boolean, what: string, limit = 20_000) =>
    Effect.gen(function* () {
      const step = 25
      for (let waited = 0; ; waited += step) {
        const value = yield* read
        if (cond(value)) return value
        if (waited >= limit)
          return yield* Effect.die(new Error(`timed out waiting for: ${what}; last: ${JSON.stringify(value)}`))
        yield* live ? Effect.sleep(step) : Effect.andThen(quiesce, TestClock.adjust(step))
      }
    })

  type Body = Effect.Effect<void, unknown, Broker.Broker | R | Scope.Scope>
  // what this registration ran, skipped (and why) and left out by `only`: stated by the summary case, so a
  // layer without hooks or features cannot look conformant by omission
  const ran: Array<string> = []
  const skipped: Array<{ readonly id: string; readonly reason: string }> = []
  const notSelected: Array<string> = []
  const run = (id: string, title: string, body: Body, skip?: string | false) => {
    if (features.only !== undefined && !features.only.includes(id)) {
      notSelected.push(id)
      return
    }
    const label = `${id} ${title}`
    if (skip) {
      skipped.push({ id, reason: skip })
      it.skip(`${label} [skipped: ${skip}]`, () => {})
      return
    }
    ran.push(id)
    const test = live ? it.live : it.effect
    // the case's own scope closes (consumers interrupted) before the layer is torn down
    test(
      label,
      () => Effect.provide(Effect.scoped(body), layer) as Effect.Effect<void, unknown, Scope.Scope>,
      live ? 60_000 : 30_000
    )
  }

  interface Received {
    readonly deliveries: Ref.Ref<Array<Broker.Delivery>>
    readonly fiber: Fiber.Fiber<void, unknown>
  }

  /**
   * Runs a consumer in the background: every delivery is recorded, then
   * processed by `handler` (default: succeed → ack). Handler failures settle
   * by `onFailure` and do not stop the consumer.
   */
  const consume = (
    options: Broker.SubscribeOptions,
    handler: (d: Broker.Delivery) => Effect.Effect<void, unknown> = () => Effect.void,
    onFailure?: (cause: Cause.Cause<unknown>) => Settlement,
    /** Settle whole reads with `processAll` (one `ackAll` per read) instead of one `processOne` each. */
    mode: "each" | "batch" = "each"
  ) =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const deliveries = yield* Ref.make<Array<Broker.Delivery>>([])
      const ignoreFailures = Effect.catchCause((cause: Cause.Cause<unknown>) =>
        Cause.hasInterruptsOnly(cause) ? Effect.failCause(cause) : Effect.void
      )
      const fiber = yield* (
        mode === "each"
          ? broker
              .subscribe(options)
              .pipe(
                Stream.runForEach((d) =>
                  Ref.update(deliveries, (all) => [...all, d]).pipe(
                    Effect.andThen(processOne(d, handler(d), onFailure)),
                    ignoreFailures
                  )
                )
              )
          : broker
              .subscribe(options)
              .pipe(
                Stream.runForEachArray((ds) =>
                  Ref.update(deliveries, (all) => [...all, ...ds]).pipe(
                    Effect.andThen(processAll(broker, ds, handler, onFailure)),
                    ignoreFailures
                  )
                )
              )
      ).pipe(Effect.forkScoped)
      return { deliveries, fiber } satisfies Received
    })

  const countOf = (r: Received) => Effect.map(Ref.get(r.deliveries), (all) => all.length)
  const payloadsOf = (r: Received) => Effect.map(Ref.get(r.deliveries), (all) => all.map(payloadOf))
  const publish = (batch: ReadonlyArray<Envelope.Encoded>) => Effect.flatMap(Broker.Broker, (b) => b.publish(batch))
  const sorted = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)
  const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i)

  describe(`BrokerTest.suite(${name})`, () => {
    run(
      "C01",
      "publish/subscribe 100 messages: all received, payloads and headers equal; closing ends the stream",
      Effect.gen(function* () {
        const topic = uniqueTopic("c01")
        const sent = messages(topic, 100, { keyOf: (n) => `k${n % 7}`, headers: { tenant: "acme", region: "eu1" } })
        const ids = yield* publish(sent)
        assert.strictEqual(ids.length, 100)
        assert.strictEqual(new Set(ids).size, 100, "entry ids are distinct")
        const r = yield* consume({ topic, group: "g", consumer: "c1" })
        yield* eventually(countOf(r), (n) => n >= 100, "100 deliveries")
        const got = yield* Ref.get(r.deliveries)
        assert.deepStrictEqual(
          got.map((d) => d.envelope),
          sent,
          "every envelope arrives equal to what was published, in order"
        )
        for (const d of got) assert.strictEqual(d.deliveryCount, 1)
        // closing ends the stream (the interruption completes, finalizers ran), and the closed
        // subscription takes nothing more: a message published afterwards goes to the next consumer
        yield* Fiber.interrupt(r.fiber)
        yield* publish(messages(topic, 1, { from: 100 }))
        const next = yield* consume({ topic, group: "g", consumer: "c2" })
        yield* eventually(countOf(next), (n) => n >= 1, "the message published after the close")
        assert.deepStrictEqual(
          (yield* payloadsOf(next)).map((p) => p.n),
          [100]
        )
        assert.strictEqual(yield* countOf(r), 100, "the closed subscription received nothing more")
      })
    )

    run(
      "C02",
      "concurrent: 50 publishers, 5 000 messages, 10 competing consumers: all received",
      Effect.gen(function* () {
        const topic = uniqueTopic("c02")
        // settled a read at a time with processAll / ackAll
        const consumers = yield* Effect.forEach(range(0, 10), (i) =>
          consume({ topic, group: "g", consumer: `c${i}` }, undefined, undefined, "batch")
        )
        yield* Effect.forEach(range(0, 50), (p) => publish(messages(topic, 100, { from: p * 100 })), {
          concurrency: "unbounded"
        })
        const total = Effect.map(Effect.forEach(consumers, countOf), (ns) => ns.reduce((a, b) => a + b, 0))
        yield* eventually(total, (n) => n >= 5000, "5 000 deliveries")
        const all = (yield* Effect.forEach(consumers, payloadsOf)).flat().map((p) => p.n)
        assert.deepStrictEqual(sorted([...new Set(all)]), range(0, 5000), "every message was received")
        assert.strictEqual(all.length, 5000, "no message was delivered twice without a failure")
        const busy = (yield* Effect.forEach(consumers, countOf)).filter((n) => n > 0).length
        assert.isAtLeast(busy, 2, "consumers of one group share the work")
      })
    )

    run(
      "C03",
      "many topics at once: each topic gets all and only its messages",
      Effect.gen(function* () {
        const topics = range(0, 5).map(() => uniqueTopic("c03"))
        const consumers = yield* Effect.forEach(topics, (topic) => consume({ topic, group: "g", consumer: "c" }))
        // one batch spanning every topic, interleaved
        const batch = range(0, 50).flatMap((i) => topics.map((t) => messages(t, 1, { from: i })[0]!))
        yield* publish(batch)
        for (let i = 0; i < topics.length; i++) {
          yield* eventually(countOf(consumers[i]!), (n) => n >= 50, `50 deliveries on ${topics[i]}`)
        }
        yield* quiesce
        for (let i = 0; i < topics.length; i++) {
          const got = yield* Ref.get(consumers[i]!.deliveries)
          assert.strictEqual(got.length, 50)
          for (const d of got) assert.strictEqual(d.envelope.topic, topics[i])
          assert.deepStrictEqual(
            got.map((d) => payloadOf(d).n),
            range(0, 50)
          )
        }
      })
    )

    run(
      "C04",
      "nack the first deliveries: all are redelivered and processed",
      Effect.gen(function* () {
        // once settling each delivery, once settling whole reads (processAll / ackAll)
        for (const mode of ["each", "batch"] as const) {
          const topic = uniqueTopic("c04")
          const processed = yield* Ref.make<Array<number>>([])
          yield* publish(messages(topic, 20))
          yield* consume(
            { topic, group: "g", consumer: "c" },
            (d) =>
              d.deliveryCount === 1
                ? Effect.fail("first delivery is refused")
                : Ref.update(processed, (xs) => [...xs, payloadOf(d).n]),
            undefined,
            mode
          )
          const done = yield* eventually(Ref.get(processed), (xs) => xs.length >= 20, `20 processed (${mode})`)
          yield* quiesce
          assert.deepStrictEqual(sorted(yield* Ref.get(processed)), range(0, 20), `each processed once (${mode})`)
          assert.strictEqual(done.length >= 20, true)
        }
      })
    )

    run(
      "C05",
      "no ack while held: nothing is lost, and the next message of the key waits when ordered",
      Effect.gen(function* () {
        const topic = uniqueTopic("c05")
        const gate = yield* Deferred.make<void>()
        yield* publish(messages(topic, 1, { keyOf: () => "k" }))
        const holder = yield* consume({ topic, group: "g", consumer: "holder", batchSize: 1 }, () =>
          Deferred.await(gate)
        )
        yield* eventually(countOf(holder), (n) => n >= 1, "the first message is held")
        yield* publish(messages(topic, 1, { keyOf: () => "k", from: 1 }))
        const other = yield* consume({ topic, group: "g", consumer: "other", claimIdle: "1 hour" })
        if (features.orderedPerKey) {
          yield* quiesce
          assert.strictEqual(yield* countOf(other), 0, "the second message of the key waits while the first is held")
          assert.strictEqual(yield* countOf(holder), 1)
        }
        yield* Deferred.succeed(gate, undefined)
        const both = Effect.map(Effect.all([payloadsOf(holder), payloadsOf(other)]), ([a, b]) =>
          sorted([...a, ...b].map((p) => p.n))
        )
        yield* eventually(both, (xs) => xs.length >= 2, "both messages delivered")
        assert.deepStrictEqual(yield* both, [0, 1], "nothing lost")
      })
    )

    run(
      "C06",
      "continue after consumer close/reopen: nothing lost",
      Effect.gen(function* () {
        const topic = uniqueTopic("c06")
        yield* publish(messages(topic, 10))
        const first = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(first), (n) => n >= 10, "first 10")
        yield* quiesce
        yield* Fiber.interrupt(first.fiber)
        yield* publish(messages(topic, 10, { from: 10 }))
        const second = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(second), (n) => n >= 10, "next 10 after reopen")
        yield* quiesce
        assert.deepStrictEqual(
          (yield* payloadsOf(second)).map((p) => p.n),
          range(10, 20),
          "the reopened consumer gets exactly the messages published while it was closed"
        )
      }),
      !features.persistent && "the layer is not persistent"
    )

    run(
      "C07",
      "concurrent closes do not break the topic or group",
      Effect.gen(function* () {
        const topic = uniqueTopic("c07")
        const consumers = yield* Effect.forEach(range(0, 5), (i) => consume({ topic, group: "g", consumer: `c${i}` }))
        yield* publish(messages(topic, 50))
        yield* quiesce
        yield* Effect.forEach(consumers, (c) => Fiber.interrupt(c.fiber), { concurrency: "unbounded" })
        yield* publish(messages(topic, 50, { from: 50 }))
        const fresh = yield* consume({ topic, group: "g", consumer: "fresh", claimIdle })
        yield* pass(claimIdleMs + 100)
        const seen = Effect.map(Effect.all([...consumers.map(payloadsOf), payloadsOf(fresh)]), (lists) =>
          sorted([...new Set(lists.flat().map((p) => p.n))])
        )
        yield* eventually(seen, (xs) => xs.length >= 100, "all 100 messages seen after the closes")
        assert.deepStrictEqual(yield* seen, range(0, 100))
      })
    )

    run(
      "C08",
      "continue after errors: after failing consumers close, a fresh one receives everything",
      Effect.gen(function* () {
        const topic = uniqueTopic("c08")
        yield* publish(messages(topic, 20))
        const failing = yield* Effect.forEach(range(0, 3), (i) =>
          consume({ topic, group: "g", consumer: `bad${i}` }, () => Effect.die(new Error("handler crashed")))
        )
        yield* eventually(
          Effect.map(Effect.forEach(failing, countOf), (ns) => ns.reduce((a, b) => a + b, 0)),
          (n) => n >= 20,
          "failing consumers saw the messages"
        )
        yield* Effect.forEach(failing, (c) => Fiber.interrupt(c.fiber))
        const fresh = yield* consume({ topic, group: "g", consumer: "fresh", claimIdle })
        yield* pass(claimIdleMs + 100)
        const seen = Effect.map(payloadsOf(fresh), (ps) => sorted([...new Set(ps.map((p) => p.n))]))
        yield* eventually(seen, (xs) => xs.length >= 20, "the fresh consumer gets all 20")
        assert.deepStrictEqual(yield* seen, range(0, 20))
      })
    )

    run(
      "C09",
      "per-key order with one consumer per partition, also under redelivery",
      Effect.gen(function* () {
        const topic = uniqueTopic("c09")
        const applied = yield* Ref.make<Record<string, Array<number>>>({})
        yield* publish(messages(topic, 100, { keyOf: (n) => `k${n % 5}` }))
        yield* Effect.forEach(range(0, 3), (i) =>
          consume(
            { topic, group: "g", consumer: `c${i}`, batchSize: 3 },
            (d) => {
              const p = payloadOf(d)
              // every third message fails its first delivery and is redelivered
              if (p.n % 3 === 0 && d.deliveryCount === 1) return Effect.fail("transient")
              return Ref.update(applied, (m) => ({ ...m, [d.envelope.key!]: [...(m[d.envelope.key!] ?? []), p.n] }))
            },
            // back off, so that later messages of the key would overtake if the key were not parked
            () => nack(features.delayedDelivery ? 100 : 0)
          )
        )
        const total = Effect.map(Ref.get(applied), (m) => Object.values(m).reduce((a, xs) => a + xs.length, 0))
        yield* eventually(total, (n) => n >= 100, "100 applied")
        const byKey = yield* Ref.get(applied)
        for (let k = 0; k < 5; k++) {
          assert.deepStrictEqual(
            byKey[`k${k}`],
            range(0, 20).map((i) => i * 5 + k),
            `applied order of key k${k} equals publish order`
          )
        }
      }),
      !features.orderedPerKey && "the layer does not order per key"
    )

    run(
      "C10",
      "publisher close loses nothing already published",
      Effect.gen(function* () {
        const topic = uniqueTopic("c10")
        // a publisher with a scope of its own, closed right after publishing
        yield* Effect.scoped(
          Effect.gen(function* () {
            const broker = yield* Broker.Broker
            yield* Effect.addFinalizer(() => Effect.void)
            yield* Effect.forEach(range(0, 5), (i) => broker.publish(messages(topic, 10, { from: i * 10 })), {
              concurrency: 5
            })
          })
        )
        const r = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(r), (n) => n >= 50, "50 deliveries")
        assert.deepStrictEqual(sorted((yield* payloadsOf(r)).map((p) => p.n)), range(0, 50))
      }),
      !features.persistent && "the layer is not persistent"
    )

    run(
      "C11",
      "topic isolation",
      Effect.gen(function* () {
        const a = uniqueTopic("c11a")
        const b = uniqueTopic("c11b")
        const onA = yield* consume({ topic: a, group: "same", consumer: "c" })
        const onB = yield* consume({ topic: b, group: "same", consumer: "c" })
        yield* publish(messages(a, 10))
        yield* eventually(countOf(onA), (n) => n >= 10, "10 on a")
        yield* quiesce
        assert.strictEqual(yield* countOf(onB), 0, "nothing published to a reaches b")
        yield* publish(messages(b, 3, { from: 100 }))
        yield* eventually(countOf(onB), (n) => n >= 3, "3 on b")
        yield* quiesce
        assert.deepStrictEqual(
          (yield* payloadsOf(onB)).map((p) => p.n),
          [100, 101, 102]
        )
        assert.strictEqual(yield* countOf(onA), 10, "acks on a do not touch b, nor b's messages a")
      })
    )

    run(
      "C12",
      "interruption of a consumer mid-handler: no ack without completion; the message stays pending",
      Effect.gen(function* () {
        const topic = uniqueTopic("c12")
        const started = yield* Deferred.make<void>()
        yield* publish(messages(topic, 1))
        const r = yield* consume({ topic, group: "g", consumer: "c" }, () =>
          Effect.andThen(Deferred.succeed(started, undefined), Effect.never)
        )
        yield* Deferred.await(started)
        yield* Fiber.interrupt(r.fiber)
        const again = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(again), (n) => n >= 1, "redelivery after the interruption")
        const [d] = yield* Ref.get(again.deliveries)
        assert.strictEqual(payloadOf(d!).n, 0)
        assert.strictEqual(d!.deliveryCount, 2, "the interrupted delivery was not acked")
      })
    )

    run(
      "C13",
      "a new consumer group reads the retained history",
      Effect.gen(function* () {
        const topic = uniqueTopic("c13")
        const early = yield* consume({ topic, group: "early", consumer: "c" })
        yield* publish(messages(topic, 10))
        yield* eventually(countOf(early), (n) => n >= 10, "the early group got 10")
        const late = yield* consume({ topic, group: "late", consumer: "c" })
        yield* eventually(countOf(late), (n) => n >= 10, "the late group reads the history")
        assert.deepStrictEqual(
          (yield* payloadsOf(late)).map((p) => p.n),
          range(0, 10)
        )
      }),
      !features.persistent && "the layer is not persistent"
    )

    run(
      "C14",
      "broker restart: all published messages received",
      Effect.gen(function* () {
        const topic = uniqueTopic("c14")
        yield* publish(messages(topic, 20))
        const before = yield* consume({ topic, group: "g", consumer: "c", batchSize: 5 })
        yield* eventually(countOf(before), (n) => n >= 5, "some delivered before the restart")
        yield* Fiber.interrupt(before.fiber)
        yield* features.restart!
        yield* publish(messages(topic, 20, { from: 20 }))
        const after = yield* consume({ topic, group: "g", consumer: "c" })
        const seen = Effect.map(Effect.all([payloadsOf(before), payloadsOf(after)]), ([a, b]) =>
          sorted([...new Set([...a, ...b].map((p) => p.n))])
        )
        yield* eventually(seen, (xs) => xs.length >= 40, "all 40 after the restart")
        assert.deepStrictEqual(yield* seen, range(0, 40))
      }),
      features.restart === undefined && "no restart hook"
    )

    run(
      "C15",
      "two groups each receive every message; consumers within a group share them",
      Effect.gen(function* () {
        const topic = uniqueTopic("c15")
        const slow = () => (live ? Effect.sleep("2 millis") : Effect.repeat(Effect.yieldNow, { times: 5 }))
        const groupA = yield* Effect.forEach(range(0, 3), (i) =>
          consume({ topic, group: "a", consumer: `c${i}`, batchSize: 1 }, slow)
        )
        const groupB = yield* consume({ topic, group: "b", consumer: "solo" })
        yield* publish(messages(topic, 30))
        const totalA = Effect.map(Effect.forEach(groupA, countOf), (ns) => ns.reduce((a, b) => a + b, 0))
        yield* eventually(totalA, (n) => n >= 30, "group a got 30")
        yield* eventually(countOf(groupB), (n) => n >= 30, "group b got 30")
        yield* quiesce
        const a = (yield* Effect.forEach(groupA, payloadsOf)).flat().map((p) => p.n)
        assert.deepStrictEqual(sorted(a), range(0, 30), "each message once within group a")
        assert.deepStrictEqual(
          (yield* payloadsOf(groupB)).map((p) => p.n),
          range(0, 30),
          "group b gets every message"
        )
        const busy = (yield* Effect.forEach(groupA, countOf)).filter((n) => n > 0).length
        assert.isAtLeast(busy, 2, "consumers within a group share the messages")
      }),
      false
    )

    run(
      "C16",
      "pending survives consumer restart; delivery count becomes 2",
      Effect.gen(function* () {
        const topic = uniqueTopic("c16")
        yield* publish(messages(topic, 3))
        const first = yield* consume({ topic, group: "g", consumer: "c" }, () => Effect.never)
        yield* eventually(countOf(first), (n) => n >= 1, "first delivery")
        yield* Fiber.interrupt(first.fiber)
        const second = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(second), (n) => n >= 3, "all three after the restart")
        const got = yield* Ref.get(second.deliveries)
        const m0 = got.find((d) => payloadOf(d).n === 0)!
        assert.strictEqual(m0.deliveryCount, 2, "the message held before the restart is delivered a second time")
        assert.deepStrictEqual(sorted(got.map((d) => payloadOf(d).n)), [0, 1, 2])
      }),
      !features.persistent && "the layer is not persistent"
    )

    run(
      "C17",
      "claim after min-idle only; concurrent claimers never both win",
      Effect.gen(function* () {
        const topic = uniqueTopic("c17")
        yield* publish(messages(topic, 1))
        const holder = yield* consume({ topic, group: "g", consumer: "holder" }, () => Effect.never)
        yield* eventually(countOf(holder), (n) => n >= 1, "held")
        const claimers = yield* Effect.forEach(["x", "y"], (c) =>
          consume({ topic, group: "g", consumer: c, claimIdle })
        )
        yield* pass(claimIdleMs / 2)
        yield* quiesce
        const early = yield* Effect.forEach(claimers, countOf)
        assert.deepStrictEqual(early, [0, 0], "nobody claims before the idle time")
        yield* pass(claimIdleMs / 2 + 200)
        const total = Effect.map(Effect.forEach(claimers, countOf), (ns) => ns.reduce((a, b) => a + b, 0))
        yield* eventually(total, (n) => n >= 1, "claimed after the idle time")
        yield* quiesce
        assert.strictEqual(yield* total, 1, "exactly one claimer wins")
        const winner = (yield* Effect.forEach(claimers, (c) => Ref.get(c.deliveries))).flat()[0]!
        assert.strictEqual(winner.deliveryCount, 2)
      }),
      features.claimSkipsHolder === false &&
        "the server may redeliver an expired message to the consumer still holding it (claimSkipsHolder: false)"
    )

    run(
      "C18",
      "every delivery carries its delivery count; it increments on redelivery",
      Effect.gen(function* () {
        const topic = uniqueTopic("c18")
        yield* publish(messages(topic, 1))
        const r = yield* consume({ topic, group: "g", consumer: "c" }, (d) =>
          d.deliveryCount < 3 ? Effect.fail("again") : Effect.void
        )
        yield* eventually(countOf(r), (n) => n >= 3, "three deliveries")
        yield* quiesce
        assert.deepStrictEqual(
          (yield* Ref.get(r.deliveries)).map((d) => d.deliveryCount),
          [1, 2, 3]
        )
      })
    )

    run(
      "C19",
      "nack with delay: redelivered no earlier than the delay",
      Effect.gen(function* () {
        const topic = uniqueTopic("c19")
        const delay = live ? 600 : 2000
        yield* publish(messages(topic, 1))
        const r = yield* consume(
          { topic, group: "g", consumer: "c" },
          (d) => (d.deliveryCount === 1 ? Effect.fail("later") : Effect.void),
          () => nack(delay)
        )
        yield* eventually(countOf(r), (n) => n >= 1, "first delivery")
        const nackedAt = yield* Effect.clockWith((c) => c.currentTimeMillis)
        yield* pass(delay / 2)
        yield* quiesce
        assert.strictEqual(yield* countOf(r), 1, "not redelivered before the delay")
        yield* eventually(countOf(r), (n) => n >= 2, "redelivered after the delay")
        const redeliveredAt = yield* Effect.clockWith((c) => c.currentTimeMillis)
        assert.isAtLeast(redeliveredAt - nackedAt, delay - 50)
        assert.strictEqual((yield* Ref.get(r.deliveries))[1]!.deliveryCount, 2)
      }),
      !features.delayedDelivery && "the layer has no delayed delivery"
    )

    run(
      "C20",
      "ack after close is safe: a no-op or a typed error, never an ack of another entry",
      Effect.gen(function* () {
        const topic = uniqueTopic("c20")
        const broker = yield* Broker.Broker
        yield* publish(messages(topic, 1))
        const kept = yield* Deferred.make<Broker.Delivery>()
        const fiber = yield* broker.subscribe({ topic, group: "g", consumer: "c" }).pipe(
          Stream.runForEach((d) => Deferred.succeed(kept, d)),
          Effect.forkScoped
        )
        const d = yield* Deferred.await(kept)
        yield* Fiber.interrupt(fiber)
        yield* publish(messages(topic, 1, { from: 1 }))
        for (const settle of [d.ack, d.ack, d.nack(0), d.deadLetter({ reason: "late" })]) {
          const exit = yield* Effect.exit(settle)
          if (Exit.isFailure(exit)) {
            const error = Cause.findErrorOption(exit.cause)
            assert.isTrue(error._tag === "Some" && BrokerError.isBrokerError(error.value), "a late settle fails typed")
          }
        }
        const batch = yield* Effect.exit(broker.ackAll([d, d]))
        assert.isTrue(
          Exit.isFailure(batch) || batch.value <= 1,
          "a late batch ack acknowledges at most that one entry, or fails typed"
        )
        const fresh = yield* consume({ topic, group: "g", consumer: "fresh", claimIdle })
        yield* pass(claimIdleMs + 100)
        yield* eventually(
          Effect.map(payloadsOf(fresh), (ps) => ps.some((p) => p.n === 1)),
          (ok) => ok,
          "the other entry is still delivered"
        )
        const dlq = yield* broker.deadLetters(topic)
        assert.isFalse(
          dlq.some((x) => x.envelope?.data.includes('"n":1') ?? false),
          "no late settle touched the other entry"
        )
      })
    )

    run(
      "C21",
      "stream or group deleted under a running consumer: it recovers without a hot loop",
      Effect.gen(function* () {
        const topic = uniqueTopic("c21")
        const events = yield* Ref.make<Array<Broker.SubscriptionEvent>>([])
        const r = yield* consume({
          topic,
          group: "g",
          consumer: "c",
          onEvent: (e) => Ref.update(events, (xs) => [...xs, e])
        })
        yield* publish(messages(topic, 5))
        yield* eventually(countOf(r), (n) => n >= 5, "5 before the deletion")
        yield* features.deleteTopic!(topic)
        yield* pass("3 seconds")
        yield* publish(messages(topic, 5, { from: 5 }))
        yield* eventually(countOf(r), (n) => n >= 10, "5 more after the deletion")
        assert.deepStrictEqual(
          (yield* payloadsOf(r)).map((p) => p.n),
          range(0, 10)
        )
        const recreated = (yield* Ref.get(events)).filter((e) => e._tag === "GroupRecreated").length
        assert.isAtLeast(recreated, 1, "the group was recreated")
        assert.isAtMost(recreated, 5, "no hot loop of recreations")
      }),
      features.deleteTopic === undefined && "no deleteTopic hook"
    )

    run(
      "C22",
      "entries trimmed while pending are reported as lost-in-broker, never silently acked",
      Effect.gen(function* () {
        const topic = uniqueTopic("c22")
        const broker = yield* Broker.Broker
        const events = yield* Ref.make<Array<Broker.SubscriptionEvent>>([])
        yield* publish(messages(topic, 5))
        // take 5 deliveries and close without settling them: they stay pending
        const held = (yield* broker
          .subscribe({ topic, group: "g", consumer: "holder" })
          .pipe(Stream.take(5), Stream.runCollect)).map((d) => d.entryId)
        assert.strictEqual(held.length, 5)
        yield* features.trim!(topic, 0)
        yield* consume({
          topic,
          group: "g",
          consumer: "other",
          claimIdle: "100 millis",
          onEvent: (e) => Ref.update(events, (xs) => [...xs, e])
        })
        yield* pass("300 millis")
        yield* publish(messages(topic, 1, { from: 5 }))
        const lost = Effect.map(Ref.get(events), (es) =>
          es.flatMap((e) => (e._tag === "LostInBroker" ? e.entryIds : []))
        )
        yield* eventually(lost, (ids) => ids.length >= 5, "5 lost entries reported")
        assert.deepStrictEqual([...(yield* lost)].sort(), [...held].sort(), "exactly the trimmed pending entries")
      }),
      features.trim === undefined && "no trim hook"
    )

    run(
      "C23",
      "a malformed entry goes to the dead-letter hook and the subscription continues",
      Effect.gen(function* () {
        const topic = uniqueTopic("c23")
        const broker = yield* Broker.Broker
        const events = yield* Ref.make<Array<Broker.SubscriptionEvent>>([])
        const r = yield* consume({
          topic,
          group: "g",
          consumer: "c",
          onEvent: (e) => Ref.update(events, (xs) => [...xs, e])
        })
        const raw = { foo: "bar", ce_topic: topic }
        yield* features.appendRaw!(topic, raw)
        yield* publish(messages(topic, 1))
        yield* eventually(countOf(r), (n) => n >= 1, "the valid message after the malformed one")
        assert.strictEqual(payloadOf((yield* Ref.get(r.deliveries))[0]!).n, 0)
        const dlq = yield* eventually(broker.deadLetters(topic), (xs) => xs.length >= 1, "a dead letter")
        assert.strictEqual(dlq.length, 1)
        assert.strictEqual(dlq[0]!.reason, "malformed")
        assert.include(dlq[0]!.error ?? "", "ce_id", "the reason names the missing field")
        assert.strictEqual(dlq[0]!.fields.foo, "bar", "the raw fields are kept")
        assert.isTrue((yield* Ref.get(events)).some((e) => e._tag === "Malformed"))
      }),
      features.appendRaw === undefined && "no appendRaw hook"
    )

    run(
      "C24",
      "unicode and special characters in headers and payloads round-trip",
      Effect.gen(function* () {
        const topic = uniqueTopic("c24")
        const text = 'héllo 🌍 — "quoted" \\ back\nnew line\ttab \u0000 nul 日本語 \u{1F9EA} <&>'
        const sent = messages(topic, 3, {
          text,
          keyOf: (n) => `ключ-${n}-🔑`,
          headers: { note: 'ünïcödé ✓ \n "q" 中文', empty: "" }
        })
        yield* publish(sent)
        const r = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(r), (n) => n >= 3, "3 deliveries")
        const got = yield* Ref.get(r.deliveries)
        assert.deepStrictEqual(
          got.map((d) => d.envelope),
          sent
        )
        assert.strictEqual(payloadOf(got[0]!).text, text)
      })
    )

    run(
      "C25",
      "invalid topic or group names are rejected with a clear error, and no name can inject into a key",
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        const bad: Array<readonly ["topic" | "group" | "consumer", string]> = [
          ["topic", "has space"],
          ["topic", "a:b"],
          ["topic", "{slot}"],
          ["topic", ""],
          ["topic", "x".repeat(Name.maxLength + 1)],
          ["group", "g*"],
          ["group", "g\nnew"],
          ["consumer", "c}"],
          ["consumer", "../etc"]
        ]
        for (const [kind, value] of bad) {
          const options = { topic: "ok-topic", group: "ok-group", consumer: "ok-consumer", [kind]: value }
          const exit = yield* Effect.exit(Stream.runDrain(Stream.take(broker.subscribe(options), 1)))
          assert.isTrue(Exit.isFailure(exit), `${kind} ${JSON.stringify(value)} is rejected`)
          const error = Exit.isFailure(exit) ? Cause.findErrorOption(exit.cause) : undefined
          assert.isTrue(
            error?._tag === "Some" &&
              BrokerError.isBrokerError(error.value) &&
              error.value.reason._tag === "InvalidArgument" &&
              error.value.message.includes(kind),
            `${kind} ${JSON.stringify(value)}: typed InvalidArgument naming the ${kind}`
          )
        }
        for (const batchSize of [Number.NaN, 0, 1.5]) {
          const options = { topic: "ok-topic", group: "ok-group", consumer: "ok-consumer", batchSize }
          const exit = yield* Effect.exit(Stream.runDrain(Stream.take(broker.subscribe(options), 1)))
          const error = Exit.isFailure(exit) ? Cause.findErrorOption(exit.cause) : undefined
          assert.isTrue(
            error?._tag === "Some" &&
              BrokerError.isBrokerError(error.value) &&
              error.value.reason._tag === "InvalidArgument" &&
              error.value.message.includes("batchSize"),
            `batchSize ${batchSize}: typed InvalidArgument naming batchSize`
          )
        }
        const [valid] = messages("ok-topic", 1)
        const exit = yield* Effect.exit(broker.publish([{ ...valid!, topic: "bad{topic}" }]))
        assert.isTrue(Exit.isFailure(exit), "publishing to an invalid topic name is rejected")
        assert.throws(() => Topic.make("bad topic", Payload), /Invalid topic name/)
      })
    )

    run(
      "C26",
      "publishEach reports every message: one refused fails alone (not retryable), the others are stored and delivered",
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        const topic = uniqueTopic("c26")
        const [a, b, c] = messages(topic, 3, { keyOf: () => "k" })
        const outcomes = yield* broker.publishEach([a!, { ...b!, topic: "bad{topic}" }, c!])
        assert.deepStrictEqual(
          outcomes.map((o) => o._tag),
          ["Stored", "Failed", "Stored"]
        )
        const refused = outcomes[1]!
        assert.isTrue(refused._tag === "Failed" && !refused.error.isRetryable, "a refusal is not retryable")
        const r = yield* consume({ topic, group: "g", consumer: "c" })
        yield* eventually(countOf(r), (n) => n >= 2, "the two stored messages")
        const stored = [a!, c!].map((m) => (JSON.parse(m.data) as Payload).n)
        assert.deepStrictEqual(sorted((yield* payloadsOf(r)).map((p) => p.n)), stored)
      })
    )

    run(
      "C27",
      "operator views: `topics` lists a topic with its groups and dead-letter count; `groupStats` counts what a group has pending and not yet read",
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        assert.isDefined(broker.topics, "operatorViews declared: Broker.topics is implemented")
        assert.isDefined(broker.groupStats, "operatorViews declared: Broker.groupStats is implemented")
        const topic = uniqueTopic("c27")
        yield* broker.publish(messages(topic, 5))
        // the first read's deliveries stay pending (never settled); one is dead-lettered
        const held = yield* Deferred.make<ReadonlyArray<Broker.Delivery>>()
        yield* Effect.forkScoped(
          Stream.runForEach(broker.subscribe({ topic, group: "ops", consumer: "c", batchSize: 2 }), (d) =>
            Deferred.succeed(held, [d])
          )
        )
        const [first] = yield* Deferred.await(held)
        yield* first!.deadLetter({ reason: "permanent", error: "refused by the test" })
        yield* quiesce
        const info = (yield* broker.topics!).find((t) => t.name === topic)
        assert.deepStrictEqual(info, { name: topic, groups: ["ops"], deadLetters: 1 })
        const stats = yield* broker.groupStats!(topic, "ops")
        // 5 published, 1 settled (dead-lettered): the other 4 are pending or not yet delivered
        assert.strictEqual(stats.pending + stats.lag, 4, JSON.stringify(stats))
        assert.isAtLeast(stats.pending, 1, "the unsettled deliveries of the read are pending")
      }),
      !features.operatorViews && "the layer does not declare operatorViews (Broker.topics and groupStats)"
    )

    // the summary: how many of the cases ran, and which were skipped for want of a hook or a feature
    const total = ran.length + skipped.length + notSelected.length
    const verdict =
      features.only !== undefined
        ? `a selection: ${ran.length} of ${total} cases run (${features.only.join(", ")})`
        : skipped.length === 0
          ? `all ${total} cases run`
          : `${ran.length} of ${total} cases run, NOT fully conformant — skipped: ${skipped
              .map((c) => `${c.id} (${c.reason})`)
              .join("; ")}`
    it(`conformance of ${name}: ${verdict}`, () => {
      assert.strictEqual(total, caseCount, "every case of the suite was registered")
      assert.deepStrictEqual(
        [...ran, ...skipped.map((c) => c.id), ...notSelected].sort(),
        Array.from({ length: caseCount }, (_, i) => `C${String(i + 1).padStart(2, "0")}`),
        "each case once"
      )
    })
  })
}

/**
 * How many cases the suite has (C01 to C27).
 *
 * @since 0.1.0
 */
export const caseCount = 27
