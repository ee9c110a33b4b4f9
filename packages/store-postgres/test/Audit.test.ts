/**
 * The audit trail in Postgres: the lifecycle scenario (`AuditTest`), and the transactional rows — an
 * outbox publish's `published` and an inbox-handled message's `handled` are written in the step's own
 * transaction (same transaction id), and roll back with it.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Audit, Consumer, Publisher, Topic } from "@converge/core"
import { AuditTest } from "@converge/core/testing"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Data, Effect, Exit, Layer, Redacted, Schema } from "effect"
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
  })
})
