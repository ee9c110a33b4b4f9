/**
 * The `converge` CLI end to end: the real executable in a child process against the machine's Postgres and
 * Redis, over a system this test runs (a consumer that dead-letters, the audit trail in Postgres, an outbox
 * row the relay refused, a saga coordinator with a parked saga). Each command's output, its `--json` shape
 * and its exit code; a replay of 1 000 dead letters with progress; unreachable servers and wrong names.
 */
import { execFile, spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { fileURLToPath } from "node:url"
import { RedisStreamsBroker } from "@converge/broker-redis-streams"
import { type Audit, Consumer, Publisher, Saga, Topic } from "@converge/core"
import { AuditPg, Inbox, Outbox, OutboxRelay, SagaPg, SqlStore } from "@converge/store-postgres"
import { SagaTest } from "@converge/store-postgres/testing"
import { NodeRedis } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import { afterAll, assert, describe, layer } from "@effect/vitest"
import { Data, Effect, Layer, Redacted, References, Schema } from "effect"
import { SqlClient } from "effect/sql"
import { createClient } from "redis"

const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const redisUrl = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const run = randomUUID().replaceAll("-", "").slice(0, 10)
const schema = `converge_cli_${run}`
const prefix = `cvcli:${run}`
const bin = fileURLToPath(new URL("../src/bin.ts", import.meta.url))

interface Result {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Runs `converge ...args` as a child process with the test's servers in its environment. */
const cli = (args: ReadonlyArray<string>, env: Record<string, string> = {}): Effect.Effect<Result> =>
  Effect.callback<Result>((resume) => {
    execFile(
      process.execPath,
      [bin, ...args],
      {
        env: {
          ...process.env,
          REDIS_URL: redisUrl,
          DATABASE_URL: pgUrl,
          CONVERGE_REDIS_PREFIX: prefix,
          CONVERGE_SCHEMA: schema,
          ...env
        },
        maxBuffer: 64 * 1024 * 1024,
        timeout: 60_000
      },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === "number" ? error.code : -1
        resume(Effect.succeed({ code, stdout, stderr }))
      }
    )
  })

const json = <A>(r: Result): A => {
  assert.strictEqual(r.code, 0, `exit 0 expected; stderr: ${r.stderr}`)
  return JSON.parse(r.stdout) as A
}

const Order = Schema.Struct({ id: Schema.String, cents: Schema.Int })
const orders = Topic.make("cli.orders", Order, { key: (o) => o.id })
class Refused extends Data.TaggedError("Refused")<{}> {}

/** While on, billing refuses every order (dead-lettered at once). */
const billing = { refusing: true, handled: new Set<string>() }

const Billing = Layer.effectDiscard(
  Consumer.make(orders, {
    group: "billing",
    batchSize: 200,
    errors: { Refused: "dead-letter" },
    handle: (order) =>
      billing.refusing
        ? Effect.fail(new Refused())
        : Effect.sync(() => {
            billing.handled.add(order.id)
          })
  })
)

/** Payments for the saga: declines a zero amount (the saga then compensates, and parks when its compensation fails). */
const Payments = Layer.effectDiscard(
  Consumer.make(SagaTest.chargeTopic, {
    group: "cli-payments",
    handle: Inbox.handler(
      Saga.respond(SagaTest.Charge, (command) =>
        command.cents === 0
          ? Effect.fail(new SagaTest.Declined({ orderId: command.orderId }))
          : Effect.succeed({ chargeId: `ch-${command.orderId}` })
      )
    )
  })
)

const Live = Layer.mergeAll(
  Billing,
  Payments,
  SagaTest.OrderSagaLive,
  SagaPg.replies({ topic: SagaTest.replyTopic, group: "cli-coordinator" })
).pipe(
  Layer.provideMerge(SagaPg.layer({ replyTopic: SagaTest.replyTopic, pollInterval: 200 })),
  Layer.provideMerge(SagaTest.EffectsTable),
  Layer.provideMerge(
    Layer.mergeAll(
      Publisher.layer(),
      Outbox.layer(),
      Inbox.layer(),
      OutboxRelay.layer({ pollInterval: "100 millis", retention: "1 hour" })
    )
  ),
  Layer.provideMerge(AuditPg.layer({ flushInterval: "50 millis" })),
  Layer.provideMerge(SqlStore.layer({ schema, partitions: 2 })),
  Layer.provideMerge(Layer.effectDiscard(Effect.addFinalizer(() => SagaPg.dropStore(schema)))),
  Layer.provideMerge(
    RedisStreamsBroker.layer({ prefix, block: "100 millis" }).pipe(
      Layer.provide(NodeRedis.layer({ url: redisUrl, maxConnections: 20 }))
    )
  ),
  Layer.provideMerge(PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 10 })),
  // 1 000 dead letters make 1 000 warnings: the test's own system logs errors only
  Layer.provideMerge(Layer.succeed(References.MinimumLogLevel, "Error"))
)

