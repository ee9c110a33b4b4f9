/**
 * `OutboxStoreTest` — the outbox store suite (docs/outbox-inbox.md): uncommitted is
 * not stored; a committed row is relayed once confirmed; a batch publish
 * stores one row per message, in order; rows committed out
 * of sequence order are not missed; two relays never reorder a key; a long
 * transaction delays but never loses; cleanup respects retention; a poison
 * row is moved aside and does not stop the relay; the relay wakes on commit,
 * not again for a commit it already read past, and again soon for a commit
 * an older transaction still holds back.
 *
 * Runs against any `SqlClient` layer speaking Postgres (a server through
 * `PgClient.layer`, or PGlite behind a socket). Every case works in a fresh
 * schema, dropped afterwards.
 *
 * ```ts
 * OutboxStoreTest.suite("postgres", PgClient.layer({ url }), { concurrentTransactions: true, listen: true })
 * ```
 *
 * @since 0.1.0
 */

import { Partition, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe } from "@effect/vitest"
import { Deferred, Effect, Fiber, Layer, Queue } from "effect"
import { SqlClient } from "effect/sql"
import * as Outbox from "../Outbox.ts"
import * as OutboxRelay from "../OutboxRelay.ts"
import * as SqlStore from "../SqlStore.ts"
import { count, type Features, freshStore, Item, items, recordingBroker, storeSuite } from "./StoreHarness.ts"

/** What a SQL backend supports (shared with the other store suite). */
export type { Features } from "./StoreHarness.ts"

const payloadOf = (data: string) => JSON.parse(data) as { readonly key: string; readonly n: number }

/**
 * Registers the outbox store suite (cases O01–O13).
 *
 * @since 0.1.0
 */
