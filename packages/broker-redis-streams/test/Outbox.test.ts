/**
 * Processes killed with SIGKILL, with Redis as the broker and Postgres as the
 * store:
 *
 * - the outbox relay, after claiming its rows (before publishing them) and
 *   between publish and mark: every message is delivered, and the
 *   consumer's inbox keeps each effect single although in the second case
 *   the dead relay's batch is published a second time;
 * - a consumer, before its inbox transaction, inside it (mid-batch), and
 *   after it committed but before it acked: a replacement consumer (another
 *   name) claims the read, the inbox skips what had committed, and every
 *   effect is applied exactly once.
 */
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { Consumer, Topic } from "@converge/core"
import { Inbox, Outbox, OutboxRelay, SqlStore } from "@converge/store-postgres"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted, Schema } from "effect"
import * as Redis from "effect/persistence/Redis"
import { brokerLayer, effectCounts, freshStore, mainUrl, Prefix, pendingOf, pgUrl, streamKey } from "./helpers.ts"

const Order = Schema.Struct({ id: Schema.String, account: Schema.String })
const orders = Topic.make("orders", Order, { key: (o) => o.account })

/**
 * Runs `test/fixtures/<name>` in a child process. `reported()` sums the numbers its stdout lines give
 * after one of `words` (`published 20`, say); `exited` completes with the signal that ended it.
 */
const spawnFixture = (name: string, args: ReadonlyArray<string>, words: ReadonlyArray<string>) => {
  const script = fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url))
  const child = spawn(process.execPath, [script, ...args], { stdio: ["ignore", "pipe", "inherit"] })
  let reported = 0
  child.stdout.on("data", (chunk) => {
    for (const line of String(chunk).split("\n")) {
      const [word, n] = line.split(" ")
      if (word !== undefined && words.includes(word)) reported += Number(n)
    }
  })
  const exited = Effect.promise(
    () =>
      new Promise<NodeJS.Signals | null>((resolve) =>
        child.exitCode !== null || child.signalCode !== null
          ? resolve(child.signalCode)
          : child.once("exit", (_code, signal) => resolve(signal))
      )
  )
  return { child, reported: () => reported, exited }
}

