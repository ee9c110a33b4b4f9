/**
 * `@converge/core/testing` — conformance suites every backend runs.
 *
 * @since 0.1.0
 */

/** The broker conformance suite (C01–C25). */
export * as BrokerTest from "./BrokerTest.ts"
/** The inbox store suite (I01–I08). */
export * as InboxStoreTest from "./InboxStoreTest.ts"
/** The outbox store suite (O01–O13). */
export * as OutboxStoreTest from "./OutboxStoreTest.ts"
