/**
 * Test wiring for the Redis Streams broker: a NodeRedis client per layer, a
 * unique key prefix per layer (so tests are isolated), and the keys deleted
 * when the layer is torn down. Also a test-owned `redis-server` with AOF on
 * another loopback port, for restart tests.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import type { Envelope } from "@converge/core"
import { SqlStore } from "@converge/store-postgres"
import { NodeRedis } from "@effect/platform-node"
import { Context, Effect, Layer, type Scope } from "effect"
import * as Redis from "effect/persistence/Redis"
import { SqlClient } from "effect/sql"
import { createClient } from "redis"
import { RedisStreamsBroker } from "../src/index.ts"

/** The key prefix of the broker under test. */
export class Prefix extends Context.Service<Prefix, string>()("test/Prefix") {}

/** Main Redis of the machine. */
export const mainUrl = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"

const deleteKeys = (prefix: string) =>
  Effect.gen(function* () {
    const redis = yield* Redis.Redis
    let cursor = "0"
    do {
      const reply = yield* redis.send<[string, Array<string>]>("SCAN", cursor, "MATCH", `${prefix}:*`, "COUNT", "1000")
      cursor = String(reply[0])
      if (reply[1].length > 0) yield* redis.send("DEL", ...reply[1])
    } while (cursor !== "0")
  })

/** Deletes a prefix's keys with a client of its own (for tests whose Redis work runs in child processes). */
export const deleteKeysNow = async (prefix: string, url: string = mainUrl): Promise<void> => {
  const client = createClient({ url })
  client.on("error", () => {})
  await client.connect()
  for await (const keys of client.scanIterator({ MATCH: `${prefix}:*`, COUNT: 1000 })) {
    if (keys.length > 0) await client.del(keys)
  }
  await client.close()
}

/** Broker + Redis client + a unique prefix, cleaned up afterwards. */
export const brokerLayer = (url: string = mainUrl, options?: RedisStreamsBroker.Options) =>
  Layer.unwrap(
    Effect.sync(() => {
      const prefix = `cvtest:${randomUUID().slice(0, 8)}`
      const cleanup = Layer.effectDiscard(Effect.addFinalizer(() => deleteKeys(prefix).pipe(Effect.ignore)))
      return Layer.mergeAll(
        RedisStreamsBroker.layer({ prefix, block: "500 millis", ...options }),
        Layer.succeed(Prefix, prefix),
        cleanup
      ).pipe(Layer.provideMerge(NodeRedis.layer({ url, maxConnections: 40 })))
    })
  )

/** Key of a topic's stream. */
export const streamKey = (prefix: string, topic: string) => `${prefix}:{${topic}}`

/** Suite hooks that act on the stream keys directly. */
export const hooks = {
  deleteTopic: (topic: string) =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      yield* redis.send("DEL", streamKey(prefix, topic))
    }),
  trim: (topic: string, maxLen: number) =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      yield* redis.send("XTRIM", streamKey(prefix, topic), "MAXLEN", String(maxLen))
    }),
  appendRaw: (topic: string, fields: Envelope.Fields) =>
    Effect.gen(function* () {
      const redis = yield* Redis.Redis
      const prefix = yield* Prefix
      yield* redis.send("XADD", streamKey(prefix, topic), "*", ...Object.entries(fields).flat())
    })
}

