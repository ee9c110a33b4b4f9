/**
 * Sagas per second: a 3-step saga — a local step (the order row), then two
 * message-driven steps (charge a payment, reserve stock; each a command to a
 * service that answers through its inbox and outbox) — on the memory broker
 * and Postgres (`DATABASE_URL`), next to a hand-written orchestration doing
 * the same steps and writes without the engine, in the same run.
 *
 * - Converge: `Saga` on Effect's cluster workflow engine (`SagaPg`), the
 *   outbox and relay, the inbox, example 03's payments and inventory
 *   services. 400 sagas started at once; measured until every one is
 *   `completed` in the saga store.
 * - hand-written: `pg` and in-process queues: the coordinator keeps one
 *   state row per saga; each step is one transaction (the service's inbox
 *   claim + its write, or the coordinator's inbox claim + its state update +
 *   the next command), commands and replies go through JS arrays (the
 *   memory broker's role), 50 sagas in flight. It has no journal, no
 *   outbox, no timers and no recovery: the floor of what the steps cost.
 */
import { randomUUID } from "node:crypto"
import { MemoryBroker } from "@converge/broker-memory"
import { Saga } from "@converge/core"
import { Inbox, Outbox, OutboxRelay, SagaPg, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer, Redacted, Schema } from "effect"
import pg from "pg"
import * as Checkout from "../src/03-saga/saga.ts"
import { type Bench, median, rate, round } from "./harness.ts"

const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const sagas = 400
const inFlight = 50

const BenchSaga = Saga.make("bench-checkout", {
  payload: Checkout.Checkout,
  idempotencyKey: (c) => c.orderId,
  error: Schema.Union([Checkout.CardDeclined, Checkout.OutOfStock])
})

const BenchSagaLive = Saga.toLayer(BenchSaga, (checkout) =>
  Effect.gen(function* () {
    yield* Saga.step({
      name: "place-order",
      success: Schema.Void,
      run: SqlStore.SqlStore.use(({ sql, table }) =>
        sql.unsafe(
          `INSERT INTO ${table("orders")} (id, customer, sku, quantity, cents, status) VALUES ($1, $2, $3, $4, $5, 'pending')`,
          [checkout.orderId, checkout.customer, checkout.sku, checkout.quantity, checkout.cents]
        )
      ).pipe(Effect.asVoid, Effect.orDie),
      compensate: () => Effect.void
    })
    yield* Saga.request(
      Checkout.ChargePayment,
      { orderId: checkout.orderId, customer: checkout.customer, cents: checkout.cents },
      { name: "charge-payment", timeout: "60 seconds", compensate: () => Effect.void }
    )
    yield* Saga.request(
      Checkout.ReserveStock,
      { orderId: checkout.orderId, sku: checkout.sku, quantity: checkout.quantity },
      { name: "reserve-stock", timeout: "60 seconds" }
    )
  })
)

const checkout = (i: number, run: string): Checkout.Checkout => ({
  orderId: `${run}-${i}`,
  customer: `c${i % 97}`,
  sku: "tea",
  quantity: 1,
  cents: 1_000 + i
})

const convergeRun = (): Promise<number> => {
  const schema = `bench_saga_${randomUUID().replaceAll("-", "").slice(0, 10)}`
  const run = randomUUID().slice(0, 8)
  const Live = Layer.mergeAll(
    BenchSagaLive,
    SagaPg.replies({ topic: Checkout.replyTopic, group: "checkout", concurrency: 16 }),
    Layer.effectDiscard(Effect.all([Checkout.payments, Checkout.inventory], { discard: true }))
  ).pipe(
    Layer.provideMerge(SagaPg.layer({ replyTopic: Checkout.replyTopic, pollInterval: 200 })),
    Layer.provideMerge(Checkout.tables([["tea", 1_000_000]])),
    Layer.provideMerge(
      Layer.mergeAll(
        Outbox.layer(),
        Inbox.layer({ cleanupInterval: 0 }),
        OutboxRelay.layer({ pollInterval: "50 millis" })
      )
    ),
    Layer.provideMerge(SqlStore.layer({ schema, partitions: 8 })),
    Layer.provideMerge(MemoryBroker.layer()),
    Layer.provideMerge(Layer.effectDiscard(Effect.addFinalizer(() => SagaPg.dropStore(schema)))),
    Layer.provideMerge(PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 12 })),
    Layer.orDie
  )
  return Effect.runPromise(
    Effect.gen(function* () {
      const { sql, table } = yield* SqlStore.SqlStore
      // warm up: the engine's first workflow registers its entity
      yield* BenchSaga.workflow.execute(checkout(-1, run))
      const start = performance.now()
      for (let i = 0; i < sagas; i++) yield* BenchSaga.workflow.execute(checkout(i, run), { discard: true })
      for (;;) {
        const rows = yield* sql.unsafe<{ readonly n: number }>(
          `SELECT count(*)::int AS n FROM ${table("sagas")} WHERE status = 'completed' AND name = 'bench-checkout'`
        )
        if (rows[0]!.n >= sagas + 1) break
        yield* Effect.sleep(20)
      }
      return performance.now() - start
    }).pipe(Effect.scoped, Effect.provide(Live)) as Effect.Effect<number>
  )
}

// --- hand-written ----------------------------------------------------------------------------