const eventually = SagaTest.eventually

interface DeadLetterJson {
  readonly id: string
  readonly topic: string
  readonly group: string
  readonly reason: string
  readonly error: string | null
  readonly attempts: number
  readonly deliveryCount: number
  readonly time: string
  readonly messageId: string | null
  readonly type: string | null
  readonly key: string | null
}

describe("converge CLI against Postgres and Redis", () => {
  afterAll(async () => {
    const client = createClient({ url: redisUrl })
    await client.connect()
    for await (const keys of client.scanIterator({ MATCH: `${prefix}:*`, COUNT: 1000 })) {
      if (keys.length > 0) await client.del(keys)
    }
    await client.close()
  })
  layer(Live, { timeout: 120_000, excludeTestServices: true })((it) => {
    it.effect(
      "dlq list/show/replay/purge, status, trace: output, --json shapes, exit codes; 1 000 replayed with progress",
      () =>
        Effect.gen(function* () {
          // 1 000 orders refused by billing: 1 000 dead letters; the first carries a correlation id
          const first = yield* Publisher.publish(orders, { id: "o-0", cents: 100 }, { correlationId: `flow-${run}` })
          yield* Publisher.publishAll(
            orders,
            Array.from({ length: 999 }, (_, i) => ({ id: `o-${i + 1}`, cents: 100 + i }))
          )
          const count = () =>
            cli(["dlq", "list", "--topic", orders.name, "--limit", "2000", "--json"]).pipe(
              Effect.map((r) => json<ReadonlyArray<DeadLetterJson>>(r).length)
            )
          yield* eventually("1 000 dead letters", count(), (n) => n === 1000, 30_000)

          // status: the topic, its group, the dead-letter count; the outbox and the sagas
          const status = json<{
            outbox: { unpublished: number; oldestMillis: number; dead: number; schema: string }
            topics: ReadonlyArray<{
              topic: string
              deadLetters: number
              groups: ReadonlyArray<{ group: string; pending: number; lag: number }>
            }>
            sagas: Record<string, number>
          }>(yield* cli(["status", "--json"]))
          assert.strictEqual(status.outbox.schema, schema)
          assert.strictEqual(typeof status.outbox.unpublished, "number")
          const ordersStatus = status.topics.find((t) => t.topic === orders.name)!
          assert.strictEqual(ordersStatus.deadLetters, 1000)
          assert.deepStrictEqual(ordersStatus.groups, [{ group: "billing", pending: 0, lag: 0 }])
          assert.deepStrictEqual(Object.keys(status.sagas).sort(), [
            "compensated",
            "compensating",
            "completed",
            "needs-attention",
            "running"
          ])
          const human = yield* cli(["status"])
          assert.strictEqual(human.code, 0)
          assert.match(
            human.stdout,
            /outbox \(postgres:\/\/127\.0\.0\.1:5432\/test, schema converge_cli_\w+\): \d+ waiting/
          )
          assert.match(human.stdout, /cli\.orders\s+billing\s+0\s+0\s+1000/)
          assert.notInclude(human.stdout + human.stderr, "postgres@", "no credentials or user in the output")

          // list: a table, and filters
          const listed = yield* cli(["dlq", "list", "--topic", orders.name, "--limit", "3"])
          assert.strictEqual(listed.code, 0)
          assert.match(listed.stdout, /^ID\s+TOPIC\s+GROUP\s+REASON\s+ATTEMPTS\s+TIME\s+MESSAGE ID\s+ERROR/)
          assert.include(listed.stdout, "3 dead letter(s)")
          const page = json<ReadonlyArray<DeadLetterJson>>(
            yield* cli(["dlq", "list", "--topic", orders.name, "--limit", "3", "--json"])
          )
          assert.deepStrictEqual(Object.keys(page[0]!).sort(), [
            "attempts",
            "deliveryCount",
            "error",
            "group",
            "id",
            "key",
            "messageId",
            "reason",
            "time",
            "topic",
            "type"
          ])
          assert.strictEqual(page[0]!.messageId, first.id, "oldest first")
          assert.strictEqual(page[0]!.reason, "permanent")
          const none = yield* cli(["dlq", "list", "--reason", "decode"])
          assert.strictEqual(none.code, 0)
          assert.strictEqual(none.stdout.trim(), "no dead letters", "every topic, filtered by reason")
          const recent = json<ReadonlyArray<DeadLetterJson>>(
            yield* cli(["dlq", "list", "--since", "1h", "--limit", "5", "--json"])
          )
          assert.strictEqual(recent.length, 5, "--since 1h: an age")
          const future = yield* cli(["dlq", "list", "--since", "2999-01-01T00:00:00Z", "--json"])
          assert.deepStrictEqual(json(future), [])
          const badTime = yield* cli(["dlq", "list", "--since", "yesterday"])
          assert.strictEqual(badTime.code, 2)
          assert.include(badTime.stderr, "is not a time")

          // show: one dead letter in full
          const shown = yield* cli(["dlq", "show", "--topic", orders.name, page[0]!.id])
          assert.strictEqual(shown.code, 0)
          assert.include(shown.stdout, `dead letter ${page[0]!.id} of ${orders.name}`)
          assert.include(shown.stdout, "reason:         permanent")
          assert.include(shown.stdout, '"id":"o-0"', "the payload")
          assert.include(shown.stdout, "Refused", "the error")
          const detail = json<
            DeadLetterJson & { headers: Record<string, string>; data: string; originalEntryId: string }
          >(yield* cli(["dlq", "show", "--topic", orders.name, page[0]!.id, "--json"]))
          assert.strictEqual(detail.headers.correlationid, `flow-${run}`)
          assert.deepStrictEqual(JSON.parse(detail.data), { id: "o-0", cents: 100 })
          const missing = yield* cli(["dlq", "show", "--topic", orders.name, "0-1"])
          assert.strictEqual(missing.code, 4)
          assert.include(missing.stderr, `No dead letter 0-1 in topic ${orders.name}`)
          const badTopic = yield* cli(["dlq", "list", "--topic", "bad topic"])
          assert.strictEqual(badTopic.code, 2)
          assert.include(badTopic.stderr, "topic")

          // replay: a dry run changes nothing; ids and --all are exclusive; then 1 000 with progress
          const dry = json<{ dryRun: boolean; matched: number }>(
            yield* cli(["dlq", "replay", "--topic", orders.name, "--all", "--dry-run", "--json"])
          )
          assert.deepStrictEqual([dry.dryRun, dry.matched], [true, 1000])
          assert.strictEqual(yield* count(), 1000, "a dry run replays nothing")
          const neither = yield* cli(["dlq", "replay", "--topic", orders.name])
          assert.strictEqual(neither.code, 2)
          assert.include(neither.stderr, "give dead-letter ids, or --all")
          billing.refusing = false
          const replay = yield* cli(["dlq", "replay", "--topic", orders.name, "--all"])
          assert.strictEqual(replay.code, 0, replay.stderr)
          assert.include(replay.stdout, `replayed 1000 of 1000 dead letter(s) of ${orders.name}`)
          const steps = replay.stderr.split("\n").filter((l) => l.startsWith("replaying "))
          assert.isAtLeast(steps.length, 10, "a progress line per tenth")
          assert.strictEqual(steps.at(-1), "replaying 1000/1000")
          yield* eventually(
            "all handled",
            Effect.sync(() => billing.handled.size),
            (n) => n === 1000,
            30_000
          )
          assert.strictEqual(yield* count(), 0, "the queue is empty")

          // trace: the first order's life, across the publish, the dead letter, the replay and the handling
          const traced = json<ReadonlyArray<Audit.Stored>>(yield* cli(["trace", `flow-${run}`, "--json"]))
          assert.deepStrictEqual(
            traced.map((e) => e.kind),
            ["published", "dead-lettered", "replayed", "handled"],
            JSON.stringify(traced)
          )
          const traceText = yield* cli(["trace", first.id])
          assert.strictEqual(traceText.code, 0)
          assert.match(traceText.stdout, /dead-lettered\s+cli\.orders\s+billing/)
          const unknown = yield* cli(["trace", "no-such-id"])
          assert.strictEqual(unknown.code, 4)
          assert.include(unknown.stderr, "no audit events for no-such-id")

          // purge: three more dead letters; a dry run, then for real
          billing.refusing = true
          yield* Publisher.publishAll(orders, [
            { id: "p-1", cents: 1 },
            { id: "p-2", cents: 2 },
            { id: "p-3", cents: 3 }
          ])
          yield* eventually("3 dead letters", count(), (n) => n === 3)
          const dryPurge = json<{ matched: number; ids: ReadonlyArray<string> }>(
            yield* cli(["dlq", "purge", "--topic", orders.name, "--all", "--dry-run", "--json"])
          )
          assert.strictEqual(dryPurge.matched, 3)
          const one = yield* cli(["dlq", "purge", "--topic", orders.name, dryPurge.ids[0]!])
          assert.strictEqual(one.code, 0)
          assert.include(one.stdout, "purged 1 dead letter(s)")
          const rest = json<{ purged: number }>(yield* cli(["dlq", "purge", "--topic", orders.name, "--all", "--json"]))
          assert.strictEqual(rest.purged, 2)
          assert.strictEqual(yield* count(), 0)
          billing.refusing = false
        })
    )

    it.effect("outbox dead and requeue: the relay's refused row, listed and requeued", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        // a row no envelope can be made of (an invalid topic name): the relay moves it to outbox_dead
        yield* sql.unsafe(
          `INSERT INTO ${schema}.outbox (partition, message_id, topic, type, source, time, attempt, headers, data, created_at)
           VALUES (0, 'bad-1', 'no spaces allowed', 't', 'urn:test', now(), 1, '{}', '{}', now())`
        ).raw
        type Row = { seq: string; messageId: string; topic: string; reason: string; error: string; movedAt: string }
        const dead = yield* eventually(
          "moved aside",
          cli(["outbox", "dead", "--json"]).pipe(Effect.map((r) => json<ReadonlyArray<Row>>(r))),
          (rows) => rows.length === 1
        )
        assert.strictEqual(dead[0]!.messageId, "bad-1")
        assert.strictEqual(dead[0]!.reason, "malformed")
        assert.match(dead[0]!.movedAt, /^\d{4}-\d\d-\d\dT/)
        const text = yield* cli(["outbox", "dead"])
        assert.match(text.stdout, /SEQ\s+MESSAGE ID\s+TOPIC\s+REASON/)
        const nothing = yield* cli(["outbox", "requeue"])
        assert.strictEqual(nothing.code, 2)
        const requeued = yield* cli(["outbox", "requeue", dead[0]!.seq])
        assert.strictEqual(requeued.code, 0)
        assert.include(requeued.stdout, "requeued 1 row(s)")
        // still malformed: the relay moves it aside again, under a new seq
        const again = yield* eventually(
          "moved aside again",
          cli(["outbox", "dead", "--json"]).pipe(Effect.map((r) => json<ReadonlyArray<Row>>(r))),
          (rows) => rows.length === 1 && rows[0]!.seq !== dead[0]!.seq
        )
        assert.strictEqual(again[0]!.messageId, "bad-1")
      })
    )

    it.effect(
      "saga list/show/resume: a parked saga is listed, shown and resumed from the CLI; resume again conflicts",
      () =>
        Effect.gen(function* () {
          SagaTest.faults.releaseFailures = 1_000
          const payload = { id: `cli-${run}`, cents: 0 }
          const executionId = yield* SagaTest.OrderSaga.workflow.execute(payload, { discard: true })
          const parked = yield* eventually(
            "parked",
            cli(["saga", "list", "--status", "needs-attention", "--json"]).pipe(
              Effect.map((r) => json<ReadonlyArray<{ executionId: string; status: string; name: string }>>(r))
            ),
            (list) => list.some((s) => s.executionId === executionId),
            40_000
          )
          assert.strictEqual(parked.find((s) => s.executionId === executionId)!.name, "sagatest-order")
          const shown = yield* cli(["saga", "show", executionId])
          assert.strictEqual(shown.code, 0)
          assert.include(shown.stdout, `saga ${executionId} (sagatest-order): needs-attention`)
          assert.include(shown.stdout, "parked at compensation of reserve")
          assert.match(shown.stdout, /reserve\s+compensation\s+parked\s+5/)
          const status = json<{ sagas: Record<string, number> }>(yield* cli(["status", "--json"]))
          assert.strictEqual(status.sagas["needs-attention"], 1)

          SagaTest.faults.releaseFailures = 0
          const resumed = yield* cli(["saga", "resume", executionId])
          assert.strictEqual(resumed.code, 0, resumed.stderr)
          assert.include(resumed.stdout, `saga ${executionId} resumed`)
          yield* eventually(
            "compensated",
            Saga.show(executionId).pipe(Effect.map((d) => d.status)),
            (s) => s === "compensated",
            30_000
          )
          const again = yield* cli(["saga", "resume", executionId])
          assert.strictEqual(again.code, 5)
          assert.include(again.stderr, "is compensated, not needs-attention")
          const unknown = yield* cli(["saga", "show", "no-such-saga", "--json"])
          assert.strictEqual(unknown.code, 4)
          const resolveUnknown = yield* cli(["saga", "resolve", "no-such-saga"])
          assert.strictEqual(resolveUnknown.code, 4)
          assert.include(resolveUnknown.stderr, "no-such-saga")
          const resolveDone = yield* cli(["saga", "resolve", executionId, "--json"])
          assert.strictEqual(resolveDone.code, 5, "a compensated saga has nothing to resolve")
        })
    )

    it.effect("converge dashboard serves the overview and the status API over the same servers, read-only", () =>
      Effect.gen(function* () {
        const child = spawn(process.execPath, [bin, "dashboard", "--port", "0", "--read-only"], {
          env: {
            ...process.env,
            REDIS_URL: redisUrl,
            DATABASE_URL: pgUrl,
            CONVERGE_REDIS_PREFIX: prefix,
            CONVERGE_SCHEMA: schema
          },
          stdio: ["ignore", "pipe", "pipe"]
        })
        yield* Effect.addFinalizer(() => Effect.sync(() => child.kill("SIGINT")))
        const url = yield* Effect.callback<string, Error>((resume) => {
          let out = ""
          child.stdout!.on("data", (chunk: Buffer) => {
            out += chunk.toString()
            const found = /converge dashboard on (http:\/\/127\.0\.0\.1:\d+) \(read-only\)/.exec(out)
            if (found !== null) resume(Effect.succeed(found[1]!))
          })
          child.once("exit", (code) => resume(Effect.fail(new Error(`dashboard exited ${code}: ${out}`))))
        }).pipe(Effect.timeout("30 seconds"))
        const overview = yield* Effect.promise(() => fetch(url).then((r) => r.text()))
        assert.include(overview, "cli.orders")
        const status = yield* Effect.promise(() => fetch(`${url}/api/status`).then((r) => r.json()))
        assert.strictEqual((status as { outbox: { schema: string } }).outbox.schema, schema)
        const refused = yield* Effect.promise(() => fetch(`${url}/sagas/x/resume`, { method: "POST" }))
        assert.strictEqual(refused.status, 403)
      })
    )

    it.effect("unreachable servers, a wrong schema: clear errors and exit codes, nothing created", () =>
      Effect.gen(function* () {
        const redisDown = yield* cli(["status"], { REDIS_URL: "redis://127.0.0.1:1" })
        assert.strictEqual(redisDown.code, 3)
        assert.strictEqual(
          redisDown.stderr.trim(),
          "converge: cannot reach Redis at redis://127.0.0.1:1: connect ECONNREFUSED 127.0.0.1:1",
          "one line, no client log noise"
        )
        const pgDown = yield* cli(["status"], { DATABASE_URL: "postgres://127.0.0.1:1/test" })
        assert.strictEqual(pgDown.code, 3)
        assert.include(pgDown.stderr, "converge: cannot reach Postgres at postgres://127.0.0.1:1/test")
        const wrong = yield* cli(["status", "--schema", `no_such_schema_${run}`])
        assert.strictEqual(wrong.code, 2)
        assert.include(wrong.stderr, `schema no_such_schema_${run} has no Converge store`)
        const sql = yield* SqlClient.SqlClient
        const created = yield* sql<{
          n: number
        }>`SELECT count(*)::int AS n FROM information_schema.schemata WHERE schema_name = ${`no_such_schema_${run}`}`
        assert.strictEqual(Number(created[0]!.n), 0, "an operator tool creates no schema")
        const badUrl = yield* cli(["status"], { DATABASE_URL: "mysql://127.0.0.1/test" })
        assert.strictEqual(badUrl.code, 2)
        assert.include(badUrl.stderr, "expected postgres or postgresql")
        const noBroker = yield* cli(["dlq", "list"], { REDIS_URL: "" })
        assert.strictEqual(noBroker.code, 3)
        assert.include(noBroker.stderr, "no broker configured: --redis-url or REDIS_URL")
        const usage = yield* cli(["dlq", "lst"])
        assert.strictEqual(usage.code, 2)
        assert.include(usage.stderr + usage.stdout, 'Unknown subcommand "lst"')
      })
    )
  })
})
