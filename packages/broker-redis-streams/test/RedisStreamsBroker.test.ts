import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { Broker, BrokerError, Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { NodeRedis } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Context, Data, Effect, Fiber, Layer, Ref, Schedule, Schema, Stream } from "effect"
import * as Redis from "effect/persistence/Redis"
import { RedisStreamsBroker } from "../src/index.ts"
import { brokerLayer, mainUrl, Prefix, streamKey } from "./helpers.ts"

const Order = Schema.Struct({ orderId: Schema.String, cents: Schema.Int })
const orders = Topic.make("orders", Order, { key: (o) => o.orderId })

class Transient extends Data.TaggedError("Transient")<{}> {}

/** Waits until `cond` holds (real time), failing after `ms`. */
const until = <E, R>(cond: Effect.Effect<boolean, E, R>, ms = 15_000) =>
  Effect.gen(function* () {
    for (let waited = 0; waited < ms; waited += 50) {
      if (yield* cond) return
      yield* Effect.sleep(50)
    }
    assert.fail("condition not reached in time")
  })

describe("RedisStreamsBroker", () => {
  it.live("an entry written by a plain client with the documented fields is consumed as a typed message", () =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const seen = yield* Ref.make<
        Array<{ order: typeof Order.Type; key: string | undefined; tenant: string | undefined }>
      >([])
      yield* Consumer.make(orders, {
        group: "billing",
        consumer: "b1",
        // the legacy producer names its type its own way; this consumer's Schema reads it too
        types: ["com.example.order"],
        handle: (order, ctx) => Ref.update(seen, (xs) => [...xs, { order, key: ctx.key, tenant: ctx.headers.tenant }])
      })
      // what any Redis client (here: raw XADD) can write
      yield* redis.send(
        "XADD",
        streamKey(prefix, "orders"),
        "*",
        "ce_specversion",
        "1.0",
        "ce_id",
        "legacy-1",
        "ce_type",
        "com.example.order",
        "ce_source",
        "urn:legacy",
        "ce_time",
        "2026-11-26T10:00:00Z",
        "ce_topic",
        "orders",
        "ce_subject",
        "o-77",
        "ce_tenant",
        "acme",
        "content-type",
        "application/json",
        "data",
        '{"orderId":"o-77","cents":1234}'
      )
      yield* until(Effect.map(Ref.get(seen), (xs) => xs.length >= 1))
      assert.deepStrictEqual(yield* Ref.get(seen), [
        { order: { orderId: "o-77", cents: 1234 }, key: "o-77", tenant: "acme" }
      ])
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("a malformed entry from a plain client is dead-lettered with its reason; consumption continues", () =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const seen = yield* Ref.make<Array<string>>([])
      yield* Consumer.make(orders, {
        group: "billing",
        consumer: "b1",
        handle: (order) => Ref.update(seen, (xs) => [...xs, order.orderId])
      })
      yield* redis.send("XADD", streamKey(prefix, "orders"), "*", "hello", "world")
      yield* Publisher.publish(orders, { orderId: "o-1", cents: 1 })
      yield* until(Effect.map(Ref.get(seen), (xs) => xs.length >= 1))
      const dlq = yield* DeadLetter.list("orders")
      assert.strictEqual(dlq.length, 1)
      assert.strictEqual(dlq[0]!.reason, "malformed")
      assert.include(dlq[0]!.error!, "ce_id")
      assert.deepStrictEqual(dlq[0]!.fields, { hello: "world" })
      assert.isUndefined(dlq[0]!.envelope)
      const notReplayable = yield* Effect.flip(DeadLetter.replay("orders", dlq[0]!.id))
      assert.strictEqual(notReplayable._tag, "NotReplayable")
    }).pipe(Effect.provide(Publisher.layer().pipe(Layer.provideMerge(brokerLayer()))))
  )

  it.live("stream deleted under a running consumer: recovers without spinning (commands counted)", () =>
    Effect.gen(function* () {
      const sent = yield* Ref.make<Array<string>>([])
      // a broker of its own over a Redis client that counts every command, alive for the whole test
      const context = yield* Layer.build(
        RedisStreamsBroker.layer({ prefix: yield* Prefix, block: "500 millis" }).pipe(
          Layer.provide(countingRedis(sent))
        )
      )
      const broker = Context.get(context, Broker.Broker)
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const got = yield* Ref.make(0)
      const events = yield* Ref.make<Array<string>>([])
      yield* broker
        .subscribe({
          topic: "orders",
          group: "g",
          consumer: "c",
          onEvent: (e) => Ref.update(events, (xs) => [...xs, e._tag])
        })
        .pipe(
          Stream.runForEach((d) =>
            Effect.andThen(
              Ref.update(got, (n) => n + 1),
              d.ack
            )
          ),
          Effect.forkScoped
        )
      yield* broker.publish(BrokerTest.messages("orders", 3))
      yield* until(Effect.map(Ref.get(got), (n) => n >= 3))
      yield* redis.send("DEL", streamKey(prefix, "orders"))
      yield* Ref.set(sent, [])
      yield* Effect.sleep("2 seconds")
      const window = yield* Ref.get(sent)
      // a hot loop would issue thousands of commands in 2 seconds
      assert.isBelow(window.length, 120, `commands in the 2 s recovery window: ${window.length}`)
      assert.isAtMost(window.filter((c) => c === "XGROUP").length, 4, "groups recreated a few times at most")
      yield* broker.publish(BrokerTest.messages("orders", 2, { from: 3 }))
      yield* until(Effect.map(Ref.get(got), (n) => n >= 5))
      assert.include(yield* Ref.get(events), "GroupRecreated")
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live(
    "a consumer process killed with SIGKILL mid-batch: another consumer claims and processes everything",
    () =>
      Effect.gen(function* () {
        const prefix = yield* Prefix
        const broker = yield* Broker.Broker
        const ids = yield* broker.publish(BrokerTest.messages("orders", 30))
        const script = fileURLToPath(new URL("./fixtures/doomed-consumer.ts", import.meta.url))
        const child = spawn(process.execPath, [script, mainUrl, prefix, "orders"], {
          stdio: ["ignore", "pipe", "inherit"]
        })
        const held: Array<string> = []
        child.stdout.on("data", (chunk) => {
          for (const line of String(chunk).split("\n")) if (line.startsWith("got ")) held.push(line.slice(4))
        })
        yield* until(
          Effect.sync(() => held.length >= 10),
          20_000
        )
        child.kill("SIGKILL")
        yield* Effect.promise(
          () => new Promise((resolve) => (child.exitCode !== null ? resolve(null) : child.once("exit", resolve)))
        )
        assert.strictEqual(child.signalCode, "SIGKILL")
        const got = yield* Ref.make<Map<string, number>>(new Map())
        yield* broker.subscribe({ topic: "orders", group: "g", consumer: "rescuer", claimIdle: "500 millis" }).pipe(
          Stream.runForEach((d) =>
            Effect.andThen(
              Ref.update(got, (m) => new Map(m).set(d.entryId, d.deliveryCount)),
              d.ack
            )
          ),
          Effect.forkScoped
        )
        yield* until(
          Effect.map(Ref.get(got), (m) => m.size >= 30),
          20_000
        )
        const counts = yield* Ref.get(got)
        assert.deepStrictEqual([...counts.keys()].sort(), [...ids].sort(), "every message was processed")
        for (const id of held) assert.isAtLeast(counts.get(id)!, 2, `${id} was delivered again`)
      }).pipe(Effect.provide(brokerLayer())),
    60_000
  )

  it.live("nack with delay keeps the message id, sets the attempt, and reaches only the nacking group", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      yield* broker.publish(BrokerTest.messages("orders", 1))
      const [a] = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "a", consumer: "c" }), 1)
      )
      const [b] = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "b", consumer: "c" }), 1)
      )
      yield* b!.ack
      yield* a!.nack("300 millis", { attempt: 4 })
      const [again] = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "a", consumer: "c" }), 1)
      )
      assert.strictEqual(again!.envelope.id, a!.envelope.id)
      assert.strictEqual(again!.envelope.attempt, 4)
      assert.strictEqual(again!.deliveryCount, 2)
      yield* again!.ack
      const moreForB = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "b", consumer: "c" }), 1)
      ).pipe(Effect.timeoutOption("1 second"))
      assert.isTrue(moreForB._tag === "None", "group b did not get the redelivery")
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("trimming (maxLen) never removes entries pending in a group or not yet delivered", () =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const context = yield* Layer.build(RedisStreamsBroker.layer({ prefix, maxLen: 10, trimInterval: 0 }))
      const broker = Context.get(context, Broker.Broker)
      const length = Effect.map(redis.send<number>("XLEN", streamKey(prefix, "orders")), Number)
      yield* broker.publish(BrokerTest.messages("orders", 5))
      const held = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "g", consumer: "c", batchSize: 5 }), 5)
      )
      for (let i = 0; i < 5; i++) yield* broker.publish(BrokerTest.messages("orders", 10, { from: 5 + i * 10 }))
      assert.strictEqual(yield* length, 55, "nothing trimmed: the 5 held entries are pending, the rest undelivered")
      yield* broker.ackAll(held)
      const rest = yield* Stream.runCollect(
        Stream.take(broker.subscribe({ topic: "orders", group: "g", consumer: "c", batchSize: 100 }), 50)
      )
      assert.strictEqual(rest.length, 50, "every undelivered entry was still there")
      yield* broker.ackAll(rest)
      yield* broker.publish(BrokerTest.messages("orders", 1, { from: 55 }))
      assert.strictEqual(yield* length, 10, "trimmed to maxLen once nothing needs the old entries")
      const bad = yield* Effect.flip(Layer.build(RedisStreamsBroker.layer({ prefix, maxLen: 0 })).pipe(Effect.scoped))
      assert.strictEqual(bad.reason._tag, "InvalidArgument")
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("layerConfig reads the prefix and the confirmation level from configuration", () =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const context = yield* Layer.build(
        RedisStreamsBroker.layerConfig.pipe(
          Layer.provide(
            ConfigProvider.layer(
              ConfigProvider.fromUnknown({ CONVERGE_REDIS_PREFIX: `${prefix}:cfg`, CONVERGE_REDIS_DURABILITY: "reply" })
            )
          )
        )
      )
      yield* Context.get(context, Broker.Broker).publish(BrokerTest.messages("orders", 2))
      assert.strictEqual(Number(yield* redis.send<number>("XLEN", streamKey(`${prefix}:cfg`, "orders"))), 2)
      const bad = yield* Effect.flip(
        Layer.build(
          RedisStreamsBroker.layerConfig.pipe(
            Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ CONVERGE_REDIS_DURABILITY: "maybe" })))
          )
        ).pipe(Effect.scoped)
      )
      assert.include(String(bad), "CONVERGE_REDIS_DURABILITY")
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live(
    "ordered partitions: shared between live consumers, taken over when one leaves, per-key order kept",
    () =>
      Effect.gen(function* () {
        const prefix = yield* Prefix
        const context = yield* Layer.build(
          RedisStreamsBroker.layer({ prefix, orderedPerKey: true, partitions: 4, leaseTime: "1 second" })
        )
        const broker = Context.get(context, Broker.Broker)
        const applied = yield* Ref.make<Array<{ consumer: string; key: string; n: number }>>([])
        const start = (consumer: string) =>
          broker.subscribe({ topic: "orders", group: "g", consumer }).pipe(
            Stream.runForEach((d) =>
              Ref.update(applied, (xs) => [
                ...xs,
                { consumer, key: d.envelope.key!, n: (JSON.parse(d.envelope.data) as { n: number }).n }
              ]).pipe(Effect.andThen(d.ack))
            ),
            Effect.forkScoped
          )
        yield* start("a")
        const b = yield* start("b")
        yield* Effect.sleep("1500 millis") // both registered; the partitions are shared
        yield* broker.publish(BrokerTest.messages("orders", 200, { keyOf: (n) => `k${n % 10}` }))
        yield* until(Effect.map(Ref.get(applied), (xs) => xs.length >= 200))
        const first = yield* Ref.get(applied)
        assert.sameMembers([...new Set(first.map((x) => x.consumer))], ["a", "b"], "both consumers got partitions")
        yield* Fiber.interrupt(b)
        yield* broker.publish(BrokerTest.messages("orders", 100, { from: 200, keyOf: (n) => `k${n % 10}` }))
        yield* until(
          Effect.map(Ref.get(applied), (xs) => xs.length >= 300),
          20_000
        )
        const all = yield* Ref.get(applied)
        assert.isTrue(
          all.slice(200).every((x) => x.consumer === "a"),
          "after b left, a took over its partitions"
        )
        for (let k = 0; k < 10; k++) {
          assert.deepStrictEqual(
            all.filter((x) => x.key === `k${k}`).map((x) => x.n),
            Array.from({ length: 30 }, (_, i) => i * 10 + k),
            `key k${k} in publish order`
          )
        }
      }).pipe(Effect.provide(brokerLayer())),
    60_000
  )

  it.live(
    "ordered: the Consumer runtime (batch acks) keeps per-key order across retries",
    () =>
      Effect.gen(function* () {
        const prefix = yield* Prefix
        const context = yield* Layer.build(
          Publisher.layer().pipe(
            Layer.provideMerge(RedisStreamsBroker.layer({ prefix, orderedPerKey: true, partitions: 2 }))
          )
        )
        const applied = yield* Ref.make<Record<string, Array<number>>>({})
        yield* Consumer.make(orders, {
          group: "billing",
          consumer: "b1",
          concurrency: 8,
          ordering: "per-key",
          handle: (order, ctx) => {
            const n = order.cents
            // every 4th message fails its first attempt and backs off through the broker
            if (n % 4 === 0 && ctx.attempt === 1) return Effect.fail(new Transient())
            return Ref.update(applied, (m) => ({ ...m, [order.orderId]: [...(m[order.orderId] ?? []), n] }))
          },
          errors: { Transient: "retry" },
          retry: Schedule.spaced("50 millis"),
          inProcessDelayLimit: 0
        }).pipe(Effect.provide(context))
        yield* Publisher.publishAll(
          orders,
          Array.from({ length: 120 }, (_, n) => ({ orderId: `o-${n % 6}`, cents: n }))
        ).pipe(Effect.provide(context))
        const total = Effect.map(Ref.get(applied), (m) => Object.values(m).reduce((a, xs) => a + xs.length, 0))
        yield* until(
          Effect.map(total, (n) => n >= 120),
          30_000
        )
        const byKey = yield* Ref.get(applied)
        for (let k = 0; k < 6; k++) {
          assert.deepStrictEqual(
            byKey[`o-${k}`],
            Array.from({ length: 20 }, (_, i) => i * 6 + k),
            `key o-${k} applied in publish order`
          )
        }
      }).pipe(Effect.provide(brokerLayer())),
    60_000
  )

  it.live("invalid prefix and names are rejected with typed errors", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        Layer.build(RedisStreamsBroker.layer({ prefix: "bad prefix{}" })).pipe(Effect.scoped)
      )
      assert.isTrue(BrokerError.isBrokerError(error) && error.reason._tag === "InvalidArgument")
      const broker = yield* Broker.Broker
      const bad = yield* Effect.flip(broker.deadLetters("x{y}"))
      assert.strictEqual(bad.reason._tag, "InvalidArgument")
    }).pipe(Effect.provide(brokerLayer()))
  )
})

/** A Redis service that records every command name sent (shared and reserved connections). */
const countingRedis = (sent: Ref.Ref<Array<string>>) =>
  Layer.effect(
    Redis.Redis,
    Effect.gen(function* () {
      const inner = yield* Redis.Redis
      const record = (command: string) => Ref.update(sent, (xs) => [...xs, command.toUpperCase()])
      return Redis.Redis.of({
        ...inner,
        send: <A>(command: string, ...args: ReadonlyArray<string>) =>
          Effect.andThen(record(command), inner.send<A>(command, ...args)),
        eval:
          (script) =>
          (...params) =>
            Effect.andThen(record("EVALSHA"), inner.eval(script)(...params)),
        reserve: Effect.map(inner.reserve, (conn) => ({
          send: <A>(command: string, ...args: ReadonlyArray<string>) =>
            Effect.andThen(record(command), conn.send<A>(command, ...args)),
          eval: conn.eval
        }))
      })
    })
  ).pipe(Layer.provide(NodeRedis.layer({ url: mainUrl })))
