// A user's program, outside the workspace: outbox -> relay -> memory broker -> consumer with the inbox, on the
// Postgres server (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test), in a schema it drops.
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, Topic } from "@converge/core"
import { Inbox, Outbox, OutboxRelay, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { Config, Deferred, Effect, Layer, Redacted, Schema } from "effect"
import { SqlClient } from "effect/sql"

const Order = Schema.Struct({ orderId: Schema.String, amountCents: Schema.Int })
const orders = Topic.make("smoke.orders", Order, { key: (o) => o.orderId })
const schema = `smoke_${process.pid}`

const program = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const store = yield* SqlStore.SqlStore
  const invoices = store.table("invoices")
  yield* sql.unsafe(`CREATE TABLE ${invoices} (order_id text PRIMARY KEY)`).raw
  const done = yield* Deferred.make<void>()
  let handled = 0
  const handle = Inbox.handler(
    (order: typeof Order.Type) => sql.unsafe(`INSERT INTO ${invoices} (order_id) VALUES ($1)`, [order.orderId]).raw
  )
  yield* Consumer.make(orders, {
    group: "billing",
    // the invoice and the inbox row commit together; count after the commit
    handle: (order, ctx) =>
      Effect.andThen(
        handle(order, ctx),
        Effect.suspend(() => (++handled === 3 ? Deferred.succeed(done, undefined) : Effect.void))
      ),
    errors: Outbox.publishErrors
  })
  // the business write and the message commit together
  yield* Outbox.transaction(
    Outbox.publishAll(orders, [
      { orderId: "o-1", amountCents: 100 },
      { orderId: "o-2", amountCents: 200 },
      { orderId: "o-3", amountCents: 300 }
    ])
  )
  yield* Deferred.await(done).pipe(Effect.timeout("20 seconds"))
  const rows = yield* sql.unsafe<{ readonly n: number }>(`SELECT count(*)::int AS n FROM ${invoices}`)
  const inbox = yield* sql.unsafe<{ readonly n: number }>(`SELECT count(*)::int AS n FROM ${store.table("inbox")}`)
  if (Number(rows[0]!.n) !== 3 || Number(inbox[0]!.n) !== 3) {
    return yield* Effect.die(`expected 3 invoices and 3 inbox rows, found ${rows[0]!.n} and ${inbox[0]!.n}`)
  }
  return `postgres: outbox -> relay -> inbox applied ${rows[0]!.n} effects, ${inbox[0]!.n} inbox rows`
})

const Sql = Layer.unwrap(
  Effect.map(Config.String("DATABASE_URL").pipe(Config.withDefault("postgres://postgres@127.0.0.1:5432/test")), (url) =>
    PgClient.layer({ url: Redacted.make(url) })
  )
)
const Store = SqlStore.layer({ schema })
const App = Layer.mergeAll(Outbox.layer(), OutboxRelay.layer(), Inbox.layer()).pipe(
  Layer.provideMerge(Store),
  Layer.provideMerge(MemoryBroker.layer())
)
const dropSchema = Effect.flatMap(
  SqlClient.SqlClient,
  (sql) => sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw
)

const main = program.pipe(
  Effect.scoped,
  Effect.provide(App),
  Effect.ensuring(Effect.ignore(dropSchema)),
  Effect.provide(Sql)
)

Effect.runPromise(main).then(
  (line) => process.stdout.write(`${line}\n`),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
