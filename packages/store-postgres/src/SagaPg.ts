/**
 * `SagaPg` — sagas on Postgres: Effect's SQL-backed workflow engine
 * (`effect/cluster`'s `ClusterWorkflowEngine`), the {@link store} behind
 * `Saga.list`/`Saga.show`, commands sent through the outbox, replies taken
 * through the inbox.
 *
 * ```ts
 * const Coordinator = Layer.mergeAll(PlaceOrderLive, SagaPg.replies({ topic: "shop.saga-replies", group: "shop" })).pipe(
 *   Layer.provideMerge(SagaPg.layer({ replyTopic: "shop.saga-replies" })),
 *   Layer.provideMerge(Layer.mergeAll(Outbox.layer(), Inbox.layer())),
 *   Layer.provideMerge(SqlStore.layer()),
 *   Layer.provideMerge(PgClient.layer({ url })),
 *   Layer.provideMerge(brokerLayer)
 * )
 * ```
 *
 * What commits together (one client, one transaction per step): a
 * transactional step's own SQL writes, its `Outbox.publish`/`Saga.send`
 * rows, its row in `saga_steps` and the engine's journal entry; a reply's
 * inbox claim and its delivery to the waiting saga. Each coordinator process
 * is a runner of Effect's sharding on the same database: sagas spread over
 * them, and one that dies has its sagas taken over by the others (its shard
 * locks die with its connections).
 *
 * @since 0.1.0
 */

import { type Broker, Consumer, Metrics, type Name, Saga, SagaStore } from "@converge/core"
import { type Duration, Effect, Layer, Metric, Option } from "effect"
import {
  ClusterWorkflowEngine,
  RunnerAddress,
  RunnerHealth,
  RunnerStorage,
  Runners,
  Sharding,
  ShardingConfig,
  SqlMessageStorage,
  SqlRunnerStorage
} from "effect/cluster"
import { Digest } from "effect/crypto"
import { SqlClient } from "effect/sql"
import type { WorkflowEngine } from "effect/workflow"
import * as Inbox from "./Inbox.ts"
import * as Outbox from "./Outbox.ts"
import { SqlStore } from "./SqlStore.ts"

const fail = (operation: string) => (cause: unknown) => new SagaStore.SagaStoreError({ operation, cause })

interface SagaRow {
  readonly execution_id: string
  readonly name: string
  readonly status: SagaStore.Status
  readonly payload?: string
  readonly error: string | null
  readonly parked_step?: string | null
  readonly parked_token?: string | null
  readonly created_ms: number
  readonly updated_ms: number
}

interface StepRow {
  readonly execution_id: string
  readonly step: string
  readonly phase: "action" | "compensation"
  readonly status: SagaStore.StepRecord["status"]
  readonly result: string | null
  readonly error: string | null
  readonly attempts: number
  readonly started_ms: number
  readonly finished_ms: number | null
}

const summary = (row: SagaRow): SagaStore.Summary => ({
  executionId: row.execution_id,
  name: row.name,
  status: row.status,
  ...(row.error === null ? {} : { error: row.error }),
  createdAt: Number(row.created_ms),
  updatedAt: Number(row.updated_ms)
})

const stepRecord = (row: StepRow): SagaStore.StepRecord => ({
  executionId: row.execution_id,
  step: row.step,
  phase: row.phase,
  status: row.status,
  ...(row.result === null ? {} : { result: row.result }),
  ...(row.error === null ? {} : { error: row.error }),
  attempts: row.attempts,
  startedAt: Number(row.started_ms),
  ...(row.finished_ms === null ? {} : { finishedAt: Number(row.finished_ms) })
})

const ms = (column: string) => `(extract(epoch from ${column}) * 1000)::float8`

/**
 * The {@link SagaStore} in the store's `sagas` and `saga_steps` tables. Its
 * writes go through the store's client, so inside a transactional step they
 * join the step's transaction.
 *
 * @since 0.1.0
 */
