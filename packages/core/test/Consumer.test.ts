import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import {
  Clock,
  Data,
  Deferred,
  Effect,
  Exit,
  Fiber,
  Layer,
  Logger,
  Ref,
  References,
  Schedule,
  Schema,
  Scope,
  Stream
} from "effect"
import { TestClock } from "effect/testing"
import { Broker, BrokerError, Consumer, DeadLetter, type Envelope, Publisher, Topic } from "../src/index.ts"

const Payment = Schema.Struct({ id: Schema.String, account: Schema.String, cents: Schema.Int })
type Payment = typeof Payment.Type
const payments = Topic.make("payments", Payment, { key: (p) => p.account })

class Transient extends Data.TaggedError("Transient")<{ readonly attempt: number }> {}
class Declined extends Data.TaggedError("Declined")<{ readonly why: string }> {}
class Odd extends Data.TaggedError("Odd")<{}> {}

const Live = (options?: MemoryBroker.Options) =>
  Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true, ...options })))

const yieldMany = Effect.repeat(Effect.yieldNow, { times: 100 })
const pay = (n: number, account = `acct-${n}`): Payment => ({ id: `p-${n}`, account, cents: 100 + n })
const now = Clock.currentTimeMillis

/** Lets `TestClock` run in steps until `cond` holds (bounded). */
const until = <E, R>(cond: Effect.Effect<boolean, E, R>, step: number | "auto" = 10, max = 100_000) =>
  Effect.gen(function* () {
    for (let i = 0; i < max; i++) {
      yield* yieldMany
      if (yield* cond) return
      yield* TestClock.adjust(step === "auto" ? 10 : step)
    }
    assert.fail("condition not reached")
  })

const pending = MemoryBroker.MemoryBroker.use((m) => m.pending("payments", "billing"))

