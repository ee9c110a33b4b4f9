/**
 * The audit trail in Postgres: the lifecycle scenario (`AuditTest`), and the transactional rows — an
 * outbox publish's `published` and an inbox-handled message's `handled` are written in the step's own
 * transaction (same transaction id), and roll back with it.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Audit, Consumer, Envelope, Publisher, Topic } from "@converge/core"
import { AuditTest } from "@converge/core/testing"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Data, Effect, Exit, Layer, Redacted, Result, Schema } from "effect"
import { SqlClient } from "effect/sql"
import { AuditPg, Inbox, Outbox, OutboxRelay, SqlStore } from "../src/index.ts"
import { freshSchemaLayer } from "./helpers/schema.ts"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const schema = `converge_audit_test_${process.pid}`
class Refused extends Data.TaggedError("Refused")<{}> {}

const Live = Layer.mergeAll(
  Publisher.layer(),
  Outbox.layer(),
  Inbox.layer(),
  OutboxRelay.layer({ pollInterval: "100 millis", retention: "1 hour" })
).pipe(
  Layer.provideMerge(AuditPg.layer({ flushInterval: "50 millis", deliveries: true })),
  Layer.provideMerge(SqlStore.layer({ schema, partitions: 2 })),
  Layer.provideMerge(MemoryBroker.layer()),
  Layer.provideMerge(freshSchemaLayer(schema)),
  Layer.provideMerge(PgClient.layer({ url: Redacted.make(url), maxConnections: 6 }))
)

/** A second client of the same database: to the inbox, a store on it is another database's. */
const otherClient = PgClient.layer({ url: Redacted.make(url), maxConnections: 2 })

const payments = Topic.make("audit-pg.payments", Schema.Struct({ id: Schema.String }))
const charges = Topic.make("audit-pg.charges", Schema.Struct({ id: Schema.String }))

const xminOf = (table: string, where: string, params: ReadonlyArray<unknown>) =>
  SqlClient.SqlClient.use((sql) =>
    Effect.map(
      sql.unsafe<{ readonly x: string }>(`SELECT xmin::text AS x FROM ${schema}.${table} WHERE ${where}`, params),
      (rows) => rows.map((r) => r.x)
    )
  ).pipe(Effect.orDie)