export const makeStore: Effect.Effect<SagaStore.SagaStore["Service"], never, SqlStore> = Effect.gen(function* () {
  const { sql, table } = yield* SqlStore
  const sagas = table("sagas")
  const steps = table("saga_steps")
  const at = (millis: number) => new Date(millis)
  return SagaStore.SagaStore.of({
    started: (run) =>
      sql
        .unsafe(
          `INSERT INTO ${sagas} (execution_id, name, status, payload, created_at, updated_at)
           VALUES ($1, $2, 'running', $3, $4, $4) ON CONFLICT (execution_id) DO NOTHING`,
          [run.executionId, run.name, run.payload, at(run.at)]
        )
        .pipe(Effect.asVoid, Effect.mapError(fail("started"))),
    status: (executionId, status, when, extra) =>
      sql
        .unsafe(
          `UPDATE ${sagas} SET status = $2, updated_at = $3, error = $4, parked_step = $5, parked_token = $6
           WHERE execution_id = $1`,
          [
            executionId,
            status,
            at(when),
            extra?.error ?? null,
            extra?.parked?.step ?? null,
            extra?.parked?.token ?? null
          ]
        )
        .pipe(Effect.asVoid, Effect.mapError(fail("status"))),
    step: (r) =>
      sql
        .unsafe(
          `INSERT INTO ${steps} (execution_id, step, phase, status, result, error, attempts, started_at, finished_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (execution_id, step, phase) DO UPDATE SET status = excluded.status, result = excluded.result,
             error = excluded.error, attempts = excluded.attempts, finished_at = excluded.finished_at
           WHERE ${steps}.status IS DISTINCT FROM excluded.status OR ${steps}.attempts IS DISTINCT FROM excluded.attempts`,
          [
            r.executionId,
            r.step,
            r.phase,
            r.status,
            r.result ?? null,
            r.error ?? null,
            r.attempts,
            at(r.startedAt),
            r.finishedAt === undefined ? null : at(r.finishedAt)
          ]
        )
        .pipe(Effect.asVoid, Effect.mapError(fail("step"))),
    list: (filter) =>
      Effect.gen(function* () {
        const limit = Math.max(1, Math.min(10_000, Math.trunc(filter?.limit ?? 100)))
        const rows = yield* sql.unsafe<SagaRow>(
          `SELECT execution_id, name, status, error, ${ms("created_at")} AS created_ms, ${ms("updated_at")} AS updated_ms
           FROM ${sagas} WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
           ORDER BY created_at DESC, execution_id LIMIT ${limit}`,
          [filter?.status ?? null, filter?.name ?? null]
        )
        return rows.map(summary)
      }).pipe(Effect.mapError(fail("list"))),
    show: (executionId) =>
      Effect.gen(function* () {
        const rows = yield* sql.unsafe<SagaRow>(
          `SELECT execution_id, name, status, payload, error, parked_step, parked_token,
             ${ms("created_at")} AS created_ms, ${ms("updated_at")} AS updated_ms
           FROM ${sagas} WHERE execution_id = $1`,
          [executionId]
        )
        const row = rows[0]
        if (row === undefined) return Option.none()
        const stepRows = yield* sql.unsafe<StepRow>(
          `SELECT execution_id, step, phase, status, result, error, attempts, ${ms("started_at")} AS started_ms,
             CASE WHEN finished_at IS NULL THEN NULL ELSE ${ms("finished_at")} END AS finished_ms
           FROM ${steps} WHERE execution_id = $1 ORDER BY seq`,
          [executionId]
        )
        return Option.some({
          ...summary(row),
          payload: row.payload ?? "null",
          ...(row.parked_step != null && row.parked_token != null
            ? { parked: { step: row.parked_step, token: row.parked_token } }
            : {}),
          steps: stepRows.map(stepRecord)
        })
      }).pipe(Effect.mapError(fail("show")))
  })
})

/**
 * {@link makeStore} as a layer.
 *
 * @since 0.1.0
 */
export const store: Layer.Layer<SagaStore.SagaStore, never, SqlStore> = Layer.effect(SagaStore.SagaStore, makeStore)

/**
 * Samples `converge_sagas_needing_attention` (the sagas parked now) every `interval` (default 15 s).
 *
 * @since 0.1.0
 */
export const gauges = (interval: Duration.Input = "15 seconds"): Layer.Layer<never, never, SqlStore> =>
  Layer.effectDiscard(
    Effect.gen(function* () {
      const { sql, table } = yield* SqlStore
      yield* sql
        .unsafe<{ readonly n: number }>(
          `SELECT count(*)::int AS n FROM ${table("sagas")} WHERE status = 'needs-attention'`
        )
        .pipe(
          Effect.flatMap((rows) => Metric.update(Metrics.sagasNeedingAttention, Number(rows[0]?.n ?? 0))),
          Effect.catchCause((cause) => Effect.logDebug("converge: sampling parked sagas failed", cause)),
          Effect.andThen(Effect.sleep(interval)),
          Effect.forever,
          Effect.forkScoped
        )
    })
  )

/**
 * A `Saga.SagaTransport` that writes to the outbox: inside a transactional
 * step (or a responder's inbox transaction) the message commits with it (a
 * savepoint); elsewhere in a transaction of its own. The relay publishes it.
 *
 * @since 0.1.0
 */
