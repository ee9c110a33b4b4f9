/**
 * `@converge/store-postgres/testing` — the outbox and inbox store suites, run
 * against any `SqlClient` layer speaking Postgres (needs `@effect/vitest`).
 *
 * @since 0.1.0
 */

/** The inbox store suite (I01–I10). */
export * as InboxStoreTest from "./InboxStoreTest.ts"
/** The outbox store suite (O01–O13). */
export * as OutboxStoreTest from "./OutboxStoreTest.ts"
/** The outbox → relay → broker → inbox path (P01–P02) over any broker layer. */
export * as PipelineTest from "./PipelineTest.ts"
/** The saga suite (S01–S07) over any broker layer. */
export * as SagaTest from "./SagaTest.ts"
