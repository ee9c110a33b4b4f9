/**
 * `PipelineTest` — the outbox → relay → broker → consumer-with-inbox path on
 * Postgres, over whatever broker layer is given: the same test body for every
 * broker, only the layer differs.
 *
 * - P01: orders written with their messages in transactions, moved by the
 *   relay, consumed by two consumers of one group through the inbox: every
 *   order's effect applied once. The relay's batch is then published a second
 *   time (a relay that died between publish and mark): the inbox skips the
 *   copies (or the broker drops them, if it deduplicates by message id).
 * - P02 (with a `restart` hook): the broker is restarted while two consumers
 *   work a backlog and the relay keeps publishing: nothing lost, each effect
 *   once.
 *
 * ```ts
 * PipelineTest.suite("nats-jetstream", { broker: brokerLayer(), restart: Effect.promise(() => server.restart()) })
 * ```
 *
 * @since 0.1.0
 */
import { randomUUID } from "node:crypto"
import { type Broker, Consumer, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted, Schema } from "effect"
import { SqlClient } from "effect/sql"
import * as Inbox from "../Inbox.ts"
import * as Outbox from "../Outbox.ts"
import * as OutboxRelay from "../OutboxRelay.ts"
import * as SqlStore from "../SqlStore.ts"

const Order = Schema.Struct({ id: Schema.String, account: Schema.String })

/**
 * Options of {@link suite}.
 *
 * @since 0.1.0
 */
export interface Options<R> {
  /** The broker layer under test (built afresh for each case). */
  readonly broker: Layer.Layer<Broker.Broker | R, unknown>
  /** Restarts the broker (P02); the suite skips P02 without it. */
  readonly restart?: Effect.Effect<void, unknown, R> | undefined
  /** The Postgres URL (default `DATABASE_URL`, else the machine's `test` database). */
  readonly url?: string | undefined
}

/**
 * Registers the suite.
 *
 * @since 0.1.0
 */
