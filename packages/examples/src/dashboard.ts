/**
 * `pnpm demo --dashboard [--port N]`: after the examples, the demo keeps
 * running with the web dashboard of `@converge/cli` on
 * `http://127.0.0.1:4400` — on the same in-memory broker and embedded
 * Postgres, with the audit trail the examples wrote in memory.
 *
 * Billing and shipping keep consuming `orders`, now with the card issue
 * fixed: replay mallory's dead letter from the dashboard and watch its
 * timeline gain `replayed` and `handled`. (The undecodable foreign message
 * is dead-lettered again: its payload is still wrong.)
 */

import { Dashboard, Operations } from "@converge/cli"
import { Audit, type Broker, Consumer } from "@converge/core"
import { SagaPg, SqlStore } from "@converge/store-postgres"
import type { PgClient } from "@effect/sql-pg"
import { Console, Context, Effect, Layer, Option } from "effect"
import type { SqlClient } from "effect/sql"
import { orders } from "./01-orders/program.ts"

/** Consumers of `orders` that now succeed, and the dashboard over the demo's services, until interrupted. */
export const keepRunning = (options: {
  readonly port: number
  readonly database: Context.Context<PgClient.PgClient | SqlClient.SqlClient>
  readonly schema: string
  readonly sagaSchema: string
}) =>
  Effect.gen(function* () {
    yield* Consumer.make(orders, {
      group: "billing",
      consumer: "billing-2",
      handle: (order) => Effect.logInfo(`billing: charged ${order.customer} for ${order.orderId} (card issue fixed)`)
    })
    yield* Consumer.make(orders, {
      group: "shipping",
      consumer: "shipping-2",
      handle: (order) => Effect.logInfo(`shipping: label printed for ${order.orderId}`)
    })
    const scope = yield* Effect.scope
    const sink = yield* Audit.AuditSink
    const attach = (schema: string) =>
      Layer.buildWithScope(
        SqlStore.layerAttach(schema).pipe(Layer.provide(Layer.succeedContext(options.database))),
        scope
      )
    const store = yield* attach(options.schema)
    const sagas = yield* Layer.buildWithScope(
      SagaPg.store.pipe(Layer.provide(Layer.succeedContext(yield* attach(options.sagaSchema)))),
      scope
    )
    const ops = yield* Operations.make({
      sources: {
        broker: "the in-memory broker",
        database: "the embedded Postgres",
        schema: options.schema,
        sagaSchema: options.sagaSchema
      },
      broker: yield* Effect.context<Broker.Broker>(),
      audit: Option.match(yield* Effect.serviceOption(Audit.AuditLog), {
        onNone: () => undefined,
        // the log to read, and the sink the dashboard's replays and purges record with
        onSome: (log) => Context.make(Audit.AuditLog, log).pipe(Context.add(Audit.AuditSink, sink))
      }),
      store,
      sagas
    })
    const url = yield* Dashboard.serve(ops, { port: options.port })
    yield* Console.log(`\nDashboard: ${url} (dead letters: ${url}/dlq). The demo keeps running; Ctrl-C stops it.`)
    return yield* Effect.never
  })
