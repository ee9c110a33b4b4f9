/**
 * `@converge/store-postgres` — the Postgres side of Converge: the schema and
 * its migrations, the transactional outbox and its relay, and the inbox that
 * makes effects exactly-once. Runs over any `effect/sql` `SqlClient` speaking
 * Postgres (`PgClient.layer` from `@effect/sql-pg`).
 *
 * @since 0.1.0
 */

/** The audit trail in Postgres: in the transaction of a transactional step, batched otherwise. */
export * as AuditPg from "./AuditPg.ts"
/** Exactly-once effects: the idempotent inbox, in the handler's transaction. */
export * as Inbox from "./Inbox.ts"
/** The transactional outbox: publish in the caller's SQL transaction. */
export * as Outbox from "./Outbox.ts"
/** The relay that moves committed outbox rows to the broker. */
export * as OutboxRelay from "./OutboxRelay.ts"
/** Sagas on Postgres: Effect's SQL workflow engine, the saga store, commands through the outbox, replies through the inbox. */
export * as SagaPg from "./SagaPg.ts"
/** The Postgres schema of the outbox and inbox: tables, migrations, settings. */
export * as SqlStore from "./SqlStore.ts"
