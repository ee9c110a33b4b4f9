import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, DeadLetter, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Data, Deferred, Effect, Layer, Redacted, Schema } from "effect"
import { SqlClient } from "effect/sql"
import { Inbox, Outbox, OutboxRelay, SqlStore } from "../src/index.ts"
import { freshSchemaLayer } from "./helpers/schema.ts"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const schema = `converge_outbox_test_${process.pid}`

class NegativeAmount extends Data.TaggedError("NegativeAmount")<{ readonly id: string }> {}

const Order = Schema.Struct({ id: Schema.String, account: Schema.String, cents: Schema.Int })
const orders = Topic.make("orders", Order, { key: (o) => o.account })

const Pg = PgClient.layer({ url: Redacted.make(url), maxConnections: 6 })
const Store = SqlStore.layer({ schema, partitions: 4 })
const Live = Layer.mergeAll(Outbox.layer(), Inbox.layer(), OutboxRelay.layer({ pollInterval: "200 millis" })).pipe(
  Layer.provideMerge(Store),
  Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })),
  Layer.provideMerge(freshSchemaLayer(schema)),
  Layer.provideMerge(Pg)
)

// Type-level: publishing outside a transaction does not compile (checked by `pnpm check`).
export const outsideTransaction = (o: Schema.Schema.Type<typeof Order>) =>
  Effect.gen(function* () {
    // @ts-expect-error Outbox.publish requires Outbox.Transaction, which only Outbox.transaction / Inbox.once provide
    const program: Effect.Effect<Outbox.Receipt, Outbox.PublishError, Outbox.Outbox> = Outbox.publish(orders, o)
    return program
  })
// With every service provided but the transaction, the program still cannot run.
export const runOutside = (o: Schema.Schema.Type<typeof Order>) =>
  // @ts-expect-error Outbox.Transaction is still required: Effect.runPromise needs an Effect with no requirements
  Effect.runPromise(Outbox.publish(orders, o).pipe(Effect.provide(Outbox.layer()), Effect.provide(Live)))
export const runInside = (o: Schema.Schema.Type<typeof Order>) =>
  Effect.runPromise(
    Outbox.transaction(Outbox.publish(orders, o)).pipe(Effect.provide(Outbox.layer()), Effect.provide(Live))
  )
export const insideTransaction = (o: Schema.Schema.Type<typeof Order>) => {
  const program: Effect.Effect<
    Outbox.Receipt,
    Outbox.PublishError | import("effect/sql/SqlError").SqlError,
    Outbox.Outbox | SqlStore.SqlStore
  > = Outbox.transaction(Outbox.publish(orders, o))
  return program
}

