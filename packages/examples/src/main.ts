/**
 * The Converge demo: `pnpm demo`.
 *
 * Runs example 01 (orders → billing and shipping consumers, a transient
 * failure retried, a permanent one and an undecodable message
 * dead-lettered), example 02 (transactional outbox, relay, idempotent
 * inbox) and example 03 (a checkout saga with a declined payment and a
 * stock shortage compensated) on the in-memory broker and an embedded Postgres (PGlite): no
 * server needed. `REDIS_URL` switches to the Redis Streams broker,
 * `DATABASE_URL` to a Postgres server (read through `effect/Config`, see
 * `config.ts`: a bad value is an error naming the variable, and no log line
 * shows a password).
 */
import { randomUUID } from "node:crypto"
import { MemoryBroker } from "@converge/broker-memory"
import { RedisStreamsBroker } from "@converge/broker-redis-streams"
import { Audit, Publisher } from "@converge/core"
import { SagaPg } from "@converge/store-postgres"
import { NodeRedis, NodeRuntime } from "@effect/platform-node"
import type { PgClient } from "@effect/sql-pg"
import { Console, type Context, Effect, Layer, Option, Redacted } from "effect"
import { SqlClient } from "effect/sql"
import { program } from "./01-orders/program.ts"
import * as Outboxes from "./02-outbox/program.ts"
import * as Checkout from "./03-saga/program.ts"
import * as CheckoutSaga from "./03-saga/saga.ts"
import { describeUrl, settings } from "./config.ts"
import * as Dashboard from "./dashboard.ts"
import { databaseLayer } from "./embedded.ts"

/** The broker: in memory, or Redis Streams when `REDIS_URL` is set (each run uses keys of its own prefix). */
const brokerLayer = (redisUrl: Option.Option<Redacted.Redacted<string>>) =>
  Option.isNone(redisUrl)
    ? MemoryBroker.layer({ orderedPerKey: true })
    : RedisStreamsBroker.layer({ prefix: `converge-demo:${randomUUID().slice(0, 8)}` }).pipe(
        Layer.provide(NodeRedis.layer({ url: Redacted.value(redisUrl.value) }))
      )

/** `--dashboard [--port N]`: keep running after the examples, with the dashboard on (see `dashboard.ts`). */
const dashboardPort = (argv: ReadonlyArray<string>): number | undefined => {
  if (!argv.includes("--dashboard")) return undefined
  const at = argv.indexOf("--port")
  const port = at >= 0 ? Number(argv[at + 1]) : 4400
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new Error(`--port must be a port number, got ${argv[at + 1]}`)
  return port
}

const main = Effect.gen(function* () {
  const { redisUrl, databaseUrl } = yield* settings
  const port = dashboardPort(process.argv.slice(2))
  yield* Effect.scoped(
    Effect.gen(function* () {
      // one database for the examples (and the dashboard): PGlite starts once
      const database = yield* Layer.build(databaseLayer(databaseUrl))
      const schemas = yield* demo(redisUrl, databaseUrl, database, port !== undefined)
      if (port !== undefined) yield* Dashboard.keepRunning({ port, database, ...schemas })
    })
  ).pipe(
    Effect.provide(
      Publisher.layer({ source: "urn:example:shop" }).pipe(
        Layer.provideMerge(brokerLayer(redisUrl)),
        // with the dashboard, the demo keeps its audit trail in memory for the timelines
        Layer.provideMerge(port === undefined ? Layer.empty : Audit.layerMemory())
      )
    )
  )
})

const demo = (
  redisUrl: Option.Option<Redacted.Redacted<string>>,
  databaseUrl: Option.Option<Redacted.Redacted<string>>,
  database: Context.Context<PgClient.PgClient | SqlClient.SqlClient>,
  keep: boolean
) =>
  Effect.gen(function* () {
    const broker = Option.match(redisUrl, {
      onNone: () => "the in-memory broker",
      onSome: (url) => `Redis Streams at ${describeUrl(url)}`
    })
    yield* Console.log(`Converge demo: orders on ${broker}\n`)
    const summary = yield* Effect.scoped(program)
    yield* Console.log("\nSummary")
    yield* Console.log(`  published:     ${summary.published.length} orders (ids ${summary.published.join(", ")})`)
    yield* Console.log(
      `  billed:        ${summary.billed.map((b) => `${b.orderId} (attempt ${b.attempt})`).join(", ")}`
    )
    yield* Console.log(`  shipped:       ${summary.shipped.join(", ")}`)
    yield* Console.log(`  dead letters:  ${summary.deadLetters.length}`)
    for (const d of summary.deadLetters) {
      yield* Console.log(`    - group ${d.group}: ${d.reason}: ${d.error.split("\n").join(" ")}`)
    }

    const embedded = Option.isNone(databaseUrl)
    const schema = embedded ? "shop" : `converge_demo_${randomUUID().replaceAll("-", "").slice(0, 8)}`
    yield* Console.log(
      `\nExample 02: outbox → relay → inbox on ${embedded ? "an embedded Postgres (PGlite, in memory)" : `the Postgres at ${Option.match(databaseUrl, { onNone: () => "", onSome: describeUrl })} (schema ${schema}, dropped at the end)`}\n`
    )
    const outbox = yield* Effect.scoped(
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        if (!embedded)
          yield* Effect.addFinalizer(() => Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw))
        return yield* Effect.scoped(Outboxes.program).pipe(Effect.provide(Outboxes.storeLayer({ schema })))
      })
    ).pipe(Effect.provide(database))
    yield* Console.log("\nSummary")
    yield* Console.log(
      `  committed:     ${outbox.committed.join(", ")} (rejected and rolled back: ${outbox.rejected.join(", ")})`
    )
    yield* Console.log(
      `  billing:       ${outbox.billingDeliveries} deliveries, ${outbox.invoices.length} invoices (${outbox.invoices.map((i) => i.invoiceId).join(", ")}): the duplicate was skipped by the inbox`
    )
    yield* Console.log(`  mailer:        emailed ${outbox.emailed.join(", ")}`)
    yield* Console.log(
      `  outbox:        ${outbox.unpublished} rows waiting for the relay (published rows are deleted on confirmation)`
    )

    const sagaSchema = embedded ? "checkout" : `converge_demo_saga_${randomUUID().replaceAll("-", "").slice(0, 8)}`
    yield* Console.log(
      `\nExample 03: a checkout saga — orders → payments → inventory, undone newest first when a step fails\n`
    )
    yield* Effect.scoped(
      Effect.gen(function* () {
        if (!embedded && !keep) yield* Effect.addFinalizer(() => SagaPg.dropStore(sagaSchema))
        return yield* Effect.scoped(Checkout.program).pipe(
          Effect.provide(
            CheckoutSaga.layer({
              schema: sagaSchema,
              // PGlite is one connection: Effect's SQL runner storage would starve it (see docs/sagas.md)
              runnerStorage: embedded ? "memory" : "sql",
              stock: [
                ["tea", 10],
                ["cups", 3]
              ]
            })
          )
        )
      })
    ).pipe(Effect.provide(database))
    return { schema, sagaSchema }
  })

NodeRuntime.runMain(main)
