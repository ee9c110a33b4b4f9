/**
 * An embedded Postgres for the demo and the examples' tests: PGlite (Postgres
 * compiled to WebAssembly, in this process, in memory) behind
 * `@electric-sql/pglite-socket`, so `@effect/sql-pg` talks to it over a
 * loopback socket exactly as to a server. No server to install.
 *
 * Limits, and why the outbox still works: PGlite is one backend, so the pool
 * has one connection (transactions run one at a time), and `LISTEN/NOTIFY`
 * does not work through the socket — the relay runs with `listen: false` and
 * is woken by the in-process nudge after each commit, or by its poll.
 *
 * `DATABASE_URL` switches to a real server (see {@link databaseLayer} and `config.ts`).
 */
import { createServer } from "node:net"
import { PgClient } from "@effect/sql-pg"
import { PGlite } from "@electric-sql/pglite"
import { PGLiteSocketServer } from "@electric-sql/pglite-socket"
import { Effect, Layer, Option, Redacted } from "effect"
import type { SqlError } from "effect/sql/SqlError"

/** A free loopback port (the OS picks it). */
export const freePort = Effect.promise(
  () =>
    new Promise<number>((resolve, reject) => {
      const server = createServer()
      server.once("error", reject)
      server.listen(0, "127.0.0.1", () => {
        const address = server.address()
        const port = typeof address === "object" && address !== null ? address.port : 0
        server.close(() => resolve(port))
      })
    })
)

/**
 * `PgClient` (and `SqlClient`) over an in-memory PGlite, started for the
 * layer's lifetime (about 2.5 s to start).
 */
export const pgliteLayer: Layer.Layer<PgClient.PgClient | import("effect/sql").SqlClient.SqlClient, SqlError> =
  Layer.unwrap(
    Effect.gen(function* () {
      const db = yield* Effect.acquireRelease(
        Effect.promise(() => PGlite.create()),
        (db) => Effect.promise(() => db.close())
      )
      const port = yield* freePort
      yield* Effect.acquireRelease(
        Effect.promise(async () => {
          // the client keeps one connection (PGlite is one session); the server admits a few, so the pool's
          // replacement of a retired connection is not refused while the old socket is still closing (a
          // refused replacement failed the demo with "Connection closed during startup" once, under load)
          const server = new PGLiteSocketServer({ db, host: "127.0.0.1", port, maxConnections: 4 })
          await server.start()
          return server
        }),
        (server) => Effect.promise(() => server.stop())
      )
      return PgClient.layer({
        url: Redacted.make(`postgres://postgres:postgres@127.0.0.1:${port}/postgres`),
        maxConnections: 1
      })
    })
  )

/** PGlite when `databaseUrl` is `None` (the embedded default); the server it names otherwise. */
export const databaseLayer = (
  databaseUrl: Option.Option<Redacted.Redacted<string>>
): Layer.Layer<PgClient.PgClient | import("effect/sql").SqlClient.SqlClient, SqlError> =>
  Option.isNone(databaseUrl) ? pgliteLayer : PgClient.layer({ url: databaseUrl.value, maxConnections: 8 })