export const suite = <R>(name: string, options: Options<R>): void => {
  const url = options.url ?? process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
  const orders = Topic.make(`pipeline-${randomUUID().slice(0, 8)}`, Order, { key: (o) => o.account })

  /** A store on a fresh schema with an `effects` table, dropped when the case ends. */
  const freshStore = Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const schema = `converge_pipe_${randomUUID().replaceAll("-", "").slice(0, 12)}`
    yield* Effect.addFinalizer(() => Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw))
    const store = yield* SqlStore.make({ schema, partitions: 2 })
    yield* sql.unsafe(`CREATE TABLE ${schema}.effects (order_id text NOT NULL)`).raw
    const counts = Effect.map(
      sql.unsafe<{ n: number; d: number }>(
        `SELECT count(*)::int AS n, count(DISTINCT order_id)::int AS d FROM ${schema}.effects`
      ).withoutTransform,
      (rows) => ({ rows: Number(rows[0]!.n), distinct: Number(rows[0]!.d) })
    )
    const unpublished = Effect.map(
      sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${schema}.outbox WHERE published_at IS NULL`)
        .withoutTransform,
      (rows) => Number(rows[0]!.n)
    )
    return { sql, schema, store, counts, unpublished }
  })

  /** Two consumers of one group, each effect written through the inbox; `deliveries` counts handler calls. */
  const consumers = (sql: SqlClient.SqlClient, schema: string, deliveries: { n: number }) => {
    const one = (consumer: string) =>
      Layer.effectDiscard(
        Effect.forkScoped(
          Consumer.make(orders, {
            group: "ledger",
            consumer,
            handle: (order, ctx) =>
              Effect.andThen(
                Effect.sync(() => deliveries.n++),
                Inbox.handler((o: typeof Order.Type) =>
                  Effect.asVoid(sql.unsafe(`INSERT INTO ${schema}.effects (order_id) VALUES ($1)`, [o.id]).raw)
                )(order, ctx)
              )
          })
        )
      )
    return Layer.mergeAll(one("c1"), one("c2"))
  }

  const waitFor = (check: Effect.Effect<boolean, unknown>, what: string) =>
    Effect.gen(function* () {
      for (let i = 0; i < 1500; i++) {
        if (yield* check) return
        yield* Effect.sleep("20 millis")
      }
      return yield* Effect.die(new Error(`timed out waiting for: ${what}`))
    })

  const Pg = PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })

  describe(`PipelineTest.suite(${name})`, () => {
    it.live(
      "P01 outbox → relay → broker → two consumers with the inbox: every effect once, also when the relay publishes a batch twice",
      () =>
        Effect.gen(function* () {
          const { sql, schema, store, counts, unpublished } = yield* freshStore
          const provideStore = <A, E, R2>(e: Effect.Effect<A, E, R2>) =>
            Effect.provideService(e, SqlStore.SqlStore, store)
          const outbox = yield* provideStore(Outbox.make())
          const total = 200
          for (let i = 0; i < total; i += 50) {
            yield* provideStore(
              Outbox.transaction(
                outbox.publishAll(
                  orders,
                  Array.from({ length: 50 }, (_, j) => ({ id: `o-${i + j}`, account: `a-${(i + j) % 7}` }))
                )
              )
            )
          }
          const relay = yield* provideStore(OutboxRelay.make({ listen: false, retention: "1 hour" }))
          // drains until `n` rows are published: a row waits while an older transaction anywhere on the server
          // is still open (the relay's visibility gate), and other tests share this server
          const drained = (n: number) =>
            Effect.gen(function* () {
              let published = 0
              for (let i = 0; i < 500 && published < n; i++) {
                published += yield* relay.drain
                if (published < n) yield* Effect.sleep("20 millis")
              }
              return published
            })
          assert.strictEqual(yield* drained(total), total, "the relay moved every message to the broker")
          assert.strictEqual(yield* unpublished, 0)
          // the last 20 messages once more (same ids), as a relay that died between publish and mark publishes
          // its batch a second time
          const columns = "partition, message_id, topic, type, source, key, time, attempt, headers, data, created_at"
          yield* sql.unsafe(
            `INSERT INTO ${schema}.outbox (${columns}) SELECT ${columns} FROM ${schema}.outbox ORDER BY seq DESC LIMIT 20`
          ).raw
          assert.strictEqual(yield* drained(20), 20, "the relay published the 20 messages a second time")
          const deliveries = { n: 0 }
          yield* Effect.gen(function* () {
            yield* waitFor(
              Effect.map(counts, (c) => c.distinct >= total),
              `all ${total} effects`
            )
            yield* Effect.sleep("500 millis")
          }).pipe(
            Effect.provide(
              consumers(sql, schema, deliveries).pipe(
                Layer.provideMerge(Inbox.layer()),
                Layer.provide(Layer.succeed(SqlStore.SqlStore, store))
              )
            )
          )
          const c = yield* counts
          assert.strictEqual(c.distinct, total, "every order's effect")
          assert.strictEqual(c.rows, total, "each effect once")
          assert.isAtLeast(deliveries.n, total)
          assert.isAtMost(deliveries.n, total + 20, "at most the republished copies arrived twice")
        }).pipe(Effect.scoped, Effect.provide(Layer.mergeAll(options.broker, Pg))),
      60_000
    )

    const restart = options.restart
    if (restart === undefined) {
      it.skip("P02 broker restarted under running consumers [skipped: no restart hook]", () => {})
    } else {
      it.live(
        "P02 the broker restarted while two consumers work a backlog and the relay publishes: nothing lost, each effect once",
        () =>
          Effect.gen(function* () {
            const { sql, schema, store, counts, unpublished } = yield* freshStore
            const provideStore = <A, E, R2>(e: Effect.Effect<A, E, R2>) =>
              Effect.provideService(e, SqlStore.SqlStore, store)
            const outbox = yield* provideStore(Outbox.make())
            const write = (from: number, n: number) =>
              provideStore(
                Outbox.transaction(
                  outbox.publishAll(
                    orders,
                    Array.from({ length: n }, (_, j) => ({ id: `o-${from + j}`, account: `a-${(from + j) % 7}` }))
                  )
                )
              )
            const total = 600
            yield* write(0, 300)
            const deliveries = { n: 0 }
            yield* Effect.gen(function* () {
              yield* waitFor(
                Effect.map(counts, (c) => c.rows >= 50),
                "the consumers are working the backlog"
              )
              yield* restart
              // more orders while (and after) the broker comes back
              for (let i = 300; i < total; i += 50) yield* write(i, 50)
              yield* waitFor(
                Effect.map(counts, (c) => c.distinct >= total),
                `all ${total} effects after the restart`
              )
              yield* waitFor(
                Effect.map(unpublished, (n) => n === 0),
                "the relay published everything"
              )
              yield* Effect.sleep("500 millis")
            }).pipe(
              Effect.provide(
                Layer.mergeAll(
                  consumers(sql, schema, deliveries),
                  OutboxRelay.layer({ pollInterval: "100 millis", listen: false })
                ).pipe(Layer.provideMerge(Inbox.layer()), Layer.provide(Layer.succeed(SqlStore.SqlStore, store)))
              )
            )
            const c = yield* counts
            assert.strictEqual(c.distinct, total, "nothing lost")
            assert.strictEqual(c.rows, total, "each effect once")
          }).pipe(Effect.scoped, Effect.provide(Layer.mergeAll(options.broker, Pg))),
        120_000
      )
    }
  })
}