layer(Live, { excludeTestServices: true, timeout: "30 seconds" })(
  "Outbox → broker → Consumer with Inbox (Postgres)",
  (it) => {
    describe("end to end", () => {
      it.effect("the publisher's trace continues in the consumer, across the outbox and the relay", () =>
        Effect.gen(function* () {
          const traced = Topic.make("traced", Order, { key: (o) => o.id })
          const seen = yield* Deferred.make<string | undefined>()
          yield* Effect.forkScoped(
            Consumer.make(traced, {
              group: "tracer",
              handle: () =>
                Effect.flatMap(Effect.option(Effect.currentSpan), (span) =>
                  Deferred.succeed(seen, span._tag === "Some" ? span.value.traceId : undefined)
                )
            })
          )
          const traceId = yield* Effect.withSpan(
            Effect.flatMap(Effect.currentSpan, (span) =>
              Effect.as(Outbox.transaction(Outbox.publish(traced, { id: "t-1", account: "a", cents: 1 })), span.traceId)
            ),
            "checkout"
          )
          assert.strictEqual(yield* Deferred.await(seen).pipe(Effect.timeout("20 seconds")), traceId)
        })
      )

      it.effect("relay options that cannot work are refused when the relay is built, naming the option", () =>
        Effect.gen(function* () {
          const bad: ReadonlyArray<readonly [string, OutboxRelay.Options]> = [
            ["batchSize", { batchSize: 0 }],
            ["batchSize", { batchSize: Number.NaN }],
            ["concurrency", { concurrency: -1 }],
            ["pollInterval", { pollInterval: 0 }],
            ["publishTimeout", { publishTimeout: Number.NaN }]
          ]
          for (const [option, options] of bad) {
            const error = yield* Effect.flip(OutboxRelay.make(options))
            assert.strictEqual(error._tag, "InvalidOption")
            assert.strictEqual(error.option, option)
          }
        })
      )

      it.effect("business rows and messages commit together; the consumer's effect is single under redelivery", () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          yield* sql.unsafe(`CREATE TABLE ${schema}.orders (id text PRIMARY KEY, cents int NOT NULL)`).raw
          yield* sql.unsafe(`CREATE TABLE ${schema}.ledger (order_id text NOT NULL, cents int NOT NULL)`).raw
          const place = (o: Schema.Schema.Type<typeof Order>) =>
            Outbox.transaction(
              Effect.gen(function* () {
                yield* sql.unsafe(`INSERT INTO ${schema}.orders (id, cents) VALUES ($1, $2)`, [o.id, o.cents]).raw
                if (o.cents < 0) return yield* Effect.fail("negative amount" as const)
                yield* Outbox.publish(orders, o)
              })
            )
          let deliveries = 0
          const broker = yield* MemoryBroker.MemoryBroker
          yield* broker.faults.duplicateNext("orders", 5)
          yield* Effect.forkScoped(
            Consumer.make(orders, {
              group: "ledger",
              handle: (order, ctx) =>
                Effect.andThen(
                  Effect.sync(() => deliveries++),
                  Inbox.handler((o: Schema.Schema.Type<typeof Order>) =>
                    Effect.asVoid(
                      sql.unsafe(`INSERT INTO ${schema}.ledger (order_id, cents) VALUES ($1, $2)`, [o.id, o.cents]).raw
                    )
                  )(order, ctx)
                )
            })
          )
          for (let i = 0; i < 20; i++) yield* place({ id: `o-${i}`, account: `a-${i % 3}`, cents: 100 + i })
          const refused = yield* place({ id: "o-bad", account: "a-0", cents: -1 }).pipe(Effect.flip)
          assert.strictEqual(refused, "negative amount")
          const ledgerCount = Effect.map(
            sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${schema}.ledger`).withoutTransform,
            (r) => Number(r[0]!.n)
          )
          for (let i = 0; i < 250 && (yield* ledgerCount) < 20; i++) yield* Effect.sleep("20 millis")
          yield* Effect.sleep("300 millis") // let duplicates arrive
          const rows = yield* sql.unsafe<{ order_id: string; n: number }>(
            `SELECT order_id, count(*)::int AS n FROM ${schema}.ledger GROUP BY order_id ORDER BY order_id`
          ).withoutTransform
          assert.strictEqual(rows.length, 20, "every committed order reached the ledger, the rolled-back one did not")
          assert.isTrue(
            rows.every((r) => Number(r.n) === 1),
            "exactly one ledger row per message despite duplicates"
          )
          assert.isAbove(deliveries, 20, "the broker delivered duplicates, which the inbox skipped")
          const orderRows = yield* sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${schema}.orders`)
            .withoutTransform
          assert.strictEqual(Number(orderRows[0]!.n), 20)
          const lag = yield* OutboxRelay.OutboxRelay.use((r) => r.lag)
          assert.strictEqual(lag.unpublished, 0)
        })
      )

      it.effect(
        "a handler slower than the claim idle time (false death): another consumer gets the message, the inbox keeps the effect single",
        () =>
          Effect.gen(function* () {
            const sql = yield* SqlClient.SqlClient
            yield* sql.unsafe(`CREATE TABLE ${schema}.slow_effects (order_id text NOT NULL)`).raw
            const slowOrders = Topic.make("slow-orders", Order, { key: (o) => o.account })
            const calls: Array<string> = []
            const handler = (name: string) => (order: Schema.Schema.Type<typeof Order>, ctx: Consumer.MessageContext) =>
              Effect.andThen(
                Effect.sync(() => calls.push(name)), // every delivery, before the inbox
                Inbox.handler((o: Schema.Schema.Type<typeof Order>) =>
                  Effect.gen(function* () {
                    yield* sql.unsafe(`INSERT INTO ${schema}.slow_effects (order_id) VALUES ($1)`, [o.id]).raw
                    if (name === "slow") yield* Effect.sleep("1500 millis") // holds its transaction open
                  })
                )(order, ctx)
              )
            yield* Effect.forkScoped(
              Consumer.make(slowOrders, {
                group: "ledger",
                consumer: "slow",
                // "fast" waits on slow's transaction for over a second after its claim: with 300 ms here too,
                // slow's next read would claim the message back (a second false death, also kept single by
                // the inbox); this test is about one
                claimIdle: "1 minute",
                handle: handler("slow")
              })
            )
            yield* Outbox.transaction(Outbox.publish(slowOrders, { id: "o-slow", account: "a", cents: 1 }))
            for (let i = 0; i < 250 && calls.length === 0; i++) yield* Effect.sleep("20 millis")
            // the second consumer starts while the first is still inside its handler
            yield* Effect.forkScoped(
              Consumer.make(slowOrders, {
                group: "ledger",
                consumer: "fast",
                claimIdle: "300 millis",
                handle: handler("fast")
              })
            )
            for (let i = 0; i < 250 && !calls.includes("fast"); i++) yield* Effect.sleep("20 millis")
            yield* Effect.sleep("2 seconds") // the slow one commits, the fast one's claim then finds its row
            const rows = yield* sql.unsafe<{ n: number }>(`SELECT count(*)::int AS n FROM ${schema}.slow_effects`)
              .withoutTransform
            assert.deepStrictEqual([...calls].sort(), ["fast", "slow"], "the message was delivered to both consumers")
            assert.strictEqual(Number(rows[0]!.n), 1, "one effect")
          }),
        20_000
      )

      it.effect(
        "Inbox.handlers: a read fails as a whole on one poison message, falls back per message: the rest commit once, the poison is dead-lettered",
        () =>
          Effect.gen(function* () {
            const sql = yield* SqlClient.SqlClient
            yield* sql.unsafe(`CREATE TABLE ${schema}.batch_effects (order_id text NOT NULL)`).raw
            const batchOrders = Topic.make("batch-orders", Order, { key: (o) => o.account })
            let batchCalls = 0
            yield* Effect.forkScoped(
              Consumer.make(batchOrders, {
                group: "ledger",
                batchSize: 50,
                ...Inbox.handlers((items: ReadonlyArray<Consumer.BatchItem<Schema.Schema.Type<typeof Order>>>) =>
                  Effect.gen(function* () {
                    if (items.length > 1) batchCalls++
                    for (const { message } of items) {
                      yield* sql.unsafe(`INSERT INTO ${schema}.batch_effects (order_id) VALUES ($1)`, [message.id]).raw
                      if (message.cents < 0) return yield* new NegativeAmount({ id: message.id })
                    }
                  })
                ),
                errors: { NegativeAmount: "dead-letter" }
              })
            )
            yield* Outbox.transaction(
              Outbox.publishAll(batchOrders, [
                { id: "b-1", account: "a", cents: 1 },
                { id: "b-2", account: "b", cents: -1 },
                { id: "b-3", account: "c", cents: 3 },
                { id: "b-4", account: "d", cents: 4 }
              ])
            )
            const effects = sql.unsafe<{ order_id: string; n: number }>(
              `SELECT order_id, count(*)::int AS n FROM ${schema}.batch_effects GROUP BY order_id ORDER BY order_id`
            ).withoutTransform
            for (let i = 0; i < 250 && (yield* effects).length < 3; i++) yield* Effect.sleep("20 millis")
            let dead: ReadonlyArray<unknown> = []
            for (let i = 0; i < 250 && dead.length === 0; i++) {
              dead = yield* DeadLetter.list("batch-orders")
              if (dead.length === 0) yield* Effect.sleep("20 millis")
            }
            const rows = yield* effects
            assert.isAtLeast(batchCalls, 1, "the read went to handleBatch first")
            assert.deepStrictEqual(
              rows.map((r) => [r.order_id, Number(r.n)]),
              [
                ["b-1", 1],
                ["b-3", 1],
                ["b-4", 1]
              ],
              "the failed batch rolled back; each good message committed once on its own"
            )
            assert.strictEqual(dead.length, 1)
            const letter = (yield* DeadLetter.list("batch-orders"))[0]!
            assert.strictEqual(letter.reason, "permanent")
            assert.include(letter.envelope?.data, '"b-2"')
          }),
        20_000
      )
    })
  }
)
