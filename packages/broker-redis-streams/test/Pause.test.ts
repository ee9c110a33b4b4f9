/**
 * A test-owned Redis (AOF, fsync always) disturbed while two consumers of a
 * group work through a backlog with the inbox on Postgres:
 *
 * - paused (SIGSTOP) for longer than the claim idle time: when it runs
 *   again, the entries in flight look idle to Redis, so a consumer claims
 *   what the other is still handling (a false death);
 * - killed (SIGKILL) and restarted: every connection drops, acks in flight
 *   fail, the consumers reconnect and read their pending entries again.
 *
 * Either way nothing may be lost, and the inbox keeps every effect single.
 */
import { Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { Inbox, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted, Schema } from "effect"
import { brokerLayer, effectCounts, freshStore, OwnedRedis, Prefix, pendingOf, pgUrl, streamKey } from "./helpers.ts"

const Order = Schema.Struct({ id: Schema.String, account: Schema.String })
const orders = Topic.make("orders", Order, { key: (o) => o.account })

describe("a paused or restarted Redis under load", () => {
  const owned = new OwnedRedis(6440 + (process.pid % 50)) // 6440-6489: clear of the machine's 6379 and Broker.test's 6390-6439
  beforeAll(() => owned.start(), 20_000)
  afterAll(() => {
    owned.resume()
    return owned.stop()
  })

  const faults = [
    { fault: "pause", title: "paused (SIGSTOP) for 2.5x the claim idle time" },
    { fault: "restart", title: "killed (SIGKILL) and restarted" }
  ] as const
  it.live.each(faults)(
    "$title while two consumers work a backlog: nothing lost, each effect once",
    ({ fault }) =>
      Effect.gen(function* () {
        const { sql, schema, store } = yield* freshStore("pause", "order_id text NOT NULL, consumer text NOT NULL")
        const prefix = yield* Prefix
        const total = 300
        yield* Publisher.publishAll(
          orders,
          Array.from({ length: total }, (_, i) => ({ id: `o-${i}`, account: `a-${i % 7}` }))
        )
        const handledBy = { c1: 0, c2: 0 }
        let redelivered = 0
        const consumer = (name: "c1" | "c2") => {
          const inbox = Inbox.handlers((items: ReadonlyArray<Consumer.BatchItem<typeof Order.Type>>) =>
            Effect.gen(function* () {
              handledBy[name] += items.length
              yield* sql.unsafe(`INSERT INTO ${schema}.effects (order_id, consumer) SELECT unnest($1::text[]), $2`, [
                items.map((i) => i.message.id),
                name
              ]).raw
              yield* Effect.sleep("20 millis") // a handler that takes a while: reads are in flight
            })
          )
          return Consumer.make(orders, {
            group: "ledger",
            consumer: name,
            batchSize: 10,
            claimIdle: "1 second",
            handle: inbox.handle,
            handleBatch: (items) =>
              Effect.andThen(
                Effect.sync(() => {
                  redelivered += items.filter((i) => i.context.deliveryCount > 1).length
                }),
                inbox.handleBatch(items)
              )
          })
        }
        const applied = Effect.map(effectCounts(sql, schema), (c) => c.distinct)
        const pending = Effect.map(pendingOf(streamKey(prefix, "orders"), "ledger"), (p) => p.count)
        const env = Layer.mergeAll(Layer.effectDiscard(consumer("c1")), Layer.effectDiscard(consumer("c2"))).pipe(
          Layer.provide(Inbox.layer()),
          Layer.provide(Layer.succeed(SqlStore.SqlStore, store))
        )
        let faultAt = 0
        yield* Effect.gen(function* () {
          // strike once the consumers are busy
          for (let i = 0; i < 500 && (yield* applied) < 40; i++) yield* Effect.sleep("10 millis")
          faultAt = yield* applied
          if (fault === "pause") {
            owned.pause()
            yield* Effect.sleep("2500 millis") // 2.5x the claim idle time
            owned.resume()
          } else {
            yield* Effect.promise(() => owned.restart())
          }
          for (let i = 0; i < 1500; i++) {
            if ((yield* applied) >= total && (yield* pending) === 0) break
            yield* Effect.sleep("20 millis")
          }
        }).pipe(Effect.provide(env), Effect.scoped)
        assert.isBelow(faultAt, total, "the fault came while the backlog was being worked")
        const counts = yield* effectCounts(sql, schema)
        assert.strictEqual(counts.distinct, total, "every message's effect applied")
        assert.strictEqual(counts.rows, total, "each exactly once")
        assert.strictEqual(handledBy.c1 + handledBy.c2, total, "the inbox let each message through once")
        assert.strictEqual(yield* pending, 0, "everything acked")
        if (fault === "pause") {
          assert.isAbove(redelivered, 0, "the pause made entries in flight look idle: the other consumer claimed some")
        }
        assert.deepStrictEqual(yield* DeadLetter.list("orders"), [], "nothing dead-lettered")
      }).pipe(
        Effect.scoped,
        Effect.provide(
          Layer.mergeAll(
            Publisher.layer().pipe(Layer.provideMerge(brokerLayer(owned.url))),
            PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 6 })
          )
        )
      ),
    60_000
  )
})
