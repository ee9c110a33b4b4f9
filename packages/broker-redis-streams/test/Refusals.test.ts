/**
 * Refusals on real Redis (and Postgres for the relay): a refusal that will recur is not retried, nothing is
 * appended twice by retries, and a durability level the server cannot meet is refused at construction.
 */
import { Broker, BrokerError, Topic } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { Outbox, OutboxRelay, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Cause, Context, Effect, Exit, Layer, Redacted, Schema, Stream } from "effect"
import * as Redis from "effect/persistence/Redis"
import { RedisStreamsBroker } from "../src/index.ts"
import { brokerLayer, freshStore, mainUrl, Prefix, pgUrl, streamKey } from "./helpers.ts"

const Order = Schema.Struct({ id: Schema.String })
const good = Topic.make("good", Order, { key: (o) => o.id })
const bad = Topic.make("bad", Order, { key: (o) => o.id })

/**
 * Headers enough that no single XADD from a script can carry the entry — in the field-per-attribute layout,
 * one field per header (the compact layout carries them in one JSON field, so these tests publish with
 * `layout: "fields"` to get a refusal from Redis).
 */
const tooManyHeaders = Object.fromEntries(Array.from({ length: 4000 }, (_, i) => [`h${i}`, "x"]))

describe("refusals", () => {
  it.live("a row Redis refuses goes aside with its reason; the rest of its batch is appended exactly once", () =>
    Effect.gen(function* () {
      const { sql, schema, store } = yield* freshStore("refusal", "id text")
      const prefix = yield* Prefix
      const redis = yield* Redis.Redis
      const withStore = <A, E, R>(e: Effect.Effect<A, E, R>) => Effect.provideService(e, SqlStore.SqlStore, store)
      const outbox = yield* withStore(Outbox.make())
      // one transaction: five good rows on one topic, and a poison row on another
      yield* withStore(
        Outbox.transaction(
          Effect.andThen(
            outbox.publishAll(
              good,
              Array.from({ length: 5 }, (_, i) => ({ id: `g-${i}` }))
            ),
            outbox.publish(bad, { id: "poison" }, { headers: tooManyHeaders })
          )
        )
      )
      const relay = yield* withStore(OutboxRelay.make({ listen: false }))
      // several cycles, as a running relay would do (before: every cycle appended the good rows again)
      for (let i = 0; i < 5; i++) yield* Effect.ignore(relay.drain)
      assert.strictEqual(Number(yield* redis.send<number>("XLEN", streamKey(prefix, "good"))), 5, "appended once")
      assert.strictEqual(Number(yield* redis.send<number>("XLEN", streamKey(prefix, "bad"))), 0)
      const dead = yield* withStore(OutboxRelay.deadRows())
      assert.strictEqual(dead.length, 1)
      assert.strictEqual(dead[0]!.reason, "rejected")
      assert.include(dead[0]!.error, "fields")
      const left = yield* sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${schema}.outbox`).withoutTransform
      assert.strictEqual(Number(left[0]!.n), 0, "nothing left to retry")
    }).pipe(
      Effect.scoped,
      Effect.provide(
        Layer.mergeAll(
          brokerLayer(mainUrl, { layout: "fields" }),
          PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 4 })
        )
      )
    )
  )

  it.live("publishEach: a refused message fails alone, not retryable; the others are stored", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const [a, b, c] = BrokerTest.messages("mixed", 3, { keyOf: () => "same-key" })
      const outcomes = yield* broker.publishEach([a!, { ...b!, headers: tooManyHeaders }, c!])
      assert.deepStrictEqual(
        outcomes.map((o) => o._tag),
        ["Stored", "Failed", "Stored"]
      )
      const failed = outcomes[1]!
      assert.isTrue(failed._tag === "Failed" && !failed.error.isRetryable, "a refusal is not retryable")
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      assert.strictEqual(Number(yield* redis.send<number>("XLEN", streamKey(prefix, "mixed"))), 2, "the other two")
      assert.deepStrictEqual(yield* broker.deadLetters("mixed"), [])
    }).pipe(Effect.provide(brokerLayer(mainUrl, { layout: "fields" })))
  )

  for (const layout of ["compact", "fields"] as const) {
    it.live(`publishEach (${layout} layout): after a failed XADD the rest of its partition is not attempted`, () =>
      Effect.gen(function* () {
        const broker = yield* Broker.Broker
        const redis = yield* Redis.Redis
        const prefix = yield* Prefix
        const stream = streamKey(prefix, "exhausted")
        // a stream at the last possible id: every further XADD with an automatic id fails on the server
        yield* redis.send("XADD", stream, "18446744073709551615-18446744073709551615", "x", "1")
        const outcomes = yield* broker.publishEach(BrokerTest.messages("exhausted", 3, { keyOf: () => "k" }))
        assert.deepStrictEqual(
          outcomes.map((o) => o._tag),
          ["Failed", "Failed", "Failed"]
        )
        const [first, ...rest] = outcomes.map((o) => (o._tag === "Failed" ? o.error.message : ""))
        assert.include(first, "exhausted the last possible ID")
        for (const message of rest) assert.include(message, "not attempted: an earlier message of its partition failed")
        assert.strictEqual(Number(yield* redis.send<number>("XLEN", stream)), 1, "nothing appended")
      }).pipe(Effect.provide(brokerLayer(mainUrl, { layout })))
    )
  }

  it.live("a durability level the server cannot meet is refused when the layer is built, naming the option", () =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      const info = String(yield* redis.send<string>("INFO", "server"))
      const [major, minor] = (/redis_version:(\d+)\.(\d+)/.exec(info) ?? ["", "0", "0"]).slice(1).map(Number)
      const hasWaitaof = major! > 7 || (major === 7 && minor! >= 2)
      const aof = String(yield* redis.send<unknown>("CONFIG", "GET", "appendonly")).includes("yes")
      const exit = yield* Effect.exit(
        Effect.scoped(Layer.build(RedisStreamsBroker.layer({ prefix, durability: "waitaof-local" })))
      )
      if (hasWaitaof && aof) {
        assert.isTrue(Exit.isSuccess(exit))
        return
      }
      // before: the layer was built, and every publish failed (and was retried, appending again) forever
      assert.isTrue(Exit.isFailure(exit), "refused at construction")
      const error = Exit.isFailure(exit) ? Cause.findErrorOption(exit.cause) : undefined
      assert.isTrue(error?._tag === "Some" && BrokerError.isBrokerError(error.value))
      const reason = error?._tag === "Some" ? error.value.reason : undefined
      assert.strictEqual(reason?._tag, "InvalidArgument")
      assert.include(String(reason?.message), "durability waitaof-local")
      assert.include(String(reason?.message), hasWaitaof ? "appendonly" : "7.2")
    }).pipe(Effect.provide(brokerLayer()))
  )

  it.live("publishers and consumers configured with different partition counts are told at once", () =>
    Effect.gen(function* () {
      const prefix = yield* Prefix
      const four = yield* Broker.Broker
      yield* four.publish(BrokerTest.messages("split", 4))
      // the same topic through a broker configured with 1 partition
      const context = yield* Layer.build(RedisStreamsBroker.layer({ prefix, partitions: 1 }))
      const one = Context.get(context, Broker.Broker)
      const subscribed = yield* Effect.flip(
        Stream.runDrain(Stream.take(one.subscribe({ topic: "split", group: "g", consumer: "c" }), 1))
      )
      assert.strictEqual(subscribed.reason._tag, "InvalidArgument")
      assert.include(subscribed.message, "4 partition(s)")
      const published = yield* Effect.flip(one.publish(BrokerTest.messages("split", 1)))
      assert.strictEqual(published.reason._tag, "InvalidArgument")
      assert.isFalse(published.isRetryable)
    }).pipe(Effect.scoped, Effect.provide(brokerLayer(mainUrl, { partitions: 4 })))
  )
})