export const suite = <E>(name: string, sqlLayer: Layer.Layer<SqlClient.SqlClient, E>, features: Features): void => {
  storeSuite(`OutboxStoreTest ${name}`, sqlLayer, features, (test) => {
    const setup = (options?: { partitions?: number; relay?: OutboxRelay.Options }) =>
      Effect.gen(function* () {
        const store = yield* freshStore({ partitions: options?.partitions ?? 4 })
        const { recorder, layer: brokerLayer } = recordingBroker()
        const provide = <A, E2, R>(effect: Effect.Effect<A, E2, R>) =>
          effect.pipe(Effect.provideService(SqlStore.SqlStore, store), Effect.provide(brokerLayer))
        const outbox = yield* provide(Outbox.make())
        const relay = yield* provide(OutboxRelay.make(options?.relay))
        const publish = (key: string, ns: ReadonlyArray<number>) =>
          provide(
            Outbox.transaction(
              outbox.publishAll(
                items,
                ns.map((n) => ({ key, n }))
              )
            )
          )
        const t = (name: string) => store.table(name)
        return { store, recorder, outbox, relay, publish, provide, t }
      })

    describe("outbox", () => {
      test("O01", "uncommitted is not stored: a rolled-back transaction publishes nothing", {}, () =>
        Effect.gen(function* () {
          const { recorder, outbox, relay, provide, t } = yield* setup()
          const failed = yield* provide(
            Outbox.transaction(
              Effect.gen(function* () {
                yield* outbox.publishAll(items, [
                  { key: "a", n: 1 },
                  { key: "a", n: 2 }
                ])
                return yield* Effect.fail("business rule broken" as const)
              })
            )
          ).pipe(Effect.flip)
          assert.strictEqual(failed, "business rule broken")
          assert.strictEqual(yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")}`), 0)
          assert.strictEqual(yield* relay.drain, 0)
          assert.strictEqual(recorder.published.length, 0)
          // A defect rolls back too.
          const died = yield* provide(
            Outbox.transaction(Effect.andThen(outbox.publish(items, { key: "a", n: 3 }), Effect.die("boom")))
          ).pipe(Effect.exit)
          assert.isTrue(died._tag === "Failure")
          assert.strictEqual(yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")}`), 0)
        })
      )

      test("O02", "a committed row is relayed once, and only marked after the broker confirmed", {}, () =>
        Effect.gen(function* () {
          const { recorder, relay, publish, t } = yield* setup()
          const receipts = yield* publish("a", [1, 2, 3])
          recorder.failNext = 1
          const outage = yield* relay.drain.pipe(Effect.flip)
          assert.isTrue(outage.isRetryable, "a broker outage fails the cycle retryably")
          assert.strictEqual(
            yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")} WHERE published_at IS NULL`),
            3,
            "rows stay unpublished while the broker has not confirmed"
          )
          assert.deepStrictEqual((yield* relay.lag).unpublished, 3)
          assert.strictEqual(yield* relay.drain, 3)
          assert.deepStrictEqual(
            recorder.published.map((m) => m.id),
            receipts.map((r) => r.id)
          )
          assert.deepStrictEqual(
            recorder.published.map((m) => payloadOf(m.data).n),
            [1, 2, 3]
          )
          assert.strictEqual(recorder.published[0]!.topic, items.name)
          assert.strictEqual(recorder.published[0]!.key, "a")
          assert.strictEqual(yield* relay.drain, 0, "a relayed row is not relayed again")
          assert.strictEqual(recorder.published.length, 3)
          assert.deepStrictEqual((yield* relay.lag).unpublished, 0)
        })
      )

      test("O13", "publishAll stores one row per message, in order, across statements, with or without keys", {}, () =>
        Effect.gen(function* () {
          const { recorder, outbox, relay, provide, store, t } = yield* setup({ partitions: 4 })
          // 2 500 messages: more than one insert statement (2 000 rows each)
          const many = Array.from({ length: 2500 }, (_, n) => ({ key: `k${n % 5}`, n }))
          const receipts = yield* provide(
            Outbox.transaction(outbox.publishAll(items, many, { headers: { tenant: "t1" } }))
          )
          const plain = Topic.make("store-test-plain", Item)
          const unkeyed = yield* provide(
            Outbox.transaction(
              outbox.publishAll(plain, [
                { key: "ignored", n: 1 },
                { key: "ignored", n: 2 }
              ])
            )
          )
          const rows = yield* SqlClient.SqlClient.use(
            (sql) =>
              sql.unsafe<{
                readonly seq: string
                readonly partition: number
                readonly message_id: string
                readonly topic: string
                readonly key: string | null
                readonly attempt: number
                readonly headers: unknown
                readonly data: string
                readonly same_time: boolean
              }>(
                `SELECT seq::text AS seq, partition, message_id, topic, key, attempt, headers, data,
                   time = created_at AS same_time FROM ${t("outbox")} o ORDER BY o.seq`
              ).withoutTransform
          )
          assert.strictEqual(rows.length, 2502)
          assert.deepStrictEqual(
            rows.map((r) => [r.message_id, r.seq]),
            [...receipts, ...unkeyed].map((r) => [r.id, r.seq]),
            "one row per message, in publish order, and each receipt names its row"
          )
          for (let i = 0; i < many.length; i++) {
            const row = rows[i]!
            assert.deepStrictEqual(payloadOf(row.data), many[i])
            assert.strictEqual(row.key, many[i]!.key)
            assert.strictEqual(Number(row.partition), Partition.of(many[i]!.key, store.partitions))
            assert.strictEqual(row.topic, items.name)
            assert.strictEqual(Number(row.attempt), 1)
            // the user's headers, plus the trace context when the publish ran inside a span (the test runner's)
            const { traceparent, ...headers } = (
              typeof row.headers === "string" ? JSON.parse(row.headers) : row.headers
            ) as Record<string, string>
            assert.deepStrictEqual(headers, { tenant: "t1" })
            if (traceparent !== undefined) assert.match(traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/)
            assert.isTrue(row.same_time)
          }
          for (const row of rows.slice(2500)) {
            assert.strictEqual(row.key, null, "a topic without a key function stores no key")
            assert.strictEqual(Number(row.partition), Partition.of(row.message_id, store.partitions))
            assert.strictEqual(row.topic, plain.name)
          }
          while ((yield* relay.drain) > 0) {}
          assert.strictEqual(recorder.published.length, 2502)
          for (let k = 0; k < 5; k++) {
            assert.deepStrictEqual(
              recorder.published.filter((m) => m.key === `k${k}`).map((m) => payloadOf(m.data).n),
              many.filter((m) => m.key === `k${k}`).map((m) => m.n),
              `key k${k} relayed in publish order`
            )
          }
          const relayed = recorder.published.find((m) => m.id === receipts[0]!.id)!
          const { traceparent: _, ...relayedHeaders } = relayed.headers
          assert.deepStrictEqual(relayedHeaders, { tenant: "t1" })
          assert.isUndefined(recorder.published.find((m) => m.id === unkeyed[0]!.id)!.key)
        })
      )

      test(
        "O03",
        "rows committed out of sequence order are not missed (the higher sequence number commits first)",
        { concurrent: true },
        () =>
          Effect.gen(function* () {
            const { recorder, relay, publish, outbox, provide, t } = yield* setup({ partitions: 1 })
            // A: inserts first (lower seq, lower xid), commits last.
            const commitA = yield* holdOpen((inside) =>
              provide(Outbox.transaction(Effect.andThen(outbox.publish(items, { key: "k", n: 1 }), inside)))
            )
            // B: inserts later (higher seq) and commits first.
            yield* publish("k", [2])
            assert.strictEqual(
              yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")}`),
              1,
              "only B's row is visible while A is open"
            )
            assert.strictEqual(yield* relay.drain, 0, "B's row waits until A, which began before it, has ended")
            yield* commitA
            assert.strictEqual(yield* relay.drain, 2)
            assert.deepStrictEqual(
              recorder.published.map((m) => payloadOf(m.data).n),
              [1, 2],
              "both rows relayed, in transaction order"
            )
          })
      )

      test("O04", "two relays at once never reorder a key", { concurrent: true }, () =>
        Effect.gen(function* () {
          const { recorder, relay, publish, provide } = yield* setup({ partitions: 4, relay: { batchSize: 7 } })
          const second = yield* provide(OutboxRelay.make({ batchSize: 5 }))
          const keys = Array.from({ length: 10 }, (_, i) => `key-${i}`)
          const spin = (r: OutboxRelay.OutboxRelay["Service"]) =>
            Effect.forkChild(Effect.forever(Effect.andThen(Effect.ignore(r.drain), Effect.sleep("2 millis"))))
          const f1 = yield* spin(relay)
          const f2 = yield* spin(second)
          const perKey = 30
          for (let round = 0; round < perKey / 3; round++) {
            yield* Effect.forEach(keys, (key) => publish(key, [round * 3, round * 3 + 1, round * 3 + 2]), {
              concurrency: 4
            })
          }
          yield* Effect.sleep("100 millis")
          yield* Fiber.interrupt(f1)
          yield* Fiber.interrupt(f2)
          yield* relay.drain
          assert.strictEqual(recorder.published.length, keys.length * perKey, "every message exactly once")
          const ids = new Set(recorder.published.map((m) => m.id))
          assert.strictEqual(ids.size, keys.length * perKey)
          for (const key of keys) {
            const ns = recorder.published.filter((m) => m.key === key).map((m) => payloadOf(m.data).n)
            assert.deepStrictEqual(
              ns,
              Array.from({ length: perKey }, (_, i) => i),
              `order of ${key}`
            )
          }
        })
      )

      test(
        "O05",
        "a long transaction delays the rows written after it began, never loses them",
        { concurrent: true },
        () =>
          Effect.gen(function* () {
            const { recorder, relay, publish, outbox, provide } = yield* setup({ partitions: 2 })
            const endLong = yield* holdOpen((inside) =>
              provide(Outbox.transaction(Effect.andThen(outbox.publish(items, { key: "long", n: 0 }), inside)))
            )
            for (let i = 1; i <= 5; i++) yield* publish(`k${i}`, [i])
            assert.strictEqual(yield* relay.drain, 0, "delayed while the long transaction is open")
            yield* Effect.sleep("200 millis")
            assert.strictEqual(yield* relay.drain, 0, "still delayed")
            yield* endLong
            assert.strictEqual(yield* relay.drain, 6)
            assert.deepStrictEqual(
              recorder.published.map((m) => payloadOf(m.data).n),
              [0, 1, 2, 3, 4, 5]
            )
          })
      )

      test("O06", "cleanup deletes published rows older than the retention, and nothing else", {}, () =>
        Effect.gen(function* () {
          const { relay, publish, t } = yield* setup({ relay: { retention: "300 millis" } })
          yield* publish("a", [1, 2])
          assert.strictEqual(yield* relay.drain, 2)
          assert.strictEqual(yield* relay.cleanup, 0, "younger than the retention")
          yield* Effect.sleep("400 millis")
          yield* publish("a", [3]) // unpublished: never cleaned
          assert.strictEqual(yield* relay.cleanup, 2)
          assert.strictEqual(yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")}`), 1)
          assert.strictEqual(
            yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")} WHERE published_at IS NULL`),
            1
          )
          // retention 0: rows are deleted as they are published.
          const { relay: eager, publish: publish0, t: t0 } = yield* setup({ relay: { retention: 0 } })
          yield* publish0("b", [1, 2, 3])
          assert.strictEqual(yield* eager.drain, 3)
          assert.strictEqual(yield* count(`SELECT count(*)::int AS n FROM ${t0("outbox")}`), 0)
        })
      )

      test("O07", "a poison row is moved aside with its reason, does not stop the relay, and can be requeued", {}, () =>
        Effect.gen(function* () {
          const { recorder, relay, publish, store, t } = yield* setup({ partitions: 1 })
          yield* publish("a", [1])
          // A row no envelope can be made of (written by hand, bypassing Outbox.publish).
          yield* store.sql.unsafe(
            `INSERT INTO ${t("outbox")} (partition, message_id, topic, type, source, key, time, attempt, headers, data, created_at)
             VALUES (0, 'hand-written', 'not a topic!', 't', 's', 'a', now(), 1, '{}', '{}', now())`
          ).raw
          const refused = yield* publish("a", [2])
          yield* publish("a", [3])
          recorder.refuse.add(refused[0]!.id)
          assert.strictEqual(yield* relay.drain, 4)
          assert.deepStrictEqual(
            recorder.published.map((m) => payloadOf(m.data).n),
            [1, 3]
          )
          const dead = yield* OutboxRelay.deadRows().pipe(Effect.provideService(SqlStore.SqlStore, store))
          assert.deepStrictEqual(
            dead.map((d) => [d.messageId, d.reason]).sort(),
            [
              ["hand-written", "malformed"],
              [refused[0]!.id, "rejected"]
            ].sort()
          )
          assert.match(dead.find((d) => d.reason === "malformed")!.error, /Invalid topic name/)
          assert.match(dead.find((d) => d.reason === "rejected")!.error, /simulated refusal/)
          assert.strictEqual(
            yield* count(`SELECT count(*)::int AS n FROM ${t("outbox")} WHERE published_at IS NULL`),
            0
          )
          yield* publish("a", [4])
          assert.strictEqual(yield* relay.drain, 1, "the relay goes on")
          // the refusal is lifted: requeue that row (by seq); the malformed one stays aside
          recorder.refuse.clear()
          const rejected = dead.find((d) => d.reason === "rejected")!
          const requeue = <A, E2>(e: Effect.Effect<A, E2, SqlStore.SqlStore>) =>
            Effect.provideService(e, SqlStore.SqlStore, store)
          const notASeq = yield* Effect.flip(requeue(OutboxRelay.requeueDead(["not-a-seq"])))
          assert.strictEqual(notASeq._tag, "SqlError", "a bad seq is a typed SqlError, not a defect")
          assert.strictEqual(yield* requeue(OutboxRelay.requeueDead([])), 0)
          assert.strictEqual(yield* requeue(OutboxRelay.requeueDead([rejected.seq])), 1)
          assert.strictEqual(yield* relay.drain, 1)
          assert.strictEqual(recorder.published.at(-1)!.id, refused[0]!.id, "same message id")
          assert.deepStrictEqual(
            (yield* requeue(OutboxRelay.deadRows())).map((d) => d.messageId),
            ["hand-written"]
          )
        })
      )

      test("O08", "the relay layer wakes on commit in this process, not on rollback", {}, () =>
        Effect.gen(function* () {
          const { recorder, env } = yield* backgroundRelay({ pollInterval: "1 hour", listen: false })
          yield* Effect.gen(function* () {
            yield* Effect.sleep("100 millis") // the relay's first drain has run
            yield* Outbox.transaction(
              Effect.andThen(Outbox.publish(items, { key: "a", n: 1 }), Effect.fail("rolled back"))
            ).pipe(Effect.ignore)
            yield* Outbox.transaction(Outbox.publish(items, { key: "a", n: 2 }))
            yield* waitFor(() => recorder.published.length >= 1, "the nudged relay publishes")
            yield* Effect.sleep("100 millis")
            assert.deepStrictEqual(
              recorder.published.map((m) => payloadOf(m.data).n),
              [2]
            )
          }).pipe(Effect.provide(env))
        })
      )

      test("O10", "a relay with several workers drains every partition, each key in order", { concurrent: true }, () =>
        Effect.gen(function* () {
          const { recorder, publish, provide } = yield* setup({ partitions: 8 })
          const workers = yield* provide(OutboxRelay.make({ concurrency: 3, batchSize: 10 }))
          // one busy key and a few quiet ones: a worker whose last share was quiet stops early
          const heavy = Array.from({ length: 40 }, (_, i) => i)
          const quiet = Array.from({ length: 11 }, (_, i) => `quiet-${i}`)
          yield* publish("busy", heavy)
          yield* Effect.forEach(quiet, (key) => publish(key, [0]), { concurrency: 4 })
          assert.strictEqual(yield* workers.drain, heavy.length + quiet.length)
          assert.strictEqual((yield* workers.lag).unpublished, 0, "nothing left behind by the workers' shares")
          assert.deepStrictEqual(
            recorder.published.filter((m) => m.key === "busy").map((m) => payloadOf(m.data).n),
            heavy,
            "order of the busy key"
          )
        })
      )

      test("O09", "the relay of another process is woken by NOTIFY", { listen: true }, () =>
        Effect.gen(function* () {
          const { store, recorder, env } = yield* backgroundRelay({ pollInterval: "1 hour" })
          yield* Effect.gen(function* () {
            yield* Effect.sleep("300 millis") // LISTEN is in place
            // A plain INSERT from another session: no in-process nudge, only the trigger's NOTIFY.
            yield* store.sql.unsafe(
              `INSERT INTO ${store.table("outbox")} (partition, message_id, topic, type, source, key, time, attempt, headers, data, created_at)
               VALUES (0, 'from-elsewhere', '${items.name}', '${items.type}', 'urn:test', 'a', now(), 1, '{}', '{"key":"a","n":1}', now())`
            ).raw
            yield* waitFor(() => recorder.published.length >= 1, "the notified relay publishes")
            assert.strictEqual(recorder.published[0]!.id, "from-elsewhere")
          }).pipe(Effect.provide(env))
        })
      )

      test("O11", "a NOTIFY for a transaction a finished drain read past starts no cycle", { listen: true }, () =>
        Effect.gen(function* () {
          const { store, recorder, env } = yield* backgroundRelay({ pollInterval: "1 hour" })
          const notify = (payload: string) => store.sql.unsafe(`SELECT pg_notify($1, $2)`, [store.channel, payload]).raw
          yield* Effect.gen(function* () {
            const relay = yield* OutboxRelay.OutboxRelay
            // our own listener too, to see what the trigger sends
            const pg = yield* PgClient.PgClient
            const heard = yield* pg.listen(store.channel)
            yield* Effect.sleep("300 millis") // LISTEN is in place
            // a commit of "another process": no in-process nudge; its NOTIFY names its transaction
            const inserted = yield* store.sql.unsafe<{ readonly tx: string }>(
              `INSERT INTO ${store.table("outbox")} (partition, message_id, topic, type, source, key, time, attempt, headers, data, created_at)
               VALUES (0, 'elsewhere', '${items.name}', '${items.type}', 'urn:test', 'a', now(), 1, '{}', '{"key":"a","n":1}', now())
               RETURNING tx::text AS tx`
            ).withoutTransform
            const tx = inserted[0]!.tx
            assert.strictEqual((yield* Queue.take(heard)).payload, tx, "the trigger's payload is the transaction id")
            yield* waitFor(() => recorder.published.length >= 1, "the notified relay publishes")
            // The same notification again: already read past, no drain. (A transaction of a concurrent test
            // elsewhere in the cluster can hold the horizon back for a moment: let a drain move it, and retry.)
            let skipped = false
            for (let attempt = 0; attempt < 20 && !skipped; attempt++) {
              yield* relay.nudge
              yield* Effect.sleep("100 millis")
              const before = yield* relay.stats
              yield* notify(tx)
              yield* Effect.sleep("200 millis")
              const after = yield* relay.stats
              assert.strictEqual(after.notifications, before.notifications + 1)
              if (after.notificationsCovered === before.notificationsCovered + 1) {
                assert.strictEqual(after.cycles, before.cycles, "a covered notification runs no cycle")
                skipped = true
              }
            }
            assert.isTrue(skipped, "the notification was recognised as covered")
            // a notification without a transaction id (a store migrated by an older version) always wakes
            const before = yield* relay.stats
            yield* notify("")
            yield* waitUntil(
              Effect.map(relay.stats, (s) => s.cycles > before.cycles),
              "an unknown transaction wakes the relay"
            )
            const after = yield* relay.stats
            assert.strictEqual(after.notificationsCovered, before.notificationsCovered)
            assert.strictEqual(after.published, 1)
            assert.deepStrictEqual(
              recorder.published.map((m) => m.id),
              ["elsewhere"]
            )
          }).pipe(Effect.provide(env))
        })
      )

      test(
        "O12",
        "a commit held back by an older open transaction is relayed when that one ends, not at the next poll",
        { concurrent: true },
        () =>
          Effect.gen(function* () {
            const { store, recorder, env } = yield* backgroundRelay({ pollInterval: "1 hour", listen: false })
            yield* Effect.gen(function* () {
              yield* Effect.sleep("100 millis") // the relay's first drain has run
              // an unrelated transaction with an id, older than the outbox commit below, open on another connection
              const endOther = yield* holdOpen((inside) =>
                store.sql.withTransaction(
                  Effect.andThen(store.sql.unsafe(`SELECT pg_current_xact_id()::text`).raw, inside)
                )
              )
              yield* Outbox.transaction(Outbox.publish(items, { key: "a", n: 1 }))
              yield* Effect.sleep("300 millis")
              assert.strictEqual(recorder.published.length, 0, "held back while the older transaction is open")
              yield* endOther
              // the commit's nudge named its transaction: the relay retries until it has read past it (with the
              // poll at 1 hour, nothing else would wake it)
              yield* waitFor(() => recorder.published.length === 1, "the held-back row is relayed", 3_000)
              const stats = yield* OutboxRelay.OutboxRelay.use((relay) => relay.stats)
              assert.isAbove(stats.heldBackRetries, 0)
            }).pipe(Effect.provide(env))
          })
      )
    })
  })
}

const waitUntil = <E>(
  check: Effect.Effect<boolean, E>,
  what: string,
  limitMs = 5_000
): Effect.Effect<void, E | Error> =>
  Effect.gen(function* () {
    for (let waited = 0; waited < limitMs; waited += 20) {
      if (yield* check) return
      yield* Effect.sleep("20 millis")
    }
    return yield* Effect.fail(new Error(`timed out after ${limitMs} ms waiting until ${what}`))
  })

const waitFor = (cond: () => boolean, what: string, limitMs = 5_000): Effect.Effect<void, Error> =>
  waitUntil(Effect.sync(cond), what, limitMs)

/**
 * Forks `transaction(inside)` and returns once it has reached `inside`, which holds it open; the effect
 * returned ends it (releases `inside` and waits for the commit).
 */
const holdOpen = <E, R>(transaction: (inside: Effect.Effect<void>) => Effect.Effect<unknown, E, R>) =>
  Effect.gen(function* () {
    const entered = yield* Deferred.make<void>()
    const release = yield* Deferred.make<void>()
    const fiber = yield* Effect.forkScoped(
      transaction(Effect.andThen(Deferred.succeed(entered, undefined), Deferred.await(release)))
    )
    // a transaction that fails before reaching `inside` fails the case instead of hanging it
    yield* Effect.raceFirst(
      Deferred.await(entered),
      Effect.andThen(Fiber.join(fiber), Effect.fail(new Error("the held transaction ended before it was entered")))
    )
    return Effect.andThen(Deferred.succeed(release, undefined), Fiber.join(fiber))
  })

/**
 * A fresh store (2 partitions), a recording broker, and the layer of `Outbox` plus a background
 * `OutboxRelay` (with `options`) over them.
 */
const backgroundRelay = (options: OutboxRelay.Options) =>
  Effect.map(freshStore({ partitions: 2 }), (store) => {
    const { recorder, layer: brokerLayer } = recordingBroker()
    const env = Layer.mergeAll(Outbox.layer(), OutboxRelay.layer(options)).pipe(
      Layer.provideMerge(Layer.succeed(SqlStore.SqlStore, store)),
      Layer.provide(brokerLayer)
    )
    return { store, recorder, env }
  })
