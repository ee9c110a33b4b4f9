/**
 * `@converge/core/testing` — the broker conformance suite every broker layer
 * runs (needs `@effect/vitest`).
 *
 * @since 0.1.0
 */

/** The audit lifecycle scenario shared by the audit stores' tests. */
export * as AuditTest from "./AuditTest.ts"
/** The broker conformance suite (C01–C27). */
export * as BrokerTest from "./BrokerTest.ts"
/** The group gauges scenario shared by the brokers' tests. */
export * as GaugeTest from "./GaugeTest.ts"
