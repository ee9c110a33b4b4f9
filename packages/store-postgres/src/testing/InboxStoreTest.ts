/**
 * `InboxStoreTest` — the inbox store suite (docs/outbox-inbox.md): the first claim
 * commits the effect and the claim together; a duplicate claim in a second
 * transaction is refused and its effects roll back; a rolled-back claim
 * leaves no trace; concurrent claims run the effect once; consumers are
 * independent; messages published by the handler share its transaction;
 * cleanup respects retention.
 *
 * ```ts
 * InboxStoreTest.suite("postgres", PgClient.layer({ url }), { concurrentTransactions: true, listen: true })
 * ```
 *
 * @since 0.1.0
 */
import { assert, describe } from "@effect/vitest"
import { Deferred, Effect, Fiber, type Layer, Option } from "effect"
import type { SqlClient } from "effect/sql"
import * as Inbox from "../Inbox.ts"
import * as Outbox from "../Outbox.ts"
import * as SqlStore from "../SqlStore.ts"
import { count, type Features, freshStore, items, storeSuite } from "./StoreHarness.ts"

/** What a SQL backend supports (shared with the other store suite). */
export type { Features } from "./StoreHarness.ts"

/** The inbox key of a message of the suites' topic for a group. */
const key = (group: string, id: string, topic = "orders"): Inbox.MessageKey => ({ group, topic, id })

/**
 * Registers the inbox store suite (cases I01–I10).
 *
 * @since 0.1.0
 */
