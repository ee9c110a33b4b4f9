/**
 * Saga coordinators killed with SIGKILL (child processes, `fixtures/saga-coordinator.ts`): at named
 * points of a step and of a compensation, a restarted coordinator finishes the saga; and two
 * coordinators sharing 200 sagas, one killed halfway, finish them all. Every action and compensation
 * writes a row to `effects`: each must be there exactly once.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { fileURLToPath } from "node:url"
import { SagaPg, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { afterAll, assert, describe, layer } from "@effect/vitest"
import { Effect, Layer, Redacted } from "effect"
import { SqlClient } from "effect/sql"
import { deleteKeysNow, mainUrl } from "./helpers.ts"

const databaseUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const schema = `converge_sagacrash_${randomUUID().replaceAll("-", "").slice(0, 10)}`
const prefix = `cvtest:sagacrash:${randomUUID().slice(0, 8)}`
const script = fileURLToPath(new URL("./fixtures/saga-coordinator.ts", import.meta.url))
let ports = 41_000 + Math.floor(Math.random() * 10_000)

const Setup = Layer.effectDiscard(
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* Effect.addFinalizer(() => SagaPg.dropStore(schema))
    const store = yield* SqlStore.make({ schema, partitions: 4 })
    yield* sql.unsafe(
      `CREATE TABLE ${store.table("effects")} (seq bigint GENERATED ALWAYS AS IDENTITY, what text NOT NULL, order_id text NOT NULL, pid int NOT NULL)`
    ).raw
  })
).pipe(Layer.provideMerge(PgClient.layer({ url: Redacted.make(databaseUrl), maxConnections: 4 })))

interface Coordinator {
  readonly child: ChildProcess
  readonly exited: Promise<NodeJS.Signals | number | null>
  readonly output: Array<string>
}

const coordinator = (env: Record<string, string>): Coordinator => {
  const child = spawn(process.execPath, [script], {
    env: {
      ...process.env,
      DATABASE_URL: databaseUrl,
      REDIS_URL: mainUrl,
      PREFIX: prefix,
      SCHEMA: schema,
      RUNNER_PORT: String(ports++),
      ...env
    },
    stdio: ["ignore", "pipe", "inherit"]
  })
  const output: Array<string> = []
  child.stdout!.on("data", (chunk: Buffer) => output.push(chunk.toString()))
  const exited = new Promise<NodeJS.Signals | number | null>((resolve) =>
    child.once("exit", (code, signal) => resolve(signal ?? code))
  )
  return { child, exited, output }
}

const stop = (c: Coordinator) =>
  Effect.promise(() => {
    c.child.kill("SIGTERM")
    const timer = setTimeout(() => c.child.kill("SIGKILL"), 20_000)
    return c.exited.finally(() => clearTimeout(timer))
  })

const query = <A extends object>(text: string, params: ReadonlyArray<unknown> = []) =>
  SqlClient.SqlClient.use((sql) => sql.unsafe<A>(text, params).withoutTransform).pipe(Effect.orDie)

const statuses = (orderPrefix: string) =>
  query<{ readonly status: string; readonly n: number }>(
    `SELECT s.status, count(*)::int AS n FROM ${schema}.sagas s WHERE s.payload LIKE $1 GROUP BY s.status`,
    [`%"${orderPrefix}-%`]
  ).pipe(Effect.map((rows) => Object.fromEntries(rows.map((r) => [r.status, r.n])) as Record<string, number>))

const effects = (orderPrefix: string) =>
  query<{ readonly what: string; readonly order_id: string; readonly n: number }>(
    `SELECT what, order_id, count(*)::int AS n FROM ${schema}.effects WHERE order_id LIKE $1 GROUP BY what, order_id`,
    [`${orderPrefix}-%`]
  )

const waitFor = <A, R>(what: string, effect: Effect.Effect<A, never, R>, done: (a: A) => boolean, seconds: number) =>
  Effect.gen(function* () {
    const deadline = Date.now() + seconds * 1000
    for (;;) {
      const value = yield* effect
      if (done(value)) return value
      if (Date.now() > deadline) return yield* Effect.die(new Error(`${what}: still ${JSON.stringify(value)}`))
      yield* Effect.sleep(250)
    }
  })

const crashCase = (point: string, fail: boolean, expected: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const orders = `crash-${point.replace(/[^a-z]/g, "")}-${randomUUID().slice(0, 6)}`
    const first = coordinator({
      CRASH_AT: point,
      START_PREFIX: orders,
      START_COUNT: "1",
      ...(fail ? { FAIL_EVERY: "1" } : {})
    })
    const signal = yield* Effect.promise(() => first.exited)
    assert.strictEqual(signal, "SIGKILL", `the first coordinator killed itself at ${point}`)
    assert.include(first.output.join(""), `crashing at ${point}`)
    const second = coordinator({})
    const final = yield* waitFor(
      "the saga ends",
      statuses(orders),
      (s) => (s.completed ?? 0) + (s.compensated ?? 0) === 1,
      60
    )
    yield* stop(second)
    assert.deepStrictEqual(final, fail ? { compensated: 1 } : { completed: 1 })
    const rows = yield* effects(orders)
    assert.deepStrictEqual(
      rows.map((r) => `${r.what}x${r.n}`).sort(),
      expected.map((e) => `${e}x1`).sort(),
      "each action and compensation applied exactly once"
    )
  })

describe("saga coordinators killed with SIGKILL", () => {
  // the coordinators' keys: their Redis work ran in child processes
  afterAll(() => deleteKeysNow(prefix))
  layer(Setup, { timeout: 240_000, excludeTestServices: true })((it) => {
    it.effect("killed after a step wrote and before its commit (the engine's record is in that commit): once", () =>
      crashCase("reserve:before-commit", false, ["reserve", "charge", "ship"])
    )

    it.effect("killed after a step's commit, before the next step: the restarted coordinator goes on, once", () =>
      crashCase("reserve:after-commit", false, ["reserve", "charge", "ship"])
    )

    it.effect("killed mid-compensation (release written, not committed): compensating resumes, once each", () =>
      crashCase("release:mid-compensation", true, ["reserve", "charge", "refund", "release"])
    )

    it.effect("killed between two compensations (refund committed): the release runs, the refund is not repeated", () =>
      crashCase("refund:after-commit", true, ["reserve", "charge", "refund", "release"])
    )

    it.effect("two coordinators share 200 sagas; one is SIGKILLed halfway: all 200 end, each effect once", () =>
      Effect.gen(function* () {
        const orders = `pair-${randomUUID().slice(0, 6)}`
        const env = { FAIL_EVERY: "5", STEP_DELAY_MS: "20" }
        const a = coordinator({ ...env, START_PREFIX: `${orders}-a`, START_COUNT: "100" })
        const b = coordinator({ ...env, START_PREFIX: `${orders}-b`, START_COUNT: "100" })
        const ended = (s: Record<string, number>) => (s.completed ?? 0) + (s.compensated ?? 0)
        const atKill = yield* waitFor("half of the sagas end", statuses(orders), (s) => ended(s) >= 100, 120)
        a.child.kill("SIGKILL")
        yield* Effect.promise(() => a.exited)
        const final = yield* waitFor("all 200 sagas end", statuses(orders), (s) => ended(s) === 200, 150)
        yield* stop(b)
        console.log(`two coordinators: ${ended(atKill)} ended when one was killed; then ${JSON.stringify(final)}`)
        assert.deepStrictEqual(final, { completed: 160, compensated: 40 })
        const rows = yield* effects(orders)
        const counts = new Map<string, number>()
        for (const r of rows) {
          assert.strictEqual(r.n, 1, `${r.what} of ${r.order_id} applied ${r.n} times`)
          counts.set(r.what, (counts.get(r.what) ?? 0) + 1)
        }
        assert.deepStrictEqual(Object.fromEntries(counts), {
          reserve: 200,
          charge: 200,
          ship: 160,
          refund: 40,
          release: 40
        })
        const byProcess = yield* query<{ readonly pid: number; readonly n: number }>(
          `SELECT pid, count(*)::int AS n FROM ${schema}.effects WHERE order_id LIKE $1 GROUP BY pid`,
          [`${orders}-%`]
        )
        assert.isAtLeast(byProcess.length, 2, "both coordinators did work")
      })
    )
  })
})