describe("Outbox relay on Redis", () => {
  const relayKills = [
    { when: "after-claim", title: "after claiming its rows, before publishing them", republished: 0 },
    { when: "after-publish", title: "between publish and mark", republished: 20 }
  ] as const
  it.live.each(relayKills)(
    "a relay process killed with SIGKILL $title: everything delivered, each effect once",
    ({ when, republished }) =>
      Effect.gen(function* () {
        const { sql, schema, store } = yield* freshStore("kill", "order_id text NOT NULL")
        const provideStore = <A, E, R>(e: Effect.Effect<A, E, R>) => Effect.provideService(e, SqlStore.SqlStore, store)
        const outbox = yield* provideStore(Outbox.make())
        const total = 50
        for (let i = 0; i < total; i += 10) {
          yield* provideStore(
            Outbox.transaction(
              outbox.publishAll(
                orders,
                Array.from({ length: 10 }, (_, j) => ({ id: `o-${i + j}`, account: `a-${(i + j) % 5}` }))
              )
            )
          )
        }

        const prefix = yield* Prefix
        const doomed = spawnFixture("doomed-relay.ts", [pgUrl, schema, mainUrl, prefix, when], ["claimed", "published"])
        for (let i = 0; i < 1000 && doomed.reported() === 0; i++) yield* Effect.sleep("20 millis")
        assert.strictEqual(doomed.reported(), 20, "the doomed relay is stuck with one batch")
        const redis = yield* Redis.Redis
        assert.strictEqual(
          Number(yield* redis.send("XLEN", streamKey(prefix, "orders"))),
          republished,
          when === "after-claim" ? "nothing reached Redis" : "the batch reached Redis"
        )
        doomed.child.kill("SIGKILL")
        assert.strictEqual(yield* doomed.exited, "SIGKILL")
        const unpublished = sql.unsafe<{ n: number }>(
          `SELECT count(*)::int AS n FROM ${schema}.outbox WHERE published_at IS NULL`
        ).withoutTransform
        // The killed relay's transaction rolled back: its marks never happened.
        assert.strictEqual(Number((yield* unpublished)[0]!.n), total)

        let deliveries = 0
        const rescue = Layer.mergeAll(
          OutboxRelay.layer({ pollInterval: "100 millis", listen: false }),
          Layer.effectDiscard(
            Effect.forkScoped(
              Consumer.make(orders, {
                group: "ledger",
                handle: (order, ctx) =>
                  Effect.andThen(
                    Effect.sync(() => deliveries++),
                    Inbox.handler((o: typeof Order.Type) =>
                      Effect.asVoid(sql.unsafe(`INSERT INTO ${schema}.effects (order_id) VALUES ($1)`, [o.id]).raw)
                    )(order, ctx)
                  )
              })
            )
          )
        ).pipe(Layer.provideMerge(Inbox.layer()), Layer.provide(Layer.succeed(SqlStore.SqlStore, store)))
        const effects = effectCounts(sql, schema)
        yield* Effect.gen(function* () {
          for (let i = 0; i < 500; i++) {
            if ((yield* effects).distinct >= total && deliveries >= total + republished) break
            yield* Effect.sleep("20 millis")
          }
          yield* Effect.sleep("200 millis")
        }).pipe(Effect.provide(rescue))
        const counts = yield* effects
        assert.strictEqual(counts.distinct, total, "every message delivered")
        assert.strictEqual(counts.rows, total, "every effect exactly once")
        assert.strictEqual(
          deliveries,
          total + republished,
          republished === 0
            ? "nothing arrived twice"
            : "the killed relay's 20 messages arrived twice; the inbox skipped the copies"
        )
        assert.strictEqual(Number((yield* unpublished)[0]!.n), 0)
      }).pipe(
        Effect.scoped,
        Effect.provide(Layer.mergeAll(brokerLayer(), PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 6 })))
      ),
    60_000
  )

  const consumerKills = [
    { when: "before", title: "before its inbox transaction", committed: 0 },
    { when: "mid-batch", title: "mid-batch, inside its inbox transaction", committed: 0 },
    { when: "after-commit", title: "after its inbox transaction committed, before the ack", committed: 10 }
  ] as const
  it.live.each(consumerKills)(
    "a consumer process killed with SIGKILL $title: a replacement applies each effect once",
    ({ when, committed: expected }) =>
      Effect.gen(function* () {
        const { sql, schema, store } = yield* freshStore("kill", "order_id text NOT NULL")
        const prefix = yield* Prefix
        const provideStore = <A, E, R>(e: Effect.Effect<A, E, R>) => Effect.provideService(e, SqlStore.SqlStore, store)
        const outbox = yield* provideStore(Outbox.make())
        const total = 30
        yield* provideStore(
          Outbox.transaction(
            outbox.publishAll(
              orders,
              Array.from({ length: total }, (_, i) => ({ id: `o-${i}`, account: `a-${i % 5}` }))
            )
          )
        )
        const relay = yield* provideStore(OutboxRelay.make({ listen: false }))
        assert.strictEqual(yield* relay.drain, total, "the relay moved every message to Redis")

        const doomed = spawnFixture("doomed-inbox-consumer.ts", [pgUrl, schema, mainUrl, prefix, when], ["dying"])
        assert.strictEqual(yield* doomed.exited, "SIGKILL", "the consumer died by SIGKILL")
        assert.strictEqual(doomed.reported(), 10, "it died handling its first read, of 10")
        const effects = effectCounts(sql, schema)
        assert.strictEqual(
          (yield* effects).rows,
          expected,
          expected === 0 ? "nothing of it committed" : "its effects committed"
        )
        const pending = pendingOf(streamKey(prefix, "orders"), "ledger")
        // its read was never acked (nor what it had read ahead): pending under the dead consumer's name
        const left = yield* pending
        assert.isAtLeast(left.count, 10)
        assert.deepStrictEqual(left.byConsumer, { doomed: String(left.count) })

        // the replacement has another name: it claims the dead one's entries once idle, and reads the rest
        let fresh = 0
        const rescuer = Layer.effectDiscard(
          Effect.forkScoped(
            Consumer.make(orders, {
              group: "ledger",
              consumer: "rescuer",
              claimIdle: "1 second",
              ...Inbox.handlers((items: ReadonlyArray<Consumer.BatchItem<typeof Order.Type>>) =>
                Effect.andThen(
                  Effect.sync(() => {
                    fresh += items.length
                  }),
                  sql.unsafe(`INSERT INTO ${schema}.effects (order_id) SELECT unnest($1::text[])`, [
                    items.map((i) => i.message.id)
                  ]).raw
                )
              )
            })
          )
        ).pipe(Layer.provide(Inbox.layer()), Layer.provide(Layer.succeed(SqlStore.SqlStore, store)))
        yield* Effect.gen(function* () {
          for (let i = 0; i < 500; i++) {
            if ((yield* effects).distinct >= total && (yield* pending).count === 0) break
            yield* Effect.sleep("20 millis")
          }
        }).pipe(Effect.provide(rescuer))
        const counts = yield* effects
        assert.strictEqual(counts.distinct, total, "every message's effect applied")
        assert.strictEqual(counts.rows, total, "each exactly once")
        assert.strictEqual(fresh, total - expected, "what committed before the kill was skipped by the inbox")
        assert.strictEqual((yield* pending).count, 0, "and acked")
      }).pipe(
        Effect.scoped,
        Effect.provide(Layer.mergeAll(brokerLayer(), PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 6 })))
      ),
    60_000
  )
})
