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

/** Broker + a unique prefix, cleaned up afterwards, over the given `Redis` layer (built per case). */
export const brokerLayerOn = <RO extends Redis.Redis, E>(
  redis: () => Layer.Layer<RO, E>,
  options?: RedisStreamsBroker.Options
) =>
  Layer.unwrap(
    Effect.sync(() => {
      const prefix = `cvtest:${randomUUID().slice(0, 8)}`
      const cleanup = Layer.effectDiscard(Effect.addFinalizer(() => deleteKeys(prefix).pipe(Effect.ignore)))
      return Layer.mergeAll(
        RedisStreamsBroker.layer({ prefix, block: "500 millis", ...options }),
        Layer.succeed(Prefix, prefix),
        cleanup
      ).pipe(Layer.provideMerge(redis()))
    })
  )

/** Broker + Redis client + a unique prefix, cleaned up afterwards. */
export const brokerLayer = (url: string = mainUrl, options?: RedisStreamsBroker.Options) =>
  brokerLayerOn(() => NodeRedis.layer({ url, maxConnections: 40 }), options)

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

/** Runs `redis-cli` with `args` and resolves with what it printed (rejects on a non-zero exit). */
export const redisCli = (args: ReadonlyArray<string>): Promise<string> =>
  new Promise((resolve, reject) => {
    const p = spawn("redis-cli", [...args], { stdio: ["ignore", "pipe", "pipe"] })
    let out = ""
    p.stdout?.on("data", (d) => {
      out += String(d)
    })
    p.stderr?.on("data", (d) => {
      out += String(d)
    })
    p.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`redis-cli ${args.join(" ")}: ${out}`))))
  })

/**
 * A Redis Cluster owned by a test: three masters (`redis-server --cluster-enabled yes`, no persistence) on
 * loopback ports `base`, `base + 1`, `base + 2` (and their bus ports, +10000), joined with
 * `redis-cli --cluster create`; stopped and its directory removed by {@link stop}.
 */
export class OwnedCluster {
  readonly nodes: ReadonlyArray<OwnedRedis>
  readonly dir: string
  readonly procs: Array<ChildProcess> = []
  constructor(base: number) {
    this.nodes = [0, 1, 2].map((i) => new OwnedRedis(base + i))
    this.dir = mkdtempSync(join(tmpdir(), "converge-cluster-"))
  }
  get ports(): ReadonlyArray<number> {
    return this.nodes.map((n) => n.port)
  }
  /** The root nodes for `RedisCluster.layer`. */
  get rootNodes(): Array<{ url: string }> {
    return this.nodes.map((n) => ({ url: n.url }))
  }
  async start(): Promise<void> {
    for (const node of this.nodes) {
      if (await node.ping())
        throw new Error(`port ${node.port} already answers PING: not starting a test-owned cluster there`)
    }
    for (const node of this.nodes) {
      const proc = spawn(
        "redis-server",
        [
          "--port",
          String(node.port),
          "--bind",
          "127.0.0.1",
          "--cluster-enabled",
          "yes",
          "--cluster-config-file",
          join(this.dir, `nodes-${node.port}.conf`),
          "--cluster-node-timeout",
          "5000",
          "--appendonly",
          "no",
          "--save",
          "",
          "--dir",
          this.dir
        ],
        { stdio: "ignore" }
      )
      this.procs.push(proc)
      node.proc = proc
    }
    for (const node of this.nodes) {
      let up = false
      for (let i = 0; i < 100 && !up; i++) {
        up = await node.ping()
        if (!up) await new Promise((r) => setTimeout(r, 50))
      }
      if (!up) throw new Error(`cluster node on port ${node.port} did not start`)
    }
    await redisCli([
      "--cluster",
      "create",
      ...this.nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas",
      "0",
      "--cluster-yes"
    ])
    // every node must know the whole slot map before a client asks any of them
    for (let i = 0; i < 200; i++) {
      const states = await Promise.all(
        this.nodes.map((n) => redisCli(["-h", "127.0.0.1", "-p", String(n.port), "cluster", "info"]))
      )
      if (states.every((s) => s.includes("cluster_state:ok"))) return
      await new Promise((r) => setTimeout(r, 100))
    }
    throw new Error("the test-owned cluster did not reach cluster_state:ok")
  }
  async stop(): Promise<void> {
    for (const node of this.nodes) await node.kill()
    for (const node of this.nodes) rmSync(node.dir, { recursive: true, force: true })
    rmSync(this.dir, { recursive: true, force: true })
  }
}