export const suite = <E>(name: string, sqlLayer: Layer.Layer<SqlClient.SqlClient, E>, features: Features): void => {
  storeSuite(`InboxStoreTest ${name}`, sqlLayer, features, (test) => {
    const setup = (options?: Inbox.Options) =>
      Effect.gen(function* () {
        const store = yield* freshStore({ partitions: 1 })
        const inbox = yield* Inbox.make(options).pipe(Effect.provideService(SqlStore.SqlStore, store))
        const effects = store.table("effects")
        /** The handler's business write. */
        const write = (consumer: string, id: string, note = "") =>
          store.sql.unsafe(`INSERT INTO ${effects} (consumer, message_id, note) VALUES ($1, $2, $3)`, [
            consumer,
            id,
            note
          ]).raw
        const effectRows = (id: string) =>
          count(`SELECT count(*)::int AS n FROM ${effects} WHERE message_id = $1`, [id])
        const inboxRows = (id: string) =>
          count(`SELECT count(*)::int AS n FROM ${store.table("inbox")} WHERE message_id = $1`, [id])
        const provide = <A, E2, R>(effect: Effect.Effect<A, E2, R>) =>
          Effect.provideService(effect, SqlStore.SqlStore, store)
        return { store, inbox, write, effectRows, inboxRows, provide }
      })

    describe("inbox", () => {
      test("I01", "the first claim commits the handler's writes and the inbox row together", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows, inboxRows } = yield* setup()
          const result = yield* inbox.once(key("billing", "m-1"), Effect.as(write("billing", "m-1"), "done"))
          assert.deepStrictEqual(result, Option.some("done"))
          assert.strictEqual(yield* effectRows("m-1"), 1)
          assert.strictEqual(yield* inboxRows("m-1"), 1)
          assert.isTrue(yield* inbox.isProcessed(key("billing", "m-1")))
          const again = yield* inbox.once(key("billing", "m-1"), Effect.as(write("billing", "m-1"), "done"))
          assert.deepStrictEqual(again, Option.none(), "a duplicate is skipped")
          assert.strictEqual(yield* effectRows("m-1"), 1, "the effect stays single")
        })
      )

      test("I02", "a duplicate claim in a second transaction is refused and its effects roll back", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows, provide } = yield* setup()
          yield* inbox.once(key("billing", "m-2"), write("billing", "m-2", "first"))
          const refused = yield* provide(
            Outbox.transaction(
              Effect.gen(function* () {
                yield* write("billing", "m-2", "second") // the handler wrote before claiming
                yield* inbox.claim(key("billing", "m-2"))
              })
            )
          ).pipe(Effect.flip)
          assert.strictEqual(refused._tag, "AlreadyProcessed")
          assert.match(refused.message, /m-2 was already processed by billing/)
          assert.strictEqual(yield* effectRows("m-2"), 1, "the second transaction's write rolled back")
        })
      )

      test("I03", "a rolled-back claim leaves no trace: the retry runs the handler again", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows, inboxRows } = yield* setup()
          const failed = yield* inbox
            .once(key("billing", "m-3"), Effect.andThen(write("billing", "m-3"), Effect.fail("transient" as const)))
            .pipe(Effect.flip)
          assert.strictEqual(failed, "transient")
          assert.strictEqual(yield* effectRows("m-3"), 0)
          assert.strictEqual(yield* inboxRows("m-3"), 0)
          const retried = yield* inbox.once(key("billing", "m-3"), Effect.as(write("billing", "m-3"), 1))
          assert.deepStrictEqual(retried, Option.some(1))
          assert.strictEqual(yield* effectRows("m-3"), 1)
        })
      )

      test("I04", "two deliveries racing: the effect runs once, the second waits and skips", { concurrent: true }, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows } = yield* setup()
          const claimed = yield* Deferred.make<void>()
          const release = yield* Deferred.make<void>()
          const first = yield* Effect.forkScoped(
            inbox.once(
              key("billing", "m-4"),
              Effect.gen(function* () {
                yield* write("billing", "m-4", "first")
                yield* Deferred.succeed(claimed, undefined)
                yield* Deferred.await(release)
                return "first"
              })
            )
          )
          yield* Deferred.await(claimed)
          const second = yield* Effect.forkScoped(
            inbox.once(key("billing", "m-4"), Effect.as(write("billing", "m-4", "second"), "second"))
          )
          yield* Effect.sleep("200 millis")
          assert.isUndefined(second.pollUnsafe(), "the second claim waits for the first transaction")
          yield* Deferred.succeed(release, undefined)
          assert.deepStrictEqual(yield* Fiber.join(first), Option.some("first"))
          assert.deepStrictEqual(yield* Fiber.join(second), Option.none())
          assert.strictEqual(yield* effectRows("m-4"), 1)
        })
      )

      test("I05", "consumers (groups) are independent: each processes the message once", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows } = yield* setup()
          yield* inbox.once(key("billing", "m-5"), write("billing", "m-5"))
          yield* inbox.once(key("shipping", "m-5"), write("shipping", "m-5"))
          yield* inbox.once(key("shipping", "m-5"), write("shipping", "m-5"))
          assert.strictEqual(yield* effectRows("m-5"), 2)
        })
      )

      test("I06", "messages published by the handler commit or roll back with its transaction", {}, () =>
        Effect.gen(function* () {
          const { inbox, store, provide } = yield* setup()
          const outbox = yield* provide(Outbox.make())
          const outboxRows = count(`SELECT count(*)::int AS n FROM ${store.table("outbox")}`)
          yield* inbox
            .once(
              key("billing", "m-6"),
              Effect.andThen(outbox.publish(items, { key: "a", n: 1 }), Effect.fail("handler failed" as const))
            )
            .pipe(Effect.flip)
          assert.strictEqual(yield* outboxRows, 0)
          yield* inbox.once(key("billing", "m-6"), outbox.publish(items, { key: "a", n: 1 }))
          yield* inbox.once(key("billing", "m-6"), outbox.publish(items, { key: "a", n: 1 }))
          assert.strictEqual(yield* outboxRows, 1, "published once, with the first successful claim")
        })
      )

      test("I08", "a batch claim: one transaction, only unprocessed ids reach the handler, all or nothing", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, effectRows, inboxRows } = yield* setup()
          const item = (id: string) => ({ context: { id, topic: "orders" } })
          yield* inbox.once(key("billing", "b-1"), write("billing", "b-1"))
          const odd = 'b-"quoted",{braced}\\'
          const seen = yield* inbox.onceAll(
            "billing",
            [item("b-1"), item("b-2"), item("b-3"), item("b-2"), item(odd)],
            (fresh) =>
              Effect.as(
                Effect.forEach(fresh, (f) => write("billing", f.context.id)),
                fresh.map((f) => f.context.id)
              )
          )
          assert.deepStrictEqual(seen, ["b-2", "b-3", odd], "processed and repeated ids are skipped, order kept")
          assert.strictEqual(yield* effectRows("b-2"), 1)
          assert.strictEqual(yield* inboxRows(odd), 1, "ids with quotes, commas, braces and backslashes survive")
          const allNew = yield* inbox.onceAll("billing", [item("b-7"), item("b-6")], (fresh) =>
            Effect.succeed(fresh.map((f) => f.context.id))
          )
          assert.deepStrictEqual(allNew, ["b-7", "b-6"], "a batch of new ids reaches the handler whole, in order")
          const failed = yield* inbox
            .onceAll("billing", [item("b-4"), item("b-5")], (fresh) =>
              Effect.andThen(
                Effect.forEach(fresh, (f) => write("billing", f.context.id)),
                Effect.fail("one of them failed" as const)
              )
            )
            .pipe(Effect.flip)
          assert.strictEqual(failed, "one of them failed")
          assert.strictEqual((yield* effectRows("b-4")) + (yield* inboxRows("b-4")) + (yield* inboxRows("b-5")), 0)
        })
      )

      test(
        "I09",
        "one group, two topics, the same message id: each message is processed once, neither skipped",
        {},
        () =>
          Effect.gen(function* () {
            const { inbox, write, effectRows } = yield* setup()
            // ids are unique per producer, not across topics (explicit ids, foreign producers' sequence numbers)
            const first = yield* inbox.once(key("billing", "42", "orders"), Effect.as(write("billing", "42", "o"), 1))
            const second = yield* inbox.once(key("billing", "42", "refunds"), Effect.as(write("billing", "42", "r"), 2))
            assert.deepStrictEqual([first, second], [Option.some(1), Option.some(2)])
            assert.strictEqual(yield* effectRows("42"), 2)
            const again = yield* inbox.once(key("billing", "42", "refunds"), Effect.as(write("billing", "42", "r"), 3))
            assert.isTrue(Option.isNone(again), "a repeat on the same topic is still skipped")
          })
      )

      test("I10", "rows from before the topic joined the key still dedupe, until the retention removes them", {}, () =>
        Effect.gen(function* () {
          const { store, write, effectRows } = yield* setup()
          // as the migration leaves them: topic '' and the flag in settings
          yield* store.sql.unsafe(
            `INSERT INTO ${store.table("inbox")} (consumer, message_id, topic, processed_at) VALUES ('billing', 'legacy-1', '', now())`
          ).raw
          yield* store.sql.unsafe(
            `INSERT INTO ${store.table("settings")} (name, value) VALUES ('inbox_legacy_rows', 'yes')`
          ).raw
          const inbox = yield* Inbox.make({ retention: "300 millis" }).pipe(
            Effect.provideService(SqlStore.SqlStore, store)
          )
          const repeat = yield* inbox.once(key("billing", "legacy-1"), Effect.as(write("billing", "legacy-1"), 1))
          assert.isTrue(Option.isNone(repeat), "processed before the upgrade: skipped")
          assert.strictEqual(yield* effectRows("legacy-1"), 0)
          assert.isTrue(yield* inbox.isProcessed(key("billing", "legacy-1")))
          yield* Effect.sleep("400 millis")
          yield* inbox.cleanup
          const flag = yield* count(
            `SELECT count(*)::int AS n FROM ${store.table("settings")} WHERE name = 'inbox_legacy_rows'`
          )
          assert.strictEqual(flag, 0, "no legacy row left: the flag is cleared")
        })
      )

      test("I07", "cleanup deletes inbox rows older than the retention, and nothing else", {}, () =>
        Effect.gen(function* () {
          const { inbox, write, inboxRows } = yield* setup({ retention: "300 millis", cleanupInterval: 0 })
          yield* inbox.once(key("billing", "old"), write("billing", "old"))
          assert.strictEqual(yield* inbox.cleanup, 0, "younger than the retention")
          yield* Effect.sleep("400 millis")
          yield* inbox.once(key("billing", "new"), write("billing", "new"))
          assert.strictEqual(yield* inbox.cleanup, 1)
          assert.strictEqual(yield* inboxRows("old"), 0)
          assert.strictEqual(yield* inboxRows("new"), 1)
        })
      )
    })
  })
}
