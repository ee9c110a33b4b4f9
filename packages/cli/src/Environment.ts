/**
 * `Environment` — {@link Operations} over real servers, from settings (the
 * CLI's flags or the environment): the broker (Redis Streams on one server
 * or a Redis Cluster, or NATS JetStream) under a prefix, and a Postgres store attached to its schema (never migrated or
 * created by an operator tool), with its audit log and its saga store.
 *
 * A server that cannot be reached within `connectTimeout` fails with an
 * `unavailable` {@link Operations.OperationError} naming it; a schema
 * without Converge tables fails with `invalid`, naming the schema.
 *
 * @since 0.1.0
 */
import { NatsBroker, NatsClient } from "@converge/broker-nats"
import { RedisCluster, RedisStreamsBroker } from "@converge/broker-redis-streams"
import type { Broker } from "@converge/core"
import { AuditPg, SagaPg, SqlStore } from "@converge/store-postgres"
import { NodeRedis } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { type Context, Duration, Effect, Layer, Redacted, type Scope } from "effect"
import type * as Redis from "effect/persistence/Redis"
import { SqlClient } from "effect/sql"
import * as Operations from "./Operations.ts"

/**
 * Where the tools read from. Unset URLs leave their part out (`converge
 * status` then shows what it can).
 *
 * @since 0.1.0
 */
export interface Settings {
  /** The Redis of the Redis Streams broker; with {@link redisCluster}, a comma-separated list of root nodes. */
  readonly redisUrl?: Redacted.Redacted<string> | undefined
  /** The Redis URLs are nodes of a Redis Cluster (`RedisCluster.layer`); implied by several URLs. */
  readonly redisCluster?: boolean | undefined
  /** The NATS server(s) of the NATS JetStream broker, comma-separated (instead of Redis). */
  readonly natsUrl?: Redacted.Redacted<string> | undefined
  readonly databaseUrl?: Redacted.Redacted<string> | undefined
  /** The broker's prefix (default `converge`, as `RedisStreamsBroker`'s and `NatsBroker`'s). */
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
    const prefix = settings.prefix ?? "converge"
    const list = (url: Redacted.Redacted<string>) =>
      Redacted.value(url)
        .split(",")
        .map((u) => u.trim())
        .filter((u) => u !== "")
        .map((u) => Redacted.make(u))
    const redisUrls = settings.redisUrl === undefined ? [] : list(settings.redisUrl)
    const cluster = settings.redisCluster === true || redisUrls.length > 1
    const natsUrls = settings.natsUrl === undefined ? [] : list(settings.natsUrl)
    if (redisUrls.length > 0 && natsUrls.length > 0) {
      return yield* Effect.fail(
        new Operations.OperationError({
          kind: "invalid",
          message:
            "both a Redis URL and a NATS URL are set: give the one of the broker to operate (--redis-url or --nats-url)"
        })
      )
    }
    const sources: Operations.Sources = {
      broker:
        redisUrls.length > 0
          ? `${redisUrls.map(describeUrl).join(", ")}${cluster ? " (Redis Cluster)" : ""} (prefix ${prefix})`
          : natsUrls.length > 0
            ? `${natsUrls.map(describeUrl).join(", ")} (NATS JetStream) (prefix ${prefix})`
            : undefined,
      database: settings.databaseUrl === undefined ? undefined : describeUrl(settings.databaseUrl),
      schema: settings.databaseUrl === undefined ? undefined : schema,
      sagaSchema: settings.databaseUrl === undefined ? undefined : sagaSchema
    }

    let broker: Context.Context<Broker.Broker> | undefined
    if (redisUrls.length > 0) {
      for (const url of redisUrls) yield* checkUrl("the Redis URL", url, ["redis:", "rediss:"])
      const where = `Redis at ${redisUrls.map(describeUrl).join(", ")}`
      const client: Layer.Layer<Redis.Redis, unknown> = cluster
        ? RedisCluster.layer({ rootNodes: redisUrls.map((url) => ({ url: Redacted.value(url) })), maxConnections: 4 })
        : NodeRedis.layer({ url: Redacted.value(redisUrls[0]!), maxConnections: 4 })
      const redis = yield* connect(where, client, scope, timeout)
      broker = yield* Layer.buildWithScope(
        RedisStreamsBroker.layer({ prefix }).pipe(Layer.provide(Layer.succeedContext(redis))),
        scope
      ).pipe(Effect.mapError((e) => Operations.fromError("starting the Redis Streams broker", e)))
    } else if (natsUrls.length > 0) {
      for (const url of natsUrls) yield* checkUrl("the NATS URL", url, ["nats:", "tls:"])
      const nats = yield* connect(
        `NATS at ${natsUrls.map(describeUrl).join(", ")}`,
        NatsClient.layer({ servers: natsUrls.map(Redacted.value), maxReconnectAttempts: 3 }),
        scope,
        timeout
      )
      broker = yield* Layer.buildWithScope(
        NatsBroker.layer({ prefix }).pipe(Layer.provide(Layer.succeedContext(nats))),
        scope
      ).pipe(Effect.mapError((e) => Operations.fromError("starting the NATS JetStream broker", e)))
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
