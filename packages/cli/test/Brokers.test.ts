/**
 * The `converge` CLI on the other brokers: NATS JetStream (`--nats-url`), the real executable in a child
 * process against the machine's NATS server: `status` lists the topic with its group and dead letters,
 * `dlq list` shows them with their reason, `dlq replay --all` re-publishes them (under ids of their own, so
 * JetStream's dedup does not drop them) and empties the queue. And two broker URLs at once are refused.
 */
import { execFile } from "node:child_process"
import { randomUUID } from "node:crypto"
import { fileURLToPath } from "node:url"
import { NatsBroker, NatsClient } from "@converge/broker-nats"
import { Broker } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Stream } from "effect"

const natsUrl = `nats://${process.env.NATS_URL ?? "127.0.0.1:4222"}`.replace("nats://nats://", "nats://")
const bin = fileURLToPath(new URL("../src/bin.ts", import.meta.url))

interface Result {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Runs `converge ...args` with no Redis or Postgres in its environment. */
const cli = (args: ReadonlyArray<string>, env: Record<string, string> = {}): Effect.Effect<Result> =>
  Effect.callback<Result>((resume) => {
    execFile(
      process.execPath,
      [bin, ...args],
      {
        env: { ...process.env, REDIS_URL: "", DATABASE_URL: "", NATS_URL: "", ...env },
        timeout: 60_000
      },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === "number" ? error.code : -1
        resume(Effect.succeed({ code, stdout, stderr }))
      }
    )
  })

describe("the converge CLI on NATS JetStream", () => {
  it.live(
    "status, dlq list and dlq replay --all over --nats-url",
    () =>
      Effect.gen(function* () {
        const prefix = `cvcli_${randomUUID().slice(0, 8)}`
        const topic = "cli.nats"
        const client = NatsClient.layer({ servers: natsUrl })
        yield* Effect.gen(function* () {
          const broker = yield* Broker.Broker
          yield* broker.publish(BrokerTest.messages(topic, 3))
          // billing dead-letters two of the three
          yield* broker.subscribe({ topic, group: "billing", consumer: "c" }).pipe(
            Stream.take(3),
            Stream.runForEach((d) =>
              d.entryId === "2" ? d.ack : d.deadLetter({ reason: "permanent", error: `refused ${d.envelope.id}` })
            )
          )
          const flags = ["--nats-url", natsUrl, "--prefix", prefix, "--json"]
          const status = yield* cli(["status", ...flags])
          assert.strictEqual(status.code, 0, status.stderr)
          const st = JSON.parse(status.stdout) as {
            topics: Array<{ topic: string; deadLetters: number; groups: Array<{ group: string }> }>
          }
          const t = st.topics.find((x) => x.topic === topic)
          assert.isDefined(t, status.stdout)
          assert.strictEqual(t!.deadLetters, 2)
          assert.deepStrictEqual(
            t!.groups.map((g) => g.group),
            ["billing"]
          )
          const list = yield* cli(["dlq", "list", "--topic", topic, ...flags])
          assert.strictEqual(list.code, 0, list.stderr)
          const letters = JSON.parse(list.stdout) as Array<{ reason: string; error: string; group: string }>
          assert.deepStrictEqual(
            letters.map((l) => [l.reason, l.group]),
            [
              ["permanent", "billing"],
              ["permanent", "billing"]
            ]
          )
          const replay = yield* cli(["dlq", "replay", "--topic", topic, "--all", ...flags])
          assert.strictEqual(replay.code, 0, replay.stderr)
          const replayed = JSON.parse(replay.stdout) as { replayed: Array<{ entryId: string }> }
          assert.strictEqual(replayed.replayed.length, 2)
          // new entries in the topic's stream (not dropped as duplicates of the first publish)
          assert.deepStrictEqual(replayed.replayed.map((r) => Number(r.entryId)).sort(), [4, 5])
          assert.strictEqual((yield* broker.deadLetters(topic)).length, 0, "the queue is empty after the replay")
          const { manager } = yield* NatsClient.NatsClient
          yield* Effect.promise(async () => {
            for await (const s of manager.streams.list()) {
              if (s.config.name.startsWith(`${prefix}_`)) await manager.streams.delete(s.config.name)
            }
          })
        }).pipe(Effect.provide(NatsBroker.layer({ prefix }).pipe(Layer.provideMerge(client))))
      }).pipe(Effect.scoped),
    120_000
  )

  it.live("a Redis URL and a NATS URL at once are refused (exit 2), naming both", () =>
    Effect.gen(function* () {
      const r = yield* cli(["status", "--redis-url", "redis://127.0.0.1:6379", "--nats-url", natsUrl])
      assert.strictEqual(r.code, 2, r.stderr)
      assert.include(r.stderr, "both a Redis URL and a NATS URL")
    })
  )
})
