/**
 * What the outbox and inbox store suites share: a fresh schema per case, a
 * broker that records what the relay publishes, and the features a SQL
 * backend declares.
 *
 * @since 0.1.0
 */
import { randomUUID } from "node:crypto"
import { Broker, BrokerError, type Envelope, Topic } from "@converge/core"
import { layer } from "@effect/vitest"
import { Effect, Layer, Schema, type Scope, Stream } from "effect"
import { SqlClient } from "effect/sql"
import * as SqlStore from "../SqlStore.ts"

/**
 * What a SQL backend supports.
 *
 * @since 0.1.0
 */
export interface Features {
  /**
   * The client runs two transactions at once (a pool of two or more
   * connections). PGlite serves one connection: the race cases are skipped
   * there, with that reason.
   */
  readonly concurrentTransactions: boolean
  /**
   * `LISTEN/NOTIFY` works (real Postgres yes, PGlite no). The layer must
   * then provide `PgClient` (from `@effect/sql-pg`): the relay listens
   * through it, and so do the cases that check the notifications.
   */
  readonly listen: boolean
  /** Register only these cases. */
  readonly only?: ReadonlyArray<string> | undefined
}

/**
 * The payload of the suites' topic.
 *
 * @since 0.1.0
 */
export const Item = Schema.Struct({ key: Schema.String, n: Schema.Number })

/**
 * The suites' topic (keyed by `key`).
 *
 * @since 0.1.0
 */
export const items = Topic.make("store-test-items", Item, { key: (i) => i.key })

/**
 * A broker that records every published batch; it can fail the next publishes
 * (retryably) or refuse given message ids for good.
 *
 * @since 0.1.0
 */
export interface RecordingBroker {
  readonly published: Array<Envelope.Encoded>
  /** Fail the next `n` publish calls with a retryable `ConnectionLost`. */
  failNext: number
  /** Refuse these message ids with a permanent `InvalidArgument`. */
  readonly refuse: Set<string>
}

/**
 * Builds a {@link RecordingBroker} and the `Broker` over it (publish only).
 *
 * @since 0.1.0
 */
export const recordingBroker = (): {
  readonly recorder: RecordingBroker
  readonly layer: Layer.Layer<Broker.Broker>
} => {
  const recorder: RecordingBroker = { published: [], failNext: 0, refuse: new Set() }
  const unsupported = Effect.die(new Error("the store suites' broker only publishes"))
  const publish: Broker.Broker["Service"]["publish"] = (messages) =>
    Effect.suspend(() => {
      if (recorder.failNext > 0) {
        recorder.failNext--
        return Effect.fail(BrokerError.make(new BrokerError.ConnectionLost({ message: "simulated outage" })))
      }
      const refused = messages.find((m) => recorder.refuse.has(m.id))
      if (refused !== undefined) {
        return Effect.fail(
          BrokerError.make(
            new BrokerError.InvalidArgument({ message: `simulated refusal of ${refused.id}`, argument: "message" })
          )
        )
      }
      for (const m of messages) recorder.published.push(m)
      return Effect.succeed(messages.map((_, i) => `${recorder.published.length - messages.length + i}`))
    })
  const layer = Layer.succeed(
    Broker.Broker,
    Broker.Broker.of({
      publish,
      publishEach: Broker.publishEachBySplitting(publish),
      subscribe: () => Stream.fromEffect(unsupported),
      ackAll: () => unsupported,
      deadLetters: () => unsupported,
      purgeDeadLetters: () => unsupported
    })
  )
  return { recorder, layer }
}

/**
 * A fresh schema name for one case.
 *
 * @since 0.1.0
 */
export const freshSchema = (): string => `converge_t_${randomUUID().replaceAll("-", "").slice(0, 16)}`

/**
 * Builds a store on a fresh schema (with an `effects (message_id, consumer)`
 * table for the inbox cases) and drops the schema when the scope closes.
 *
 * @since 0.1.0
 */
export const freshStore = (
  options?: Omit<SqlStore.Options, "schema">
): Effect.Effect<SqlStore.SqlStore["Service"], unknown, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const schema = freshSchema()
    yield* Effect.addFinalizer(() => sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw.pipe(Effect.ignore))
    const store = yield* SqlStore.make({ ...options, schema })
    yield* sql.unsafe(
      `CREATE TABLE ${schema}.effects (consumer text NOT NULL, message_id text NOT NULL, note text NOT NULL DEFAULT '')`
    ).raw
    return store
  })

/**
 * How many rows `SELECT count(*)` finds.
 *
 * @since 0.1.0
 */
export const count = (query: string, params: ReadonlyArray<unknown> = []) =>
  SqlClient.SqlClient.use((sql) =>
    Effect.map(sql.unsafe<{ readonly n: number }>(query, params).withoutTransform, (rows) => Number(rows[0]?.n ?? 0))
  )

/**
 * What a store case needs of the backend.
 *
 * @since 0.1.0
 */
export interface Needs {
  readonly concurrent?: boolean
  readonly listen?: boolean
}

/**
 * A case of a store suite: its id, title, needs and body (run scoped).
 *
 * @since 0.1.0
 */
export type Register = (
  id: string,
  title: string,
  needs: Needs,
  body: () => Effect.Effect<void, unknown, SqlClient.SqlClient | Scope.Scope>
) => void

/**
 * Registers a store suite over `sqlLayer` (shared by its cases, real clock):
 * `cases` receives the function that registers one case, and skips the cases
 * whose needs the backend lacks, with the reason in the name.
 *
 * @since 0.1.0
 */
export const storeSuite = <E>(
  title: string,
  sqlLayer: Layer.Layer<SqlClient.SqlClient, E>,
  features: Features,
  cases: (test: Register) => void
): void =>
  layer(sqlLayer, { excludeTestServices: true, timeout: "60 seconds" })(title, (it) => {
    cases((id, name, needs, body) => {
      if (features.only !== undefined && !features.only.includes(id)) return
      const missing =
        needs.concurrent && !features.concurrentTransactions
          ? "the backend runs one transaction at a time"
          : needs.listen && !features.listen
            ? "the backend has no LISTEN/NOTIFY"
            : undefined
      if (missing !== undefined) {
        it.effect.skip(`${id} ${name} — skipped: ${missing}`, () => Effect.void)
        return
      }
      it.effect(`${id} ${name}`, () => Effect.scoped(body()), 60_000)
    })
  })
