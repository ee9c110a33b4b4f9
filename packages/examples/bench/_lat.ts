import { randomUUID } from "node:crypto"
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, Inbox, Outbox, OutboxRelay, SqlStore, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer, Redacted } from "effect"
import { SqlClient } from "effect/sql"
import { percentile } from "./harness.ts"
import { Order, order } from "./payload.ts"

const schema = `lat_${randomUUID().replaceAll("-", "").slice(0, 8)}`
const env = Layer.mergeAll(Outbox.layer(), Inbox.layer({ cleanupInterval: 0 })).pipe(
  Layer.provideMerge(SqlStore.layer({ schema, partitions: 8 })),
  Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })),
  Layer.provideMerge(
    PgClient.layer({ url: Redacted.make("postgres://postgres@127.0.0.1:5432/test"), maxConnections: 12 })
  ),
  Layer.orDie
)
const total = 4000
const t0 = new Map<string, number>(),
  tc = new Map<string, number>(),
  th = new Map<string, number>(),
  td = new Map<string, number>()
await Effect.runPromise(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* Effect.addFinalizer(() => Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw))
    yield* sql.unsafe(`CREATE TABLE ${schema}.effects (order_id text NOT NULL)`).raw
    const topic = Topic.make("lat-orders", Order, { key: (o) => o.orderId })
    const insert = `INSERT INTO ${schema}.effects (order_id) SELECT unnest($1::text[])`
    const inbox = Inbox.handlers(
      (items: ReadonlyArray<Consumer.BatchItem<Order>>) =>
        sql.unsafe(insert, [`{${items.map((i) => i.message.orderId).join(",")}}`]).raw
    )
    const finished = Promise.withResolvers<void>()
    yield* Effect.forkScoped(
      Consumer.make(topic, {
        group: "g",
        consumer: "c1",
        batchSize: 500,
        handle: (o, ctx) =>
          Effect.sync(() => th.set(o.orderId, performance.now())).pipe(
            Effect.andThen(inbox.handle(o, ctx)),
            Effect.tap(() =>
              Effect.sync(() => {
                td.set(o.orderId, performance.now())
                if (td.size === total) finished.resolve()
              })
            )
          ),
        handleBatch: (items) =>
          Effect.sync(() => {
            const n = performance.now()
            for (const i of items) th.set(i.message.orderId, n)
          }).pipe(
            Effect.andThen(inbox.handleBatch(items)),
            Effect.tap(() =>
              Effect.sync(() => {
                const n = performance.now()
                for (const i of items) td.set(i.message.orderId, n)
                if (td.size === total) finished.resolve()
              })
            )
          )
      })
    )
    yield* Effect.forkScoped(OutboxRelay.run({ batchSize: 500 }))
    yield* Effect.sleep("300 millis")
    const start = performance.now()
    for (let i = 0; i < total; i++) {
      const wait = start + i - performance.now()
      if (wait > 1) yield* Effect.sleep(Math.floor(wait))
      const o = order(i)
      t0.set(o.orderId, performance.now())
      yield* Outbox.transaction(Outbox.publish(topic, o))
      tc.set(o.orderId, performance.now())
    }
    yield* Effect.promise(() => finished.promise)
  }).pipe(Effect.scoped, Effect.provide(env))
)
const d = (a: Map<string, number>, b: Map<string, number>) => [...a.keys()].map((k) => a.get(k)! - b.get(k)!)
for (const [n, xs] of [
  ["commit", d(tc, t0)],
  ["relay+hop", d(th, tc)],
  ["inbox", d(td, th)],
  ["total", d(td, t0)]
] as const)
  console.log(n.padEnd(10), [50, 90, 99, 99.9].map((p) => percentile(xs, p).toFixed(2)).join("  "))