interface Message {
  readonly id: string
  readonly saga: string
  readonly kind: "charge" | "charged" | "reserve" | "reserved"
}

const handWrittenRun = async (): Promise<number> => {
  const schema = `bench_hsaga_${randomUUID().replaceAll("-", "").slice(0, 10)}`
  const pool = new pg.Pool({ connectionString: pgUrl, max: 12 })
  const tx = async (f: (c: pg.PoolClient) => Promise<void>) => {
    const c = await pool.connect()
    try {
      await c.query("BEGIN")
      await f(c)
      await c.query("COMMIT")
    } catch (e) {
      await c.query("ROLLBACK")
      throw e
    } finally {
      c.release()
    }
  }
  await pool.query(`CREATE SCHEMA ${schema}`)
  await pool.query(`CREATE TABLE ${schema}.orders (id text PRIMARY KEY, customer text, sku text, quantity int, cents int, status text)
    ; CREATE TABLE ${schema}.saga_state (id text PRIMARY KEY, step text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())
    ; CREATE TABLE ${schema}.payments (id text PRIMARY KEY, order_id text, cents int, status text)
    ; CREATE TABLE ${schema}.stock (sku text PRIMARY KEY, units int NOT NULL)
    ; CREATE TABLE ${schema}.inbox (consumer text, message_id text, PRIMARY KEY (message_id, consumer))
    ; INSERT INTO ${schema}.stock VALUES ('tea', 1000000)`)
  const run = randomUUID().slice(0, 8)
  const queue: Array<Message> = []
  let wake: (() => void) | undefined
  const send = (m: Message) => {
    queue.push(m)
    wake?.()
  }
  const claim = (c: pg.PoolClient, consumer: string, id: string) =>
    c
      .query(`INSERT INTO ${schema}.inbox VALUES ($1, $2) ON CONFLICT DO NOTHING`, [consumer, id])
      .then((r) => r.rowCount === 1)
  let completed = 0
  let started = 0
  const done = Promise.withResolvers<void>()
  const startOne = async () => {
    const c = checkout(started++, run)
    await tx(async (db) => {
      await db.query(`INSERT INTO ${schema}.orders VALUES ($1, $2, $3, $4, $5, 'pending')`, [
        c.orderId,
        c.customer,
        c.sku,
        c.quantity,
        c.cents
      ])
      await db.query(`INSERT INTO ${schema}.saga_state (id, step) VALUES ($1, 'charging')`, [c.orderId])
    })
    send({ id: randomUUID(), saga: c.orderId, kind: "charge" })
  }
  const handle = async (m: Message) => {
    switch (m.kind) {
      case "charge":
        await tx(async (db) => {
          if (await claim(db, "payments", m.id)) {
            await db.query(`INSERT INTO ${schema}.payments VALUES ($1, $2, 1000, 'charged')`, [`pay-${m.saga}`, m.saga])
          }
        })
        return send({ id: randomUUID(), saga: m.saga, kind: "charged" })
      case "charged":
        await tx(async (db) => {
          if (await claim(db, "coordinator", m.id)) {
            await db.query(`UPDATE ${schema}.saga_state SET step = 'reserving', updated_at = now() WHERE id = $1`, [
              m.saga
            ])
          }
        })
        return send({ id: randomUUID(), saga: m.saga, kind: "reserve" })
      case "reserve":
        await tx(async (db) => {
          if (await claim(db, "inventory", m.id)) {
            await db.query(`UPDATE ${schema}.stock SET units = units - 1 WHERE sku = 'tea' AND units >= 1`)
          }
        })
        return send({ id: randomUUID(), saga: m.saga, kind: "reserved" })
      case "reserved":
        await tx(async (db) => {
          if (await claim(db, "coordinator", m.id)) {
            await db.query(`UPDATE ${schema}.saga_state SET step = 'completed', updated_at = now() WHERE id = $1`, [
              m.saga
            ])
          }
        })
        completed++
        if (completed === sagas) done.resolve()
        else if (started < sagas) await startOne()
    }
  }
  const workers = Array.from({ length: 12 }, async () => {
    while (completed < sagas) {
      const m = queue.shift()
      if (m === undefined) {
        await new Promise<void>((resolve) => {
          wake = resolve
          setTimeout(resolve, 5)
        })
        continue
      }
      await handle(m)
    }
  })
  const start = performance.now()
  await Promise.all(Array.from({ length: inFlight }, () => startOne()))
  await done.promise
  const ms = performance.now() - start
  await Promise.all(workers)
  await pool.query(`DROP SCHEMA ${schema} CASCADE`)
  await pool.end()
  return ms
}

/** The saga benchmark. */
export const benches: ReadonlyArray<Bench> = [
  {
    name: "saga/3-steps/memory+postgres",
    run: async () => {
      const converge: Array<number> = []
      const hand: Array<number> = []
      for (let i = 0; i < 2; i++) {
        converge.push(rate(sagas, await convergeRun()))
        hand.push(rate(sagas, await handWrittenRun()))
      }
      const c = median(converge)
      const h = median(hand)
      return [
        {
          bench: "saga/3-steps/memory+postgres",
          msgs_per_s: round(c),
          baseline: "hand-written pg orchestration (no engine)",
          baseline_msgs_per_s: round(h),
          ratio: round(c / h, 2)
        }
      ]
    }
  }
]