describe("AuditPg", () => {
  layer(Live, { timeout: 60_000, excludeTestServices: true })((it) => {
    it.effect("one message's publish → retry → dead-letter → replay → handled, in order, from the audit table", () =>
      Effect.scoped(AuditTest.lifecycle)
    )

    it.effect("an outbox publish's audit row commits with the message (same transaction) and rolls back with it", () =>
      Effect.gen(function* () {
        const kept = yield* Outbox.transaction(Outbox.publish(payments, { id: "p-1" }))
        const rolledBack = yield* Effect.exit(
          Outbox.transaction(Effect.andThen(Outbox.publish(payments, { id: "p-2" }), Effect.fail(new Refused())))
        )
        assert.isTrue(Exit.isFailure(rolledBack))
        const published = yield* Audit.query({ topic: payments.name, kinds: ["published"] })
        assert.deepStrictEqual(
          published.map((e) => [e.messageId, e.detail]),
          [[kept.id, "outbox"]],
          "only the committed message's event"
        )
        const auditTx = yield* xminOf("audit", "kind = 'published' AND message_ids @> ARRAY[$1::text]", [kept.id])
        // the relay has since marked the row (a new row version): compare with the id of the inserting transaction
        const outboxTx = yield* SqlClient.SqlClient.use((sql) =>
          sql.unsafe<{ readonly x: string }>(
            `SELECT (tx::text::bigint % 4294967296)::text AS x FROM ${schema}.outbox WHERE message_id = $1`,
            [kept.id]
          )
        ).pipe(
          Effect.map((rows) => rows.map((r) => r.x)),
          Effect.orDie
        )
        assert.deepStrictEqual(auditTx, outboxTx, "written by the same transaction")
        // the relay writes `relayed` in the statement that marks the row (AuditPg, every topic audited)
        let relayed: ReadonlyArray<Audit.Stored> = []
        for (let i = 0; i < 100 && relayed.length === 0; i++) {
          yield* Effect.sleep(20)
          relayed = yield* Audit.query({ messageId: kept.id, kinds: ["relayed"] })
        }
        assert.strictEqual(relayed.length, 1)
        assert.strictEqual(relayed[0]!.topic, payments.name)
        assert.strictEqual(relayed[0]!.process, Audit.processName)
        const relayTx = yield* xminOf("audit", "kind = 'relayed' AND message_ids @> ARRAY[$1::text]", [kept.id])
        const markedTx = yield* xminOf("outbox", "message_id = $1", [kept.id])
        assert.deepStrictEqual(relayTx, markedTx, "written by the relay's cycle, with the mark")
      })
    )

    it.effect("an inbox-handled message's `handled` row is written in the handler's transaction, once", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        yield* sql.unsafe(`CREATE TABLE ${schema}.charges (id text PRIMARY KEY)`).raw
        let failures = 1
        yield* Consumer.make(charges, {
          group: "charges",
          errors: { Refused: "retry" },
          handle: Inbox.handler((p: { readonly id: string }) =>
            Effect.andThen(sql.unsafe(`INSERT INTO ${schema}.charges VALUES ($1)`, [p.id]).raw, () =>
              // the first attempt fails after its write: the write, the claim and any event roll back
              failures-- > 0 ? Effect.fail(new Refused()) : Effect.void
            )
          )
        })
        const { id } = yield* Publisher.publish(charges, { id: "c-1" })
        let events: ReadonlyArray<Audit.Stored> = []
        for (let i = 0; i < 200 && !events.some((e) => e.kind === "handled"); i++) {
          yield* Effect.sleep(20)
          events = yield* Audit.query({ messageId: id })
        }
        assert.deepStrictEqual(
          events.map((e) => `${e.kind}:${e.attempt ?? ""}`),
          ["published:", "delivered:1", "retried:1", "handled:2"]
        )
        const auditTx = yield* xminOf("audit", "kind = 'handled' AND message_ids @> ARRAY[$1::text]", [id])
        const inboxTx = yield* xminOf("inbox", "message_id = $1", [id])
        assert.strictEqual(auditTx.length, 1)
        assert.deepStrictEqual(auditTx, inboxTx, "the handled event commits with the inbox claim")
      })
    )

    it.effect("a message handled by two groups, one through the inbox, has a `handled` event for each", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        yield* sql.unsafe(`CREATE TABLE ${schema}.refunds (id text PRIMARY KEY)`).raw
        const refunds = Topic.make("audit-pg.refunds", Schema.Struct({ id: Schema.String }))
        // the memory broker hands both groups the same envelope object: the inbox's mark must not leak
        // to the other group, whose consumer writes its own event
        yield* Consumer.make(refunds, {
          group: "ledger",
          handle: Inbox.handler(
            (p: { readonly id: string }) => sql.unsafe(`INSERT INTO ${schema}.refunds VALUES ($1)`, [p.id]).raw
          )
        })
        const { id } = yield* Publisher.publish(refunds, { id: "r-1" })
        let events: ReadonlyArray<Audit.Stored> = []
        for (let i = 0; i < 200 && !events.some((e) => e.kind === "handled"); i++) {
          yield* Effect.sleep(20)
          events = yield* Audit.query({ messageId: id, kinds: ["handled"] })
        }
        yield* Consumer.make(refunds, { group: "mailer", handle: () => Effect.void })
        for (let i = 0; i < 200 && events.length < 2; i++) {
          yield* Effect.sleep(20)
          events = yield* Audit.query({ messageId: id, kinds: ["handled"] })
        }
        assert.deepStrictEqual(events.map((e) => `${e.group}:${e.attempt}`).sort(), ["ledger:1", "mailer:1"])
      })
    )

    it.effect("the inbox's claim statement writes the `handled` row: per-message ids, attempts, repeats once", () =>
      Effect.gen(function* () {
        const inbox = yield* Inbox.Inbox
        const topic = Topic.make("audit-pg.claims", Schema.Struct({ id: Schema.String }))
        const encoded = (id: string, options?: Envelope.MakeOptions) => {
          const r = Envelope.makeEncodedResult(topic, { id }, 1_700_000_000_000, options)
          if (Result.isFailure(r)) throw r.failure
          return r.success
        }
        // a consumer's contexts: the envelope, the attempt, and the slot the inbox marks
        const item = (e: Envelope.Encoded, attempt: number) => ({
          context: { id: e.id, topic: e.topic, encoded: e, attempt, [Audit.handledKey]: false }
        })
        const plain = [encoded("a-1"), encoded("a-2")]
        const first = plain.map((e) => item(e, 1))
        yield* inbox.onceAll("claims", first, () => Effect.void)
        assert.isTrue(
          first.every((i) => Audit.isMarkedHandled(i.context)),
          "marked: the consumer writes no second event"
        )
        const traced = encoded("b-1", { correlationId: "corr-1", causationId: "cause-1" })
        const retried = encoded("b-2")
        const second = [item(traced, 1), item(retried, 3), item(traced, 1), item(plain[0]!, 2)]
        let seen: ReadonlyArray<string> = []
        yield* inbox.onceAll("claims", second, (fresh) =>
          Effect.sync(() => {
            seen = fresh.map((i) => i.context.id)
          })
        )
        assert.deepStrictEqual(seen, [traced.id, retried.id], "a repeat within the read and a processed id skipped")
        // a failed effect: neither the claim nor its `handled` row stays
        const failed = encoded("c-1")
        const exit = yield* Effect.exit(inbox.onceAll("claims", [item(failed, 1)], () => Effect.fail(new Refused())))
        assert.isTrue(Exit.isFailure(exit))
        const events = yield* Audit.query({ topic: topic.name, kinds: ["handled"] })
        assert.deepStrictEqual(
          events.map((e) => [e.messageId, e.group, e.attempt, e.correlationId, e.causationId]),
          [
            [plain[0]!.id, "claims", 1, undefined, undefined],
            [plain[1]!.id, "claims", 1, undefined, undefined],
            [traced.id, "claims", 1, "corr-1", "cause-1"],
            [retried.id, "claims", 3, undefined, undefined]
          ]
        )
        const rows = yield* xminOf("audit", "kind = 'handled' AND message_ids @> ARRAY[$1::text]", [traced.id])
        assert.deepStrictEqual(rows, yield* xminOf("inbox", "message_id = $1", [traced.id]), "one transaction")
      })
    )

    it.effect("a topic the audit leaves out, or an audit in another database, gets no row from the claim", () =>
      Effect.gen(function* () {
        const inbox = yield* Inbox.Inbox
        const topic = Topic.make("audit-pg.quiet", Schema.Struct({ id: Schema.String }))
        const r = Envelope.makeEncodedResult(topic, { id: "q" }, 1_700_000_000_000)
        if (Result.isFailure(r)) throw r.failure
        const e = r.success
        const item = { context: { id: e.id, topic: e.topic, encoded: e, attempt: 1, [Audit.handledKey]: false } }
        const { sink } = yield* AuditPg.make({ topics: { [topic.name]: false } })
        yield* inbox.onceAll("quiet", [item], () => Effect.void).pipe(Effect.provideService(Audit.AuditSink, sink))
        assert.deepStrictEqual(yield* Audit.query({ messageId: e.id }), [], "off for this topic")
        // a sink whose store is on another client (to the inbox, another database): the claim cannot write its
        // table, so the event goes the sink's own way — a transaction of that client, not the claim's
        const f = Envelope.makeEncodedResult(topic, { id: "q-2" }, 1_700_000_000_000)
        if (Result.isFailure(f)) throw f.failure
        const item2 = { context: { id: f.success.id, topic: topic.name, encoded: f.success, attempt: 1 } }
        yield* Effect.gen(function* () {
          const elsewhere = yield* AuditPg.make()
          yield* inbox
            .onceAll("elsewhere", [item2], () => Effect.void)
            .pipe(Effect.provideService(Audit.AuditSink, elsewhere.sink))
        }).pipe(Effect.provide(SqlStore.layer({ schema, partitions: 2 }).pipe(Layer.provideMerge(otherClient))))
        const events = yield* Audit.query({ messageId: f.success.id })
        assert.deepStrictEqual(
          events.map((w) => [w.kind, w.group]),
          [["handled", "elsewhere"]]
        )
        const auditTx = yield* xminOf("audit", "message_ids @> ARRAY[$1::text]", [f.success.id])
        assert.notDeepEqual(auditTx, yield* xminOf("inbox", "message_id = $1", [f.success.id]))
      })
    )
  })
})
