/**
 * Postgres restarted under load: a test-owned cluster is crashed (`pg_ctl stop
 * -m immediate`) and started again while a publisher commits orders with
 * outbox messages, the relay moves them to the broker, and a consumer with
 * an inbox applies them. Nothing committed is lost; every effect is single.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber, Layer, Redacted, Schedule, Schema } from "effect"
import { SqlClient } from "effect/sql"
import { Inbox, Outbox, OutboxRelay, SqlStore } from "../src/index.ts"
import { available, ownedPostgres } from "./helpers/OwnedPostgres.ts"

const Order = Schema.Struct({ id: Schema.String, account: Schema.String })
const orders = Topic.make("orders", Order, { key: (o) => o.account })
const total = 300

describe("Outbox under a Postgres restart", () => {
  it.live.skipIf(!available)(
    "relay and consumer resume after the server crashes and restarts; nothing lost, every effect single",
    () =>
      Effect.gen(function* () {
        const pg = yield* ownedPostgres(5500 + (process.pid % 50))
        const Pg = PgClient.layer({
          url: Redacted.make(pg.url),
          maxConnections: 6,
          connectTimeout: "2 seconds"
        })
        const Live = Layer.mergeAll(
          Outbox.layer(),
          Inbox.layer(),
          OutboxRelay.layer({ pollInterval: "100 millis" })
        ).pipe(
          Layer.provideMerge(SqlStore.layer({ partitions: 4 })),
          Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })),
          Layer.provideMerge(Pg)
        )
        yield* Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          yield* sql.unsafe(`CREATE TABLE effects (order_id text NOT NULL)`).raw
          yield* Effect.forkScoped(
            Consumer.make(orders, {
              group: "ledger",
              retry: Schedule.spaced("200 millis").pipe(Schedule.upTo({ times: 100 })),
              handle: Inbox.handler((o: typeof Order.Type) =>
                Effect.asVoid(sql.unsafe(`INSERT INTO effects (order_id) VALUES ($1)`, [o.id]).raw)
              )
            })
          )
          let failedCommits = 0
          const place = (i: number) =>
            Outbox.transaction(Outbox.publish(orders, { id: `o-${i}`, account: `a-${i % 7}` }, { id: `m-${i}` })).pipe(
              Effect.tapError(() => Effect.sync(() => failedCommits++)),
              // An unknown commit outcome is retried with the same message id: at worst a duplicate row, which the inbox absorbs.
              Effect.retry(Schedule.spaced("100 millis").pipe(Schedule.upTo({ times: 300 })))
            )
          const publisher = yield* Effect.forkScoped(
            Effect.forEach(
              Array.from({ length: total }, (_, i) => i),
              (i) => Effect.andThen(place(i), Effect.sleep("3 millis")),
              { discard: true }
            )
          )
          const effects = Effect.map(
            sql.unsafe<{ n: number; d: number }>(
              `SELECT count(*)::int AS n, count(DISTINCT order_id)::int AS d FROM effects`
            ).withoutTransform,
            (r) => ({ n: Number(r[0]!.n), d: Number(r[0]!.d) })
          )
          // Crash the server once the pipeline is busy.
          for (let i = 0; i < 500 && (yield* Effect.orElseSucceed(effects, () => ({ n: 0, d: 0 }))).d < 60; i++) {
            yield* Effect.sleep("10 millis")
          }
          const startedAt = sql.unsafe<{ t: string }>(`SELECT pg_postmaster_start_time()::text AS t`).withoutTransform
          const before = (yield* startedAt)[0]!.t
          const busy = yield* effects
          assert.isBelow(busy.d, total, "the crash happens while messages are still flowing")
          yield* Effect.sync(() => pg.crashRestart())
          yield* Fiber.join(publisher)
          let last = { n: 0, d: 0 }
          for (let i = 0; i < 600; i++) {
            last = yield* Effect.orElseSucceed(effects, () => last)
            if (last.d >= total) break
            yield* Effect.sleep("50 millis")
          }
          yield* Effect.sleep("300 millis")
          last = yield* effects
          const diag = yield* sql.unsafe<{ u: number; p: number; i: number }>(
            `SELECT (SELECT count(*)::int FROM converge.outbox WHERE published_at IS NULL) AS u, (SELECT count(*)::int FROM converge.outbox WHERE published_at IS NOT NULL) AS p, (SELECT count(*)::int FROM converge.inbox) AS i`
          ).withoutTransform
          const pendingInBroker = yield* MemoryBroker.MemoryBroker.use((m) => m.pending("orders", "ledger"))
          yield* Effect.logInfo(
            `after the restart: outbox+inbox ${JSON.stringify(diag[0])} effects=${JSON.stringify(last)} brokerPending=${JSON.stringify(pendingInBroker).slice(0, 300)}`
          )
          assert.strictEqual(last.d, total, "every committed order reached the consumer")
          assert.strictEqual(last.n, total, "each effect exactly once")
          assert.notStrictEqual((yield* startedAt)[0]!.t, before, "the server really restarted")
          yield* Effect.logInfo(`publisher transactions that failed and were retried: ${failedCommits}`)
          const lag = yield* OutboxRelay.OutboxRelay.use((r) => r.lag)
          assert.strictEqual(lag.unpublished, 0)
        }).pipe(Effect.provide(Live))
      }).pipe(Effect.scoped),
    90_000
  )
})
