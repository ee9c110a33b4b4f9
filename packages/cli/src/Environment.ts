/**
 * `Environment` — {@link Operations} over real servers, from settings (the
 * CLI's flags or the environment): the Redis Streams broker under a key
 * prefix, and a Postgres store attached to its schema (never migrated or
 * created by an operator tool), with its audit log and its saga store.
 *
 * A server that cannot be reached within `connectTimeout` fails with an
 * `unavailable` {@link Operations.OperationError} naming it; a schema
 * without Converge tables fails with `invalid`, naming the schema.
 *
 * @since 0.1.0
 */
import { RedisStreamsBroker } from "@converge/broker-redis-streams"
import type { Broker } from "@converge/core"
import { AuditPg, SagaPg, SqlStore } from "@converge/store-postgres"
import { NodeRedis } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { type Context, Duration, Effect, Layer, Redacted, type Scope } from "effect"
import { SqlClient } from "effect/sql"
import * as Operations from "./Operations.ts"

/**
 * Where the tools read from. Unset URLs leave their part out (`converge
 * status` then shows what it can).
 *
 * @since 0.1.0
 */
export interface Settings {
  readonly redisUrl?: Redacted.Redacted<string> | undefined
  readonly databaseUrl?: Redacted.Redacted<string> | undefined
  /** The Redis key prefix (default `converge`, as `RedisStreamsBroker`'s). */
  readonly prefix?: string | undefined
  /** The store's Postgres schema: outbox, inbox, audit (default `converge`). */
  readonly schema?: string | undefined
  /** The saga store's schema (default: {@link schema}). */
  readonly sagaSchema?: string | undefined
  /** How long to wait for each server (default 5 s). */
  readonly connectTimeout?: Duration.Input | undefined
}

/**
 * Where a URL points, for messages: scheme, host, port and path — never user or password.
 *
 * @since 0.1.0
 */
export const describeUrl = (url: Redacted.Redacted<string>): string => {
  try {
    const u = new URL(Redacted.value(url))
    return `${u.protocol}//${u.host}${u.pathname === "/" ? "" : u.pathname}`
  } catch {
    return "(not a URL)"
  }
}

const checkUrl = (name: string, url: Redacted.Redacted<string>, schemes: ReadonlyArray<string>) => {
  let parsed: URL
  try {
    parsed = new URL(Redacted.value(url))
  } catch {
    return Effect.fail(new Operations.OperationError({ kind: "invalid", message: `${name} is not a URL` }))
  }
  return schemes.includes(parsed.protocol)
    ? Effect.void
    : Effect.fail(
        new Operations.OperationError({
          kind: "invalid",
          message: `${name} has scheme ${parsed.protocol.replace(/:$/, "")}; expected ${schemes.map((s) => s.replace(/:$/, "")).join(" or ")}`
        })
      )
}

/** Builds `layer` in `scope` within `timeout`; any failure is `unavailable` (or what `classify` says). */
const connect = <A>(
  what: string,
  layer: Layer.Layer<A, unknown>,
  scope: Scope.Scope,
  timeout: Duration.Duration,
  probe?: (context: Context.Context<A>) => Effect.Effect<unknown, unknown>
): Effect.Effect<Context.Context<A>, Operations.OperationError> =>
  Layer.buildWithScope(layer, scope).pipe(
    Effect.tap((context) => (probe === undefined ? Effect.void : probe(context))),
    Effect.timeoutOrElse({
      duration: timeout,
      orElse: () =>
        Effect.fail(
          new Operations.OperationError({
            kind: "unavailable",
            message: `cannot reach ${what}: no answer within ${Duration.format(timeout)}`
          })
        )
    }),
    Effect.mapError((e) => {
      if (e instanceof Operations.OperationError) return e
      const classified = Operations.fromError(`cannot reach ${what}`, e)
      return classified.kind === "invalid" || classified.kind === "unavailable"
        ? classified
        : new Operations.OperationError({ kind: "unavailable", message: classified.message })
    })
  )

/**
 * The operations over the servers the settings name, their connections held by the scope.
 *
 * @since 0.1.0
 */
export const make = (
  settings: Settings
): Effect.Effect<Operations.Operations, Operations.OperationError, Scope.Scope> =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const timeout = Duration.fromInputUnsafe(settings.connectTimeout ?? "5 seconds")
    const schema = settings.schema ?? SqlStore.defaultSchema
    const sagaSchema = settings.sagaSchema ?? schema
    const sources: Operations.Sources = {
      broker:
        settings.redisUrl === undefined
          ? undefined
          : `${describeUrl(settings.redisUrl)} (prefix ${settings.prefix ?? "converge"})`,
      database: settings.databaseUrl === undefined ? undefined : describeUrl(settings.databaseUrl),
      schema: settings.databaseUrl === undefined ? undefined : schema,
      sagaSchema: settings.databaseUrl === undefined ? undefined : sagaSchema
    }

    let broker: Context.Context<Broker.Broker> | undefined
    if (settings.redisUrl !== undefined) {
      yield* checkUrl("the Redis URL", settings.redisUrl, ["redis:", "rediss:"])
      const redis = yield* connect(
        `Redis at ${describeUrl(settings.redisUrl)}`,
        NodeRedis.layer({ url: Redacted.value(settings.redisUrl), maxConnections: 4 }),
        scope,
        timeout
      )
      broker = yield* Layer.buildWithScope(
        RedisStreamsBroker.layer({ prefix: settings.prefix ?? "converge" }).pipe(
          Layer.provide(Layer.succeedContext(redis))
        ),
        scope
      ).pipe(Effect.mapError((e) => Operations.fromError("starting the Redis Streams broker", e)))
    }

    if (settings.databaseUrl === undefined) return yield* Operations.make({ sources, broker })
    yield* checkUrl("the database URL", settings.databaseUrl, ["postgres:", "postgresql:"])
    const pg = yield* connect(
      `Postgres at ${describeUrl(settings.databaseUrl)}`,
      PgClient.layer({ url: settings.databaseUrl, maxConnections: 4 }),
      scope,
      timeout,
      (context) =>
        Effect.provide(
          SqlClient.SqlClient.use((sql) => sql`SELECT 1`),
          context
        )
    )
    const attach = (name: string) =>
      Layer.buildWithScope(SqlStore.layerAttach(name).pipe(Layer.provide(Layer.succeedContext(pg))), scope).pipe(
        Effect.mapError((e) => Operations.fromError(`attaching to schema ${name}`, e))
      )
    const store = yield* attach(schema)
    const audit = yield* Layer.buildWithScope(AuditPg.layer().pipe(Layer.provide(Layer.succeedContext(store))), scope)
    const sagaStore = sagaSchema === schema ? store : yield* attach(sagaSchema)
    const sagas = yield* Layer.buildWithScope(SagaPg.store.pipe(Layer.provide(Layer.succeedContext(sagaStore))), scope)
    const engine = SagaPg.engine({ clientOnly: true, tablePrefix: `${sagaSchema}_cluster` }).pipe(
      Layer.provide(Layer.succeedContext(pg))
    )
    return yield* Operations.make({ sources, broker, store, audit, sagas, engine })
  })