export const transport = (options: {
  /** The topic this coordinator's replies come back on. */
  readonly replyTopic: string
}): Layer.Layer<Saga.SagaTransport, Name.InvalidName, Outbox.Outbox | SqlStore> =>
  Layer.effect(
    Saga.SagaTransport,
    Effect.gen(function* () {
      // refuse a bad reply topic when the layer is built, not at the first command
      yield* Effect.try({ try: () => Saga.replyTopic(options.replyTopic), catch: (e) => e as Name.InvalidName })
      const context = yield* Effect.context<Outbox.Outbox | SqlStore>()
      return Saga.SagaTransport.of({
        replyTopic: options.replyTopic,
        send: (topic, payload, sendOptions) =>
          Outbox.transaction(Outbox.publish(topic, payload, sendOptions)).pipe(
            Effect.map((receipt) => receipt.id),
            Effect.mapError((error) => Saga.sendFailed(topic.name, error)),
            Effect.provideContext(context)
          )
      })
    })
  )

/**
 * Each step run and compensation attempt in a savepoint of the store's
 * client: a failed attempt's writes roll back while its failure is recorded.
 *
 * @since 0.1.0
 */
export const transaction: Layer.Layer<never, never, SqlStore> = Layer.effectContext(
  Effect.gen(function* () {
    const { sql } = yield* SqlStore
    return Saga.SagaTransaction.context({
      wrap: (effect) =>
        sql.withTransaction(effect).pipe(Effect.catchTag("SqlError", (e) => Effect.die(e))) as typeof effect
    })
  })
)

/**
 * Options of {@link engine}.
 *
 * @since 0.1.0
 */
export interface EngineOptions {
  /**
   * Where runners and shard locks live: `"sql"` (default; several coordinator
   * processes share the sagas and take over a dead one's) or `"memory"` (one
   * process; required on PGlite, whose single connection the SQL runner
   * storage would starve).
   */
  readonly runnerStorage?: "sql" | "memory" | undefined
  /**
   * This process's runner address, unique among the coordinators sharing the
   * database (it is an identity: nothing listens on it). Default:
   * `127.0.0.1` and the process id.
   */
  readonly runnerAddress?: { readonly host: string; readonly port: number } | undefined
  /**
   * A client of the coordinators, not one of them (Effect's client-only sharding): it runs no saga and
   * takes no shard, and what it sends (a parked saga's `Saga.resume`/`resolve`) is stored for the
   * coordinator that owns the saga. What operator tools use. Default `false`.
   */
  readonly clientOnly?: boolean | undefined
  /**
   * How often the engine polls storage for work sent by other processes
   * (replies delivered elsewhere, taken-over sagas) and for durable timers
   * over a minute (default 500 ms; Effect's own default is 10 s).
   */
  readonly pollInterval?: number | undefined
  /**
   * How long a coordinator that stopped refreshing its registration and
   * shard locks keeps its sagas before the others take them over (Effect's
   * `shardLockExpiration`, default 35 s). A killed process's advisory locks
   * go with its connections at once, but its runner stays assigned shards
   * until this expires: lower it for faster take-over, at the price of more
   * refresh queries (every third of it).
   */
  readonly lockExpiration?: Duration.Input | undefined
  /**
   * The prefix of the engine's tables (`<prefix>_messages`, `<prefix>_replies`,
   * `<prefix>_runners`, `<prefix>_locks`, in the connection's search path).
   * Coordinators see exactly the sagas of the tables they share: {@link layer}
   * defaults it to `<store schema>_cluster`, so two stores in one database
   * never run each other's workflows; {@link engine} defaults to `cluster`
   * (Effect's own name).
   */
  readonly tablePrefix?: string | undefined
}

/**
 * Effect's cluster workflow engine on the SQL client in context: one runner
 * of Effect's sharding per process (`SingleRunner`), its journal in the
 * `cluster_*` tables it creates. A process starts in about 2 s.
 *
 * @since 0.1.0
 */
