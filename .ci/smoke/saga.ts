// A user's saga, outside the workspace: two local steps on Effect's workflow engine on the Postgres server
// (DATABASE_URL), the second fails, the first is compensated with its typed value; in a schema it drops.
import { MemoryBroker } from "@converge/broker-memory"
import { Saga } from "@converge/core"
import { Inbox, Outbox, SagaPg, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { Config, Effect, Exit, Layer, Redacted, Schema } from "effect"
import { SqlClient } from "effect/sql"

const schema = `smoke_saga_${process.pid}`
class Refused extends Schema.TaggedError<Refused>()("Refused", { why: Schema.String }) {}

const Transfer = Saga.make("smoke-transfer", {
  payload: { id: Schema.String, cents: Schema.Int },
  idempotencyKey: (t) => t.id,
  error: Refused
})

const undone: Array<string> = []
const TransferLive = Saga.toLayer(Transfer, (t) =>
  Effect.gen(function* () {
    yield* Saga.step({
      name: "debit",
      success: Schema.Struct({ account: Schema.String, cents: Schema.Int }),
      run: Effect.succeed({ account: "a-1", cents: t.cents }),
      compensate: (debit) => Effect.sync(() => undone.push(`credit ${debit.account} ${debit.cents}`))
    })
    yield* Saga.step({
      name: "credit",
      success: Schema.Void,
      error: Refused,
      run: Effect.fail(new Refused({ why: "account closed" }))
    })
  })
)

const program = Effect.gen(function* () {
  const exit = yield* Effect.exit(Transfer.workflow.execute({ id: `t-${process.pid}`, cents: 500 }))
  const executionId = yield* Transfer.workflow.executionId({ id: `t-${process.pid}`, cents: 500 })
  const detail = yield* Saga.show(executionId)
  if (!Exit.isFailure(exit) || detail.status !== "compensated" || undone.join() !== "credit a-1 500") {
    return yield* Effect.die(`expected a compensated saga, got ${detail.status} and ${JSON.stringify(undone)}`)
  }
  return `saga: ${detail.steps.map((s) => `${s.phase} ${s.step} ${s.status}`).join(", ")}`
})

const Sql = Layer.unwrap(
  Effect.map(Config.String("DATABASE_URL").pipe(Config.withDefault("postgres://postgres@127.0.0.1:5432/test")), (url) =>
    PgClient.layer({ url: Redacted.make(url) })
  )
)
const App = TransferLive.pipe(
  Layer.provideMerge(SagaPg.layer({ replyTopic: "smoke.replies" })),
  Layer.provideMerge(Layer.mergeAll(Outbox.layer(), Inbox.layer())),
  Layer.provideMerge(SqlStore.layer({ schema })),
  Layer.provideMerge(MemoryBroker.layer())
)
const cleanup = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.andThen(
    sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw,
    SagaPg.dropEngineTables(`${schema}_cluster`)
  )
)

Effect.runPromise(
  program.pipe(Effect.scoped, Effect.provide(App), Effect.ensuring(Effect.ignore(cleanup)), Effect.provide(Sql))
).then(
  (line) => process.stdout.write(`${line}\n`),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
