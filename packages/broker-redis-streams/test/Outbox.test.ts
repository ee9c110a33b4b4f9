/**
 * The outbox relay killed with SIGKILL between publish and mark, with Redis
 * as the broker and Postgres as the store: every message is delivered, and the
 * consumer's inbox keeps each effect single although the dead relay's batch
 * is published a second time.
 */
import { spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { fileURLToPath } from "node:url"
import { Consumer, Inbox, Outbox, OutboxRelay, SqlStore, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted, Schema } from "effect"
import { SqlClient } from "effect/sql"
import { brokerLayer, mainUrl, Prefix } from "./helpers.ts"

const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const Order = Schema.Struct({ id: Schema.String, account: Schema.String })
const orders = Topic.make("orders", Order, { key: (o) => o.account })

describe("Outbox relay on Redis", () => {
  it.live(
    "a relay process killed with SIGKILL between publish and mark: everything delivered, each effect once",
    () =>
      Effect.gen(function* () {
        const schema = `converge_kill_${randomUUID().replaceAll("-", "").slice(0, 12)}`
        const sql = yield* SqlClient.SqlClient
        yield* Effect.addFinalizer(() => Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw))
        const store = yield* SqlStore.make({ schema, partitions: 2 })
        yield* sql.unsafe(`CREATE TABLE ${schema}.effects (order_id text NOT NULL)`).raw
        const provideStore = <A, E, R>(e: Effect.Effect<A, E, R>) => Effect.provideService(e, SqlStore.SqlStore, store)
        const outbox = yield* provideStore(Outbox.make())
        const total = 50
        for (let i = 0; i < total; i += 10) {
          yield* provideStore(
            Outbox.transaction(
              outbox.publishAll(
                orders,
                Array.from({ length: 10 }, (_, j) => ({ id: `o-${i + j}`, account: `a-${(i + j) % 5}` }))
              )
            )
          )
        }

        const prefix = yield* Prefix
        const script = fileURLToPath(new URL("./fixtures/doomed-relay.ts", import.meta.url))
        const child = spawn(process.execPath, [script, pgUrl, schema, mainUrl, prefix], {
          stdio: ["ignore", "pipe", "inherit"]
        })
        let publishedByDoomed = 0
        child.stdout.on("data", (chunk) => {
          for (const line of String(chunk).split("\n")) {
            if (line.startsWith("published ")) publishedByDoomed += Number(line.slice(10))
          }
        })
        for (let i = 0; i < 1000 && publishedByDoomed === 0; i++) yield* Effect.sleep("20 millis")
        assert.strictEqual(publishedByDoomed, 20, "the doomed relay published one batch to Redis")
        child.kill("SIGKILL")
        yield* Effect.promise(
          () => new Promise((resolve) => (child.exitCode !== null ? resolve(null) : child.once("exit", resolve)))
        )
        assert.strictEqual(child.signalCode, "SIGKILL")
        const unpublished = sql.unsafe<{ n: number }>(
          `SELECT count(*)::int AS n FROM ${schema}.outbox WHERE published_at IS NULL`
        ).withoutTransform
        // The killed relay's transaction rolled back: its marks never happened.
        assert.strictEqual(Number((yield* unpublished)[0]!.n), total)

        let deliveries = 0
        const rescue = Layer.mergeAll(
          OutboxRelay.layer({ pollInterval: "100 millis", listen: false }),
          Layer.effectDiscard(
            Effect.forkScoped(
              Consumer.make(orders, {
                group: "ledger",
                handle: (order, ctx) =>
                  Effect.andThen(
                    Effect.sync(() => deliveries++),
                    Inbox.handler((o: typeof Order.Type) =>
                      Effect.asVoid(sql.unsafe(`INSERT INTO ${schema}.effects (order_id) VALUES ($1)`, [o.id]).raw)
                    )(order, ctx)
                  )
              })
            )
          )
        ).pipe(Layer.provideMerge(Inbox.layer()), Layer.provide(Layer.succeed(SqlStore.SqlStore, store)))
        const effects = sql.unsafe<{ n: number; d: number }>(
          `SELECT count(*)::int AS n, count(DISTINCT order_id)::int AS d FROM ${schema}.effects`
        ).withoutTransform
        yield* Effect.gen(function* () {
          for (let i = 0; i < 500; i++) {
            if (Number((yield* effects)[0]!.d) >= total && deliveries >= total + 20) break
            yield* Effect.sleep("20 millis")
          }
          yield* Effect.sleep("200 millis")
        }).pipe(Effect.provide(rescue))
        const [row] = yield* effects
        assert.strictEqual(Number(row!.d), total, "every message delivered")
        assert.strictEqual(Number(row!.n), total, "every effect exactly once")
        assert.isAtLeast(deliveries, total + 20, "the killed relay's 20 messages arrived twice; the inbox skipped them")
        assert.strictEqual(Number((yield* unpublished)[0]!.n), 0)
      }).pipe(
        Effect.scoped,
        Effect.provide(Layer.mergeAll(brokerLayer(), PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 6 })))
      ),
    60_000
  )
})
