/**
 * `@converge/core` — topics, envelopes, the `Broker` contract, publishing.
 *
 * Each concept is one module, imported whole:
 * `import { Topic, Publisher } from "@converge/core"`.
 *
 * @since 0.1.0
 */

/** The pluggable broker contract and its semantics. */
export * as Broker from "./Broker.ts"
/** The one error of every broker operation, with a `reason` that says `isRetryable`. */
export * as BrokerError from "./BrokerError.ts"
/** The consumer runtime: typed handlers, classification, retries, order, shutdown. */
export * as Consumer from "./Consumer.ts"
/** The dead-letter queue: list, show, replay, purge. */
export * as DeadLetter from "./DeadLetter.ts"
/** The message model, its wire forms and the CloudEvents mapping. */
export * as Envelope from "./Envelope.ts"
/** Exactly-once effects: the idempotent inbox, in the handler's transaction. */
export * as Inbox from "./Inbox.ts"
/** Name validation for topics, groups, consumers and headers. */
export * as Name from "./Name.ts"
/** The transactional outbox: publish in the caller's SQL transaction. */
export * as Outbox from "./Outbox.ts"
/** The relay that moves committed outbox rows to the broker. */
export * as OutboxRelay from "./OutboxRelay.ts"
/** Typed, direct publishing. */
export * as Publisher from "./Publisher.ts"
/** The Postgres schema of the outbox and inbox: tables, migrations, settings. */
export * as SqlStore from "./SqlStore.ts"
/** Topics: a name and a payload Schema. */
export * as Topic from "./Topic.ts"