describe("Consumer", () => {
  it.effect("retries by an exponential schedule with exact timing (TestClock), then acks", () =>
    Effect.gen(function* () {
      const times = yield* Ref.make<Array<number>>([])
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Effect.gen(function* () {
            yield* Ref.update(times, (xs) => [...xs, 0])
            const t = yield* now
            yield* Ref.update(times, (xs) => [...xs.slice(0, -1), t])
            if (ctx.attempt < 4) return yield* new Transient({ attempt: ctx.attempt })
          }),
        errors: { Transient: "retry" },
        retry: Schedule.exponential("100 millis", 2),
        inProcessDelayLimit: "10 seconds",
        maxInProcessAttempts: 10
      })
      const start = yield* now
      yield* Publisher.publish(payments, pay(1))
      yield* until(
        Effect.map(Ref.get(times), (xs) => xs.length >= 4),
        50
      )
      yield* yieldMany
      const offsets = (yield* Ref.get(times)).map((t) => t - start)
      assert.deepStrictEqual(offsets, [0, 100, 300, 700], "delays of 100, 200 and 400 ms")
      assert.deepStrictEqual(yield* pending, [], "acked after the success")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("jittered delays stay within 80%..120% of the exponential delay", () =>
    Effect.gen(function* () {
      const times = yield* Ref.make<Array<number>>([])
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Effect.gen(function* () {
            const t = yield* now
            yield* Ref.update(times, (xs) => [...xs, t])
            if (ctx.attempt < 7) return yield* new Transient({ attempt: ctx.attempt })
          }),
        errors: { Transient: "retry" },
        retry: Schedule.exponential("1 second", 2).pipe(Schedule.jittered),
        inProcessDelayLimit: "1 hour",
        maxInProcessAttempts: 100
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(
        Effect.map(Ref.get(times), (xs) => xs.length >= 7),
        100
      )
      const ts = yield* Ref.get(times)
      for (let i = 1; i < ts.length; i++) {
        const delay = ts[i]! - ts[i - 1]!
        const base = 1000 * 2 ** (i - 1)
        assert.isAtLeast(delay, Math.floor(base * 0.8), `delay ${i} >= 80%`)
        assert.isAtMost(delay, Math.ceil(base * 1.2) + 5, `delay ${i} <= 120%`)
      }
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a transient error that succeeds on attempt 3 is processed once and acked", () =>
    Effect.gen(function* () {
      const calls = yield* Ref.make(0)
      const processed = yield* Ref.make(0)
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Ref.update(calls, (n) => n + 1).pipe(
            Effect.andThen(
              ctx.attempt < 3
                ? Effect.fail(new Transient({ attempt: ctx.attempt }))
                : Ref.update(processed, (n) => n + 1)
            )
          ),
        errors: { Transient: "retry" },
        retry: Schedule.spaced("50 millis")
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(Ref.get(processed), (n) => n >= 1))
      yield* TestClock.adjust("1 second")
      yield* yieldMany
      assert.strictEqual(yield* Ref.get(calls), 3)
      assert.strictEqual(yield* Ref.get(processed), 1)
      assert.deepStrictEqual(yield* pending, [])
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a permanent error goes to the DLQ after exactly 1 attempt", () =>
    Effect.gen(function* () {
      const calls = yield* Ref.make(0)
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () =>
          Ref.update(calls, (n) => n + 1).pipe(Effect.andThen(Effect.fail(new Declined({ why: "card stolen" })))),
        errors: { Declined: "dead-letter" }
      })
      yield* Publisher.publish(payments, pay(1))
      const dlq = yield* Effect.gen(function* () {
        yield* until(Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 1))
        return yield* DeadLetter.list("payments")
      })
      yield* TestClock.adjust("1 minute")
      yield* yieldMany
      assert.strictEqual(yield* Ref.get(calls), 1)
      assert.strictEqual(dlq.length, 1)
      assert.strictEqual(dlq[0]!.reason, "permanent")
      assert.strictEqual(dlq[0]!.attempts, 1)
      assert.include(dlq[0]!.error!, "card stolen")
      assert.include(dlq[0]!.error!, "Declined")
      assert.strictEqual(dlq[0]!.envelope?.data, JSON.stringify(pay(1)), "the original envelope is kept")
      assert.deepStrictEqual(yield* pending, [])
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a decode failure goes to the DLQ with 0 handler calls, and a warning says so", () =>
    Effect.gen(function* () {
      const warnings: Array<{ readonly message: string; readonly annotations: Record<string, unknown> }> = []
      const capture = Logger.make<unknown, void>(({ logLevel, message, fiber }) => {
        if (logLevel !== "Warn") return
        warnings.push({
          message: Array.isArray(message) ? message.join(" ") : String(message),
          annotations: { ...fiber.getRef(References.CurrentLogAnnotations) }
        })
      })
      yield* Effect.provide(decodeFailureCase, Logger.layer([capture]))
      assert.strictEqual(warnings.length, 1)
      assert.match(warnings[0]!.message, /^consumer: message dead-lettered \(decode\): [\s\S]*cents/)
      assert.deepStrictEqual(warnings[0]!.annotations, { topic: "payments", group: "billing", messageId: "bad-1" })
    }).pipe(Effect.provide(Live()))
  )

  const decodeFailureCase = Effect.gen(function* () {
    const calls = yield* Ref.make(0)
    yield* Consumer.make(payments, {
      group: "billing",
      consumer: "c1",
      handle: () => Ref.update(calls, (n) => n + 1)
    })
    const broker = yield* Broker.Broker
    const bad: Envelope.Encoded = {
      id: "bad-1",
      topic: "payments",
      type: "payments",
      source: "urn:test",
      key: "acct-9",
      time: "2026-11-26T00:00:00.000Z",
      attempt: 1,
      headers: {},
      data: '{"id":"p-9","account":"acct-9","cents":"a lot"}'
    }
    yield* broker.publish([bad])
    yield* Publisher.publish(payments, pay(2))
    yield* until(Effect.map(Ref.get(calls), (n) => n >= 1))
    const dlq = yield* DeadLetter.list("payments", { reason: "decode" })
    assert.strictEqual(dlq.length, 1)
    assert.strictEqual(dlq[0]!.envelope?.id, "bad-1")
    assert.strictEqual(dlq[0]!.attempts, 0)
    assert.include(dlq[0]!.error!, "cents")
    assert.strictEqual(yield* Ref.get(calls), 1, "only the good message reached the handler")
  })

  it.effect(
    "a type the consumer does not handle, and a payload over the topic's maxBytes, are dead-lettered unparsed",
    () =>
      Effect.gen(function* () {
        const small = Topic.make("payments", Payment, { key: (p) => p.account, maxBytes: 200 })
        const seen = { billing: [] as Array<string>, ledger: [] as Array<string>, audit: [] as Array<string> }
        let batchCalls = 0
        const record = (group: keyof typeof seen) => (p: Payment) => Effect.sync(() => seen[group].push(p.id))
        // one consumer per path: handle; handleBatch (a read of three goes to it at once); and one that
        // also reads the newer type with the same Schema
        yield* Consumer.make(small, { group: "billing", consumer: "c1", handle: record("billing") })
        yield* Consumer.make(small, {
          group: "ledger",
          consumer: "c1",
          handle: record("ledger"),
          handleBatch: (items) =>
            Effect.andThen(
              Effect.sync(() => batchCalls++),
              Effect.forEach(items, (i) => record("ledger")(i.message), { discard: true })
            )
        })
        yield* Consumer.make(small, {
          group: "audit",
          consumer: "c1",
          types: ["payments.v2"],
          handle: record("audit")
        })
        const message = (id: string, type: string, data: Payment & { readonly note?: string }): Envelope.Encoded => ({
          id,
          topic: "payments",
          type,
          source: "urn:test",
          key: data.account,
          time: "2026-11-26T00:00:00.000Z",
          attempt: 1,
          headers: {},
          data: JSON.stringify(data)
        })
        const broker = yield* Broker.Broker
        yield* broker.publish([
          message("v2-1", "payments.v2", pay(7)),
          // 190 UTF-16 units, 310 bytes of UTF-8: decodable (the extra field is ignored), but over the limit
          message("huge-1", "payments", { ...pay(8), note: "é".repeat(120) }),
          message("ok-1", "payments", pay(2))
        ])
        yield* until(
          Effect.sync(() => seen.billing.length + seen.ledger.length + seen.audit.length >= 4),
          10,
          1000
        )
        yield* yieldMany
        assert.deepStrictEqual(seen, { billing: ["p-2"], ledger: ["p-2"], audit: ["p-7", "p-2"] })
        assert.strictEqual(batchCalls, 1, "the ledger took the read at once: the refused two were settled first")
        for (const group of ["billing", "ledger"]) {
          const dlq = yield* DeadLetter.list("payments", { group })
          assert.deepStrictEqual(
            dlq.map((d) => [d.envelope?.id, d.reason, d.attempts]).sort(),
            [
              ["huge-1", "oversized", 0],
              ["v2-1", "unknown-type", 0]
            ],
            group
          )
          const unknown = dlq.find((d) => d.reason === "unknown-type")!
          assert.include(unknown.error!, 'type "payments.v2" is not one this consumer of topic "payments" handles')
          assert.include(dlq.find((d) => d.reason === "oversized")!.error!, "over the topic's limit of 200")
        }
        const audit = yield* DeadLetter.list("payments", { group: "audit" })
        assert.deepStrictEqual(
          audit.map((d) => [d.envelope?.id, d.reason]),
          [["huge-1", "oversized"]]
        )
      }).pipe(Effect.provide(Live()))
  )

  it.effect("exhausted retries go to the DLQ with the last error and the attempts", () =>
    Effect.gen(function* () {
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) => Effect.fail(new Transient({ attempt: ctx.attempt })),
        errors: { Transient: "retry" },
        retry: Schedule.spaced("100 millis").pipe(Schedule.upTo({ times: 4 }))
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 1))
      const [d] = yield* DeadLetter.list("payments")
      assert.strictEqual(d!.reason, "exhausted")
      assert.strictEqual(d!.attempts, 5, "1 attempt + 4 retries")
      assert.include(d!.error!, '"attempt":5', "the last error")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("long backoffs go through the broker (nack with delay); the attempt continues after redelivery", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<{ attempt: number; deliveryCount: number; at: number }>>([])
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Effect.gen(function* () {
            const at = yield* now
            yield* Ref.update(seen, (xs) => [...xs, { attempt: ctx.attempt, deliveryCount: ctx.deliveryCount, at }])
            if (ctx.attempt < 4) return yield* new Transient({ attempt: ctx.attempt })
          }),
        errors: { Transient: "retry" },
        retry: Schedule.exponential("400 millis", 2),
        inProcessDelayLimit: "500 millis"
      })
      const start = yield* now
      yield* Publisher.publish(payments, pay(1))
      yield* until(
        Effect.map(Ref.get(seen), (xs) => xs.length >= 2),
        50
      )
      yield* TestClock.adjust(100)
      yield* yieldMany
      const delayed = yield* pending
      assert.deepStrictEqual(
        delayed.map((p) => p.delayed),
        [true],
        "the 800 ms backoff waits in the broker, not in a handler slot"
      )
      yield* until(
        Effect.map(Ref.get(seen), (xs) => xs.length >= 4),
        50
      )
      const xs = yield* Ref.get(seen)
      assert.deepStrictEqual(
        xs.map((x) => [x.attempt, x.deliveryCount]),
        [
          [1, 1],
          [2, 1],
          [3, 2],
          [4, 3]
        ],
        "attempts continue across redeliveries"
      )
      assert.deepStrictEqual(
        xs.map((x) => x.at - start),
        [0, 400, 1200, 2800],
        "the schedule continues where it left off: 400, 800, 1600 ms"
      )
      yield* yieldMany
      assert.deepStrictEqual(yield* pending, [])
    }).pipe(Effect.provide(Live()))
  )

  it.effect("errors with isRetryable need no mapping: retried when true, dead-lettered when false", () =>
    Effect.gen(function* () {
      const calls = yield* Ref.make<Record<string, number>>({})
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (p) =>
          Ref.update(calls, (m) => ({ ...m, [p.id]: (m[p.id] ?? 0) + 1 })).pipe(
            Effect.andThen(
              Effect.fail(
                BrokerError.make(
                  p.id === "p-1"
                    ? new BrokerError.ConnectionLost({ message: "down" })
                    : new BrokerError.InvalidArgument({ argument: "x", message: "bad" })
                )
              )
            )
          ),
        retry: Schedule.spaced("10 millis").pipe(Schedule.upTo({ times: 2 }))
      })
      yield* Publisher.publishAll(payments, [pay(1), pay(2)])
      yield* until(Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 2))
      const dlq = yield* DeadLetter.list("payments")
      assert.deepStrictEqual(dlq.map((d) => [d.envelope?.id !== undefined, d.reason, d.attempts]).sort(), [
        [true, "exhausted", 3],
        [true, "permanent", 1]
      ])
      assert.deepStrictEqual(yield* Ref.get(calls), { "p-1": 3, "p-2": 1 })
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a defect is retried by the schedule, then dead-lettered with reason defect", () =>
    Effect.gen(function* () {
      const calls = yield* Ref.make(0)
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () =>
          Ref.update(calls, (n) => n + 1).pipe(
            Effect.andThen(
              Effect.sync(() => {
                throw new Error("null pointer in handler")
              })
            )
          ),
        retry: Schedule.spaced("10 millis").pipe(Schedule.upTo({ times: 2 }))
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 1))
      const [d] = yield* DeadLetter.list("payments")
      assert.strictEqual(d!.reason, "defect")
      assert.include(d!.error!, "null pointer in handler")
      assert.strictEqual(yield* Ref.get(calls), 3)
    }).pipe(Effect.provide(Live()))
  )

  it.effect("ignore acks the message", () =>
    Effect.gen(function* () {
      const calls = yield* Ref.make(0)
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () => Ref.update(calls, (n) => n + 1).pipe(Effect.andThen(Effect.fail(new Odd()))),
        errors: { Odd: "ignore" }
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(Ref.get(calls), (n) => n >= 1))
      yield* yieldMany
      assert.deepStrictEqual(yield* pending, [])
      assert.deepStrictEqual(yield* DeadLetter.list("payments"), [])
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a poison message does not delay other keys", () =>
    Effect.gen(function* () {
      const done = yield* Ref.make<Array<string>>([])
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (p) =>
          p.account === "poison" ? Effect.fail(new Transient({ attempt: 0 })) : Ref.update(done, (xs) => [...xs, p.id]),
        errors: { Transient: "retry" },
        retry: Schedule.spaced("10 seconds").pipe(Schedule.upTo({ times: 5 })),
        concurrency: 4,
        ordering: "per-key"
      })
      yield* Publisher.publish(payments, pay(0, "poison"))
      yield* Publisher.publishAll(
        payments,
        Array.from({ length: 30 }, (_, i) => pay(i + 1, `acct-${i % 10}`))
      )
      yield* until(
        Effect.map(Ref.get(done), (xs) => xs.length >= 30),
        1
      )
      const elapsed = yield* now
      assert.isBelow(elapsed, 10_000, "all other keys were processed before the poison's first retry")
      yield* until(
        Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 1),
        1000
      )
      const [d] = yield* DeadLetter.list("payments")
      assert.strictEqual(d!.envelope?.key, "poison")
      assert.strictEqual(d!.reason, "exhausted")
    }).pipe(Effect.provide(Live()))
  )

  it.effect(
    "per-key order holds while the head of a key backs off (1 000 messages, 20 keys, random transient failures)",
    () =>
      Effect.gen(function* () {
        const applied = yield* Ref.make<Record<string, Array<number>>>({})
        let seed = 12345
        const random = () => {
          seed = (seed * 1103515245 + 12345) & 0x7fffffff
          return seed / 0x7fffffff
        }
        const failures = new Map<string, number>()
        for (let i = 0; i < 1000; i++) if (random() < 0.15) failures.set(`p-${i}`, 1 + Math.floor(random() * 4))
        yield* Consumer.make(payments, {
          group: "billing",
          consumer: "c1",
          handle: (p, ctx) =>
            ctx.attempt <= (failures.get(p.id) ?? 0)
              ? Effect.fail(new Transient({ attempt: ctx.attempt }))
              : Ref.update(applied, (m) => ({ ...m, [p.account]: [...(m[p.account] ?? []), Number(p.id.slice(2))] })),
          errors: { Transient: "retry" },
          // 20 ms in process, then 40 and 80 ms through the broker
          retry: Schedule.exponential("20 millis", 2),
          inProcessDelayLimit: "30 millis",
          concurrency: 8,
          ordering: "per-key",
          batchSize: 50
        })
        yield* Publisher.publishAll(
          payments,
          Array.from({ length: 1000 }, (_, i) => pay(i, `acct-${i % 20}`))
        )
        const total = Effect.map(Ref.get(applied), (m) => Object.values(m).reduce((a, xs) => a + xs.length, 0))
        yield* until(
          Effect.map(total, (n) => n >= 1000),
          5
        )
        const byKey = yield* Ref.get(applied)
        assert.strictEqual(Object.keys(byKey).length, 20)
        for (let k = 0; k < 20; k++) {
          assert.deepStrictEqual(
            byKey[`acct-${k}`],
            Array.from({ length: 50 }, (_, i) => i * 20 + k),
            `key acct-${k}: applied order equals publish order`
          )
        }
        assert.isAbove(failures.size, 100, "plenty of transient failures were injected")
      }).pipe(Effect.provide(Live()))
  )

  it.effect("replay delivers a dead letter again, with the same id and a replay marker", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<{ id: string; attempt: number; replay: boolean }>>([])
      const fixed = yield* Ref.make(false)
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Ref.update(seen, (xs) => [
            ...xs,
            { id: ctx.id, attempt: ctx.attempt, replay: DeadLetter.isReplay(ctx.headers) }
          ]).pipe(
            Effect.andThen(
              Effect.flatMap(Ref.get(fixed), (ok) => (ok ? Effect.void : Effect.fail(new Declined({ why: "bug" }))))
            )
          ),
        errors: { Declined: "dead-letter" }
      })
      const receipt = yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(DeadLetter.list("payments"), (xs) => xs.length >= 1))
      const [d] = yield* DeadLetter.list("payments")
      assert.deepStrictEqual(yield* DeadLetter.show("payments", d!.id), d)
      yield* Ref.set(fixed, true) // the bug is fixed and deployed
      yield* DeadLetter.replay("payments", d!.id)
      yield* until(Effect.map(Ref.get(seen), (xs) => xs.length >= 2))
      assert.deepStrictEqual(yield* Ref.get(seen), [
        { id: receipt.id, attempt: 1, replay: false },
        { id: receipt.id, attempt: 1, replay: true }
      ])
      assert.deepStrictEqual(yield* DeadLetter.list("payments"), [], "the replayed entry left the DLQ")
      const missing = yield* Effect.flip(DeadLetter.replay("payments", d!.id))
      assert.strictEqual(missing._tag, "DeadLetterNotFound")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("DeadLetter.list filters by group, reason and time; purge removes", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      yield* Publisher.publishAll(payments, [pay(1), pay(2), pay(3)])
      const take = (group: string) =>
        Effect.scoped(Stream.runCollect(Stream.take(broker.subscribe({ topic: "payments", group, consumer: "c" }), 3)))
      const a = yield* take("a")
      yield* a[0]!.deadLetter({ reason: "permanent" })
      yield* TestClock.adjust("1 hour")
      yield* a[1]!.deadLetter({ reason: "exhausted" })
      const b = yield* take("b")
      yield* b[2]!.deadLetter({ reason: "permanent" })
      assert.strictEqual((yield* DeadLetter.list("payments")).length, 3)
      assert.strictEqual((yield* DeadLetter.list("payments", { group: "a" })).length, 2)
      assert.strictEqual((yield* DeadLetter.list("payments", { reason: "permanent" })).length, 2)
      assert.strictEqual((yield* DeadLetter.list("payments", { since: 30 * 60_000 })).length, 2)
      assert.strictEqual((yield* DeadLetter.list("payments", { until: 30 * 60_000 })).length, 1)
      assert.strictEqual((yield* DeadLetter.list("payments", { limit: 1 })).length, 1)
      assert.strictEqual(yield* DeadLetter.purge("payments", [(yield* DeadLetter.list("payments"))[0]!.id]), 1)
      assert.strictEqual(yield* DeadLetter.purge("payments"), 2)
    }).pipe(Effect.provide(Live()))
  )

  it.effect("shutdown: in-flight handlers finish within the deadline and are acked; no new deliveries", () =>
    Effect.gen(function* () {
      const started = yield* Deferred.make<void>()
      const calls = yield* Ref.make(0)
      const scope = yield* Scope.make()
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () =>
          Effect.gen(function* () {
            yield* Ref.update(calls, (n) => n + 1)
            yield* Deferred.succeed(started, undefined)
            yield* Effect.sleep("2 seconds")
          }),
        shutdownTimeout: "5 seconds",
        batchSize: 1
      }).pipe(Scope.provide(scope))
      yield* Publisher.publishAll(payments, [pay(1, "a"), pay(2, "b")])
      yield* Deferred.await(started)
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* TestClock.adjust("3 seconds")
      yield* yieldMany
      yield* Fiber.join(closing)
      assert.strictEqual(yield* Ref.get(calls), 1, "no handler started after the scope began to close")
      // the in-flight message finished and was acked; the second was not read ahead of the handler (it
      // would be pending, unhandled, until this consumer name subscribes again or someone claims it)
      assert.deepStrictEqual(yield* pending, [], "nothing is left pending")
      const broker = yield* Broker.Broker
      const next = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "payments", group: "billing", consumer: "c2" }), 1)
      )
      assert.deepStrictEqual(
        [next[0]!.entryId, next[0]!.deliveryCount],
        ["2-0", 1],
        "another consumer gets the unhandled message at once, on its first delivery"
      )
    }).pipe(Effect.provide(Live()))
  )

  it.effect("shutdown of an idle consumer ends at once: its waiting read is interrupted, not waited for", () =>
    Effect.gen(function* () {
      const scope = yield* Scope.make()
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () => Effect.void,
        shutdownTimeout: "30 seconds"
      }).pipe(Scope.provide(scope))
      yield* yieldMany // subscribed and waiting for messages
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* yieldMany // the clock does not move: a wait for the deadline would never end
      assert.isDefined(closing.pollUnsafe(), "the scope closed without waiting for the shutdown deadline")
      yield* Publisher.publish(payments, pay(1))
      yield* yieldMany
      assert.deepStrictEqual(yield* pending, [], "the stopped consumer read nothing more")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("shutdown with concurrent reads: the waiting read ends at once, the one being handled finishes", () =>
    Effect.gen(function* () {
      const started = yield* Deferred.make<void>()
      const handled = yield* Ref.make<Array<string>>([])
      const scope = yield* Scope.make()
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () => Effect.void,
        // reads are handled up to `concurrency` at once, so the subscription is pulled while a handler runs
        handleBatch: (items) =>
          Effect.gen(function* () {
            yield* Ref.update(handled, (xs) => [...xs, ...items.map((i) => i.message.id)])
            yield* Deferred.succeed(started, undefined)
            yield* Effect.sleep("2 seconds")
          }),
        concurrency: 2,
        batchSize: 2,
        shutdownTimeout: "5 seconds"
      }).pipe(Scope.provide(scope))
      yield* Publisher.publishAll(payments, [pay(1), pay(2)])
      yield* Deferred.await(started)
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* yieldMany
      yield* Publisher.publishAll(payments, [pay(3), pay(4)]) // reaches the pull that was waiting
      yield* yieldMany
      assert.isUndefined(closing.pollUnsafe(), "the read in flight is still being handled")
      yield* TestClock.adjust("3 seconds")
      yield* Fiber.join(closing)
      assert.deepStrictEqual(
        yield* Ref.get(handled),
        ["p-1", "p-2"],
        "no handler started after the scope began to close"
      )
      assert.deepStrictEqual(yield* pending, [], "the read in flight was acked; nothing was read during shutdown")
      const broker = yield* Broker.Broker
      const next = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "payments", group: "billing", consumer: "c2" }), 2)
      )
      assert.deepStrictEqual(
        next.map((d) => [d.entryId, d.deliveryCount]),
        [
          ["3-0", 1],
          ["4-0", 1]
        ],
        "the messages published during shutdown go to another consumer, on their first delivery"
      )
    }).pipe(Effect.provide(Live()))
  )

  it.effect("shutdown mid-handler past the deadline interrupts it and leaves the message pending", () =>
    Effect.gen(function* () {
      const started = yield* Deferred.make<void>()
      const scope = yield* Scope.make()
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: () => Effect.andThen(Deferred.succeed(started, undefined), Effect.never),
        shutdownTimeout: "1 second"
      }).pipe(Scope.provide(scope))
      yield* Publisher.publish(payments, pay(1))
      yield* Deferred.await(started)
      yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* TestClock.adjust("2 seconds")
      yield* yieldMany
      const left = yield* pending
      assert.deepStrictEqual(
        left.map((p) => [p.consumer, p.deliveryCount, p.delayed]),
        [["c1", 1, false]],
        "not acked: it stays pending for c1"
      )
    }).pipe(Effect.provide(Live()))
  )

  it.effect("Consumer.layer runs in the background while the layer lives, and stops with it", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<string>>([])
      const billing = Consumer.layer(payments, {
        group: "billing",
        consumer: "c1",
        handle: (p) => Ref.update(seen, (xs) => [...xs, p.id])
      })
      yield* Effect.scoped(
        Effect.gen(function* () {
          yield* Layer.build(billing)
          yield* Publisher.publishAll(payments, [pay(1), pay(2)])
          yield* until(Effect.map(Ref.get(seen), (xs) => xs.length >= 2))
        })
      )
      yield* Publisher.publish(payments, pay(3))
      yield* TestClock.adjust("1 minute")
      yield* yieldMany
      assert.deepStrictEqual(yield* Ref.get(seen), ["p-1", "p-2"], "nothing is handled once the layer is gone")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("a killed subscription is opened again; the unacked message comes back with delivery count 2", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<number>>([])
      const gate = yield* Deferred.make<void>()
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        handle: (_, ctx) =>
          Ref.update(seen, (xs) => [...xs, ctx.deliveryCount]).pipe(
            Effect.andThen(ctx.deliveryCount === 1 ? Deferred.await(gate) : Effect.void)
          )
      })
      yield* Publisher.publish(payments, pay(1))
      yield* until(Effect.map(Ref.get(seen), (xs) => xs.length >= 1))
      assert.strictEqual(
        yield* MemoryBroker.MemoryBroker.use((m) => m.faults.killConsumer("payments", "billing", "c1")),
        1
      )
      yield* Deferred.succeed(gate, undefined) // the killed handler finishes, but its ack is refused
      yield* until(
        Effect.map(Ref.get(seen), (xs) => xs.length >= 2),
        50
      )
      assert.deepStrictEqual(yield* Ref.get(seen), [1, 2])
      yield* yieldMany
      assert.deepStrictEqual(yield* pending, [], "acked after the second delivery")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("invalid group or consumer names fail at construction", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(Consumer.make(payments, { group: "bad group", handle: () => Effect.void }))
      assert.strictEqual(error._tag, "InvalidName")
      assert.include(error.message, "group")
    }).pipe(Effect.provide(Live()))
  )

  it.effect("options that cannot work are refused at construction, naming the option", () =>
    Effect.gen(function* () {
      const bad: ReadonlyArray<readonly [string, Partial<Consumer.BaseOptions<Payment, never, never>>]> = [
        ["concurrency", { concurrency: Number.NaN }],
        ["concurrency", { concurrency: 0 }],
        ["concurrency", { concurrency: 2.5 }],
        ["batchSize", { batchSize: Number.NaN }],
        ["maxDeliveries", { maxDeliveries: -1 }],
        ["maxInProcessAttempts", { maxInProcessAttempts: Number.POSITIVE_INFINITY }],
        ["shutdownTimeout", { shutdownTimeout: -5 }],
        ["inProcessDelayLimit", { inProcessDelayLimit: Number.NaN }]
      ]
      for (const [option, options] of bad) {
        const error = yield* Effect.flip(
          Effect.scoped(Consumer.make(payments, { group: "g", handle: () => Effect.void, ...options }))
        )
        assert.strictEqual(error._tag, "InvalidOption", option)
        assert.strictEqual(error._tag === "InvalidOption" ? error.option : "", option)
      }
    }).pipe(Effect.provide(Live()))
  )

  it.effect("two consumers of one group in one process get names of their own by default", () =>
    Effect.gen(function* () {
      const seen = yield* Ref.make<Array<string>>([])
      for (let i = 0; i < 2; i++) {
        yield* Consumer.make(payments, {
          group: "g",
          batchSize: 1,
          shutdownTimeout: 0, // the held handlers are interrupted when the test ends
          handle: (_, ctx) => Ref.update(seen, (xs) => [...xs, ctx.consumer]).pipe(Effect.andThen(Effect.never))
        })
      }
      yield* Publisher.publishAll(payments, [pay(1, "a"), pay(2, "b")])
      yield* until(
        Effect.map(Ref.get(seen), (xs) => xs.length >= 2),
        50
      )
      const names = yield* Ref.get(seen)
      assert.strictEqual(new Set(names).size, 2, `distinct names: ${names.join(", ")}`)
    }).pipe(Effect.provide(Live()))
  )

  it("type level: a mapping that misses a tag of the handler's errors does not compile", () => {
    const handle = (_: Payment): Effect.Effect<void, Transient | Declined | BrokerError.BrokerError> => Effect.void
    // complete (BrokerError classifies itself with isRetryable, so it may be left out)
    Consumer.layer(payments, { group: "g", handle, errors: { Transient: "retry", Declined: "dead-letter" } })
    Consumer.layer(payments, {
      group: "g",
      handle,
      // @ts-expect-error Declined is missing from the mapping
      errors: { Transient: "retry" }
    })
    // @ts-expect-error a handler that can fail needs an errors mapping
    Consumer.layer(payments, { group: "g", handle })
    Consumer.layer(payments, {
      group: "g",
      handle,
      // @ts-expect-error an outcome must be retry, dead-letter or ignore
      errors: { Transient: "retry", Declined: "explode" }
    })
    // a handler that cannot fail needs no mapping
    const layer = Consumer.layer(payments, { group: "g", handle: () => Effect.void })
    assert.isTrue(Layer.isLayer(layer))
  })

  it.effect("handleBatch takes a whole read and acks it at once; handle is not called", () =>
    Effect.gen(function* () {
      const batches: Array<number> = []
      let single = 0
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        batchSize: 50,
        handle: () => Effect.sync(() => single++),
        handleBatch: (items) => Effect.sync(() => batches.push(items.length))
      })
      yield* Publisher.publishAll(
        payments,
        Array.from({ length: 20 }, (_, i) => pay(i))
      )
      yield* until(Effect.map(pending, (p) => batches.reduce((a, b) => a + b, 0) === 20 && p.length === 0))
      assert.strictEqual(single, 0)
      assert.isTrue(
        batches.some((n) => n > 1),
        `reads were handled as batches: ${batches.join(",")}`
      )
    }).pipe(Effect.provide(Live()))
  )

  it.effect(
    "a failing handleBatch falls back to handle per message: the poison one is dead-lettered, the rest processed",
    () =>
      Effect.gen(function* () {
        const handled: Array<string> = []
        let batchCalls = 0
        yield* Consumer.make(payments, {
          group: "billing",
          consumer: "c1",
          batchSize: 50,
          handle: (p) =>
            p.id === "p-3" ? Effect.fail(new Declined({ why: "poison" })) : Effect.sync(() => handled.push(p.id)),
          handleBatch: (items) =>
            Effect.suspend(() => {
              batchCalls++
              return items.some((i) => i.message.id === "p-3")
                ? Effect.fail(new Declined({ why: "poison in the batch" }))
                : Effect.sync(() => handled.push(...items.map((i) => i.message.id)))
            }),
          errors: { Declined: "dead-letter" }
        })
        yield* Publisher.publishAll(
          payments,
          Array.from({ length: 6 }, (_, i) => pay(i))
        )
        yield* until(Effect.map(pending, (p) => handled.length === 5 && p.length === 0))
        yield* yieldMany
        assert.deepStrictEqual([...handled].sort(), ["p-0", "p-1", "p-2", "p-4", "p-5"])
        assert.isAtLeast(batchCalls, 1)
        const dead = yield* DeadLetter.list("payments")
        assert.deepStrictEqual(
          dead.map((d) => d.reason),
          ["permanent"]
        )
        assert.include(dead[0]!.envelope?.data, '"p-3"')
      }).pipe(Effect.provide(Live()))
  )

  it.effect("with handleBatch, concurrency N handles N reads at once (no per-key order)", () =>
    Effect.gen(function* () {
      const release = yield* Deferred.make<void>()
      const started: Array<number> = []
      let handled = 0
      yield* Consumer.make(payments, {
        group: "billing",
        consumer: "c1",
        batchSize: 5,
        concurrency: 2,
        handle: () => Effect.void,
        handleBatch: (items) =>
          Effect.gen(function* () {
            started.push(items.length)
            if (started.length === 1) yield* Deferred.await(release) // the first read is stuck
            handled += items.length
          })
      })
      yield* Publisher.publishAll(
        payments,
        Array.from({ length: 5 }, (_, i) => pay(i))
      )
      yield* until(Effect.sync(() => started.length === 1))
      yield* Publisher.publishAll(
        payments,
        Array.from({ length: 5 }, (_, i) => pay(i + 5))
      )
      yield* until(Effect.sync(() => handled === 5))
      assert.strictEqual(started.length, 2, "the second read was handled while the first was still in flight")
      yield* Deferred.succeed(release, undefined)
      yield* until(Effect.map(pending, (p) => handled === 10 && p.length === 0))
    }).pipe(Effect.provide(Live({ orderedPerKey: false })))
  )
})
