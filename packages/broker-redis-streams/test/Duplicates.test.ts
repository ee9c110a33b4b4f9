/**
 * Duplicates injected on Redis by re-adding: while a consumer with the
 * inbox on Postgres works through a keyed backlog, another client re-adds
 * copies of entries already in the stream (same message id, new entry id),
 * shuffled and late. Redis sees new entries, so nothing in the broker can
 * tell them apart: the inbox must apply each effect once, and the effects of
 * a key must still be applied in their order.
 */
import { Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { Inbox, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber, Layer, Random, Redacted, Schema } from "effect"
import * as Redis from "effect/persistence/Redis"
import { brokerLayer, effectCounts, freshStore, Prefix, pendingOf, pgUrl, streamKey } from "./helpers.ts"

const Step = Schema.Struct({ account: Schema.String, n: Schema.Int })
const steps = Topic.make("steps", Step, { key: (s) => s.account })

describe("duplicates injected on Redis", () => {
  it.live(
    "copies re-added shuffled and late: each effect once, each key's effects in order",
    () =>
      Effect.gen(function* () {
        const { sql, schema, store } = yield* freshStore(
          "dup",
          "applied bigserial, message_id text NOT NULL, account text NOT NULL, n int NOT NULL"
        )
        const redis = yield* Redis.Redis
        const prefix = yield* Prefix
        const accounts = 5
        const perAccount = 40
        const total = accounts * perAccount
        yield* Publisher.publishAll(
          steps,
          Array.from({ length: total }, (_, i) => ({ account: `a-${i % accounts}`, n: Math.floor(i / accounts) }))
        )
        const stream = streamKey(prefix, "steps")
        // the chaos client: copies of 150 entries, in random order, each re-added 0-3 ms after the last
        const originals = yield* redis.send<Array<[string, Array<string>]>>("XRANGE", stream, "-", "+")
        assert.strictEqual(originals.length, total)
        const picks = yield* Random.shuffle(originals)
        const chaos = yield* Effect.forkScoped(
          Effect.forEach(
            picks.slice(0, 150),
            ([, fields]) =>
              Effect.andThen(
                Effect.flatMap(Random.nextIntBetween(0, 4), (ms) => Effect.sleep(ms)),
                redis.send("XADD", stream, "*", ...fields)
              ),
            { discard: true }
          )
        )
        let deliveries = 0
        const inbox = Inbox.handlers(
          (items: ReadonlyArray<Consumer.BatchItem<typeof Step.Type>>) =>
            sql.unsafe(
              `INSERT INTO ${schema}.effects (message_id, account, n) SELECT * FROM unnest($1::text[], $2::text[], $3::int[])`,
              [items.map((i) => i.context.id), items.map((i) => i.message.account), items.map((i) => i.message.n)]
            ).raw
        )
        const consumer = Layer.effectDiscard(
          Consumer.make(steps, {
            group: "ledger",
            consumer: "c1",
            batchSize: 7,
            handle: (message, context) =>
              Effect.andThen(
                Effect.sync(() => {
                  deliveries++
                }),
                inbox.handle(message, context)
              ),
            handleBatch: (items) =>
              Effect.andThen(
                Effect.sync(() => {
                  deliveries += items.length
                }),
                inbox.handleBatch(items)
              )
          })
        ).pipe(Layer.provide(Inbox.layer()), Layer.provide(Layer.succeed(SqlStore.SqlStore, store)))
        const counts = effectCounts(sql, schema, "message_id")
        const pending = Effect.map(pendingOf(stream, "ledger"), (p) => p.count)
        yield* Effect.gen(function* () {
          yield* Fiber.join(chaos)
          for (let i = 0; i < 500; i++) {
            if (deliveries >= total + 150 && (yield* pending) === 0) break
            yield* Effect.sleep("20 millis")
          }
        }).pipe(Effect.provide(consumer), Effect.scoped)
        const applied = yield* counts
        assert.strictEqual(applied.distinct, total, "every message's effect applied")
        assert.strictEqual(applied.rows, total, "each exactly once, though 150 came twice")
        assert.strictEqual(deliveries, total + 150, "the copies were delivered too (and skipped by the inbox)")
        assert.strictEqual(yield* pending, 0, "everything acked")
        const inOrder = yield* sql.unsafe<{ account: string; n: number }>(
          `SELECT account, n FROM ${schema}.effects ORDER BY applied`
        ).withoutTransform
        for (let a = 0; a < accounts; a++) {
          assert.deepStrictEqual(
            inOrder.filter((r) => r.account === `a-${a}`).map((r) => Number(r.n)),
            Array.from({ length: perAccount }, (_, n) => n),
            `account a-${a}: effects in order`
          )
        }
        assert.deepStrictEqual(yield* DeadLetter.list("steps"), [], "nothing dead-lettered")
      }).pipe(
        Effect.scoped,
        Effect.provide(
          Layer.mergeAll(
            Publisher.layer().pipe(Layer.provideMerge(brokerLayer())),
            PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 4 })
          )
        )
      ),
    60_000
  )
})