/** A `redis-server` owned by a test: AOF with fsync always, on its own port; kill -9 and restart it, or pause it. */
export class OwnedRedis {
  readonly port: number
  readonly dir: string
  proc: ChildProcess | undefined
  constructor(port: number) {
    this.port = port
    this.dir = mkdtempSync(join(tmpdir(), "converge-redis-"))
  }
  get url(): string {
    return `redis://127.0.0.1:${this.port}`
  }
  async start(): Promise<void> {
    // never drive (pause, kill) a server this test did not start: the port must be free
    if (await this.ping())
      throw new Error(`port ${this.port} already answers PING: not starting a test-owned Redis there`)
    this.proc = spawn(
      "redis-server",
      [
        "--port",
        String(this.port),
        "--bind",
        "127.0.0.1",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
        this.dir
      ],
      { stdio: "ignore" }
    )
    for (let i = 0; i < 100; i++) {
      if (await this.ping()) return
      await new Promise((r) => setTimeout(r, 50))
    }
    throw new Error(`redis-server on port ${this.port} did not start`)
  }
  ping(): Promise<boolean> {
    return new Promise((resolve) => {
      const p = spawn("redis-cli", ["-h", "127.0.0.1", "-p", String(this.port), "ping"], {
        stdio: ["ignore", "pipe", "ignore"]
      })
      let out = ""
      p.stdout?.on("data", (d) => {
        out += String(d)
      })
      p.on("close", () => resolve(out.trim() === "PONG"))
    })
  }
  async kill(): Promise<void> {
    const proc = this.proc
    if (proc === undefined || proc.exitCode !== null) return
    await new Promise<void>((resolve) => {
      proc.once("exit", () => resolve())
      proc.kill("SIGKILL")
    })
  }
  /** Freezes the server (SIGSTOP): connections stay open, nothing is answered until {@link resume}. */
  pause(): void {
    this.proc?.kill("SIGSTOP")
  }
  /** Lets a paused server run again (SIGCONT). */
  resume(): void {
    this.proc?.kill("SIGCONT")
  }
  async restart(): Promise<void> {
    await this.kill()
    await this.start()
  }
  async stop(): Promise<void> {
    await this.kill()
    rmSync(this.dir, { recursive: true, force: true })
  }
}

/** The Postgres of the tests that need one (`DATABASE_URL`, default the machine's). */
export const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

/**
 * A fresh outbox/inbox store (its own schema, 2 partitions, migrated) on the `SqlClient` in context, with
 * an `effects` table of the given columns for the test's handlers to write; the schema is dropped when
 * the scope closes.
 */
export const freshStore = (
  tag: string,
  effectsColumns: string
): Effect.Effect<
  { readonly sql: SqlClient.SqlClient; readonly schema: string; readonly store: SqlStore.SqlStore["Service"] },
  unknown,
  SqlClient.SqlClient | Scope.Scope
> =>
  Effect.gen(function* () {
    const schema = `converge_${tag}_${randomUUID().replaceAll("-", "").slice(0, 12)}`
    const sql = yield* SqlClient.SqlClient
    yield* Effect.addFinalizer(() => Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw))
    const store = yield* SqlStore.make({ schema, partitions: 2 })
    yield* sql.unsafe(`CREATE TABLE ${schema}.effects (${effectsColumns})`).raw
    return { sql, schema, store }
  })

/**
 * The test's `effects` table: how many rows it holds, and how many distinct message ids (`column`) among
 * them. A test expects both to equal the message count: every effect applied, none twice.
 */
export const effectCounts = (
  sql: SqlClient.SqlClient,
  schema: string,
  column = "order_id"
): Effect.Effect<{ readonly rows: number; readonly distinct: number }, unknown> =>
  Effect.map(
    sql.unsafe<{ n: number; d: number }>(
      `SELECT count(*)::int AS n, count(DISTINCT ${column})::int AS d FROM ${schema}.effects`
    ).withoutTransform,
    (result) => ({ rows: Number(result[0]!.n), distinct: Number(result[0]!.d) })
  )

/** What `group` has read from `stream` and not acked (the `XPENDING` summary): how many, and how many per consumer. */
export const pendingOf = (
  stream: string,
  group: string
): Effect.Effect<{ readonly count: number; readonly byConsumer: Record<string, string> }, unknown, Redis.Redis> =>
  Effect.flatMap(Redis.Redis, (redis) =>
    Effect.map(
      redis.send<[number, unknown, unknown, Array<[string, string]> | null]>("XPENDING", stream, group),
      (reply) => ({ count: Number(reply[0]), byConsumer: Object.fromEntries(reply[3] ?? []) })
    )
  )