export const engine = (
  options?: EngineOptions
): Layer.Layer<WorkflowEngine.WorkflowEngine, never, SqlClient.SqlClient> => {
  const address = options?.runnerAddress ?? { host: "127.0.0.1", port: globalThis.process?.pid ?? 34431 }
  const prefix = options?.tablePrefix ?? "cluster"
  const config = ShardingConfig.layer({
    entityMessagePollInterval: options?.pollInterval ?? 500,
    entityReplyPollInterval: options?.pollInterval ?? 500,
    runnerAddress:
      options?.clientOnly === true ? Option.none() : Option.some(RunnerAddress.make(address.host, address.port)),
    ...(options?.lockExpiration === undefined ? {} : { shardLockExpiration: options.lockExpiration })
  })
  // Effect's SingleRunner.layer, with the table prefix it does not expose: one runner of Effect's
  // sharding per process; shards spread over the runners registered in `<prefix>_runners`
  const runner = Sharding.layer.pipe(
    Layer.provideMerge(Runners.layerNoop),
    Layer.provideMerge(SqlMessageStorage.layerWith({ prefix })),
    Layer.provide([
      options?.runnerStorage === "memory"
        ? RunnerStorage.layerMemory
        : Layer.orDie(SqlRunnerStorage.layerWith({ prefix })),
      RunnerHealth.layerNoop
    ]),
    Layer.provide(config)
  )
  return ClusterWorkflowEngine.layer.pipe(Layer.provide(runner), Layer.provide(Digest.layerWebCrypto))
}

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options extends EngineOptions {
  /** The topic replies to this coordinator's commands come back on. */
  readonly replyTopic: string
}

/**
 * A coordinator's services on Postgres: the engine, the store, the outbox
 * transport and per-attempt savepoints. Add the saga layers (`Saga.toLayer`)
 * and {@link replies}.
 *
 * @since 0.1.0
 */
export const layer = (
  options: Options
): Layer.Layer<
  WorkflowEngine.WorkflowEngine | SagaStore.SagaStore | Saga.SagaTransport,
  Name.InvalidName,
  SqlClient.SqlClient | SqlStore | Outbox.Outbox
> =>
  Layer.mergeAll(
    Layer.unwrap(
      Effect.map(Effect.service(SqlStore), (s) =>
        engine({ ...options, tablePrefix: options.tablePrefix ?? `${s.schema}_cluster` })
      )
    ),
    store,
    transport(options),
    transaction,
    gauges()
  )

/**
 * Consumes a coordinator's replies: each is claimed in the inbox and handed
 * to the waiting saga in one transaction, so a reply delivered twice
 * advances its saga once.
 *
 * @since 0.1.0
 */
export const replies = (options: {
  /** The reply topic (the `replyTopic` of {@link layer}). */
  readonly topic: string
  /** The coordinators' consumer group on it (one group shared by every coordinator process). */
  readonly group: string
  readonly consumer?: string | undefined
  /** How long a dead coordinator's unacknowledged replies wait before another takes them (see `Consumer`). */
  readonly claimIdle?: Duration.Input | undefined
  readonly concurrency?: number | undefined
}): Layer.Layer<
  never,
  Name.InvalidName | Consumer.InvalidOption,
  Broker.Broker | Inbox.Inbox | WorkflowEngine.WorkflowEngine
> =>
  Layer.effectDiscard(
    Effect.gen(function* () {
      const topic = yield* Effect.try({
        try: () => Saga.replyTopic(options.topic),
        catch: (e) => e as Name.InvalidName
      })
      yield* Consumer.make(topic, {
        group: options.group,
        ...(options.consumer === undefined ? {} : { consumer: options.consumer }),
        ...(options.claimIdle === undefined ? {} : { claimIdle: options.claimIdle }),
        ...(options.concurrency === undefined ? {} : { concurrency: options.concurrency }),
        ...Inbox.handlers((items) =>
          Effect.forEach(items, ({ message }) => Saga.completeReply(message), { discard: true })
        )
      })
    })
  )

/**
 * Drops the engine's tables of a prefix (`<prefix>_*` in the connection's
 * search path): every saga journal in them is lost. For tests and demos
 * that use a store of their own; never on a store in use.
 *
 * @since 0.1.0
 */
export const dropEngineTables = (prefix: string): Effect.Effect<void, never, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const rows = yield* sql<{ readonly name: string }>`
      SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) AS name FROM pg_tables
      WHERE schemaname = ANY (current_schemas(false)) AND left(tablename, ${prefix.length + 1}) = ${`${prefix}_`}`
    for (const row of rows) yield* sql.unsafe(`DROP TABLE IF EXISTS ${row.name} CASCADE`).raw
  }).pipe(Effect.ignore)

/**
 * Drops a store's schema and its engine's tables (`<schema>_cluster_*`, the {@link layer} default): for
 * tests and demos that made a store of their own.
 *
 * @since 0.1.0
 */
export const dropStore = (schema: string): Effect.Effect<void, never, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw)
    yield* dropEngineTables(`${schema}_cluster`)
  })
