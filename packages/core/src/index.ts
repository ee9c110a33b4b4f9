/**
 * `@converge/core` — the pattern: topics, envelopes, the `Broker` contract,
 * publishing, the consumer runtime, retry and dead letters. Depends on
 * `effect` alone; stores and brokers are packages of their own.
 *
 * Each concept is one module, imported whole:
 * `import { Topic, Publisher } from "@converge/core"`.
 *
 * @since 0.1.0
 */

/** One audit trail of every message's lifecycle steps: the sink the runtime writes to, and queries. */
export * as Audit from "./Audit.ts"
/** The pluggable broker contract and its semantics. */
export * as Broker from "./Broker.ts"
/** The one error of every broker operation, with a `reason` that says `isRetryable`. */
export * as BrokerError from "./BrokerError.ts"
/** Typed confirmations back to the publisher: processed, or dead-lettered with the reason. */
export * as Confirmation from "./Confirmation.ts"
/** The consumer runtime: typed handlers, order, batches, shutdown. */
export * as Consumer from "./Consumer.ts"
/** The dead-letter queue: list, show, replay, purge. */
export * as DeadLetter from "./DeadLetter.ts"
/** The message model, its wire forms and the CloudEvents mapping. */
export * as Envelope from "./Envelope.ts"
/** The runtime's metrics on `effect/Metric`: counters, histograms, gauges. */
export * as Metrics from "./Metrics.ts"
/** Name validation for topics, groups, consumers and headers. */
export * as Name from "./Name.ts"
/** The one partition function every store and broker uses. */
export * as Partition from "./Partition.ts"
/** Typed, direct publishing. */
export * as Publisher from "./Publisher.ts"
/** Error classification, retry schedules and the decision after a failed attempt. */
export * as Retry from "./Retry.ts"
/** Sagas: Effect workflows whose steps are compensated, newest first, when a later one fails. */
export * as Saga from "./Saga.ts"
/** What a saga coordinator records for people: statuses, steps, results, errors, timings. */
export * as SagaStore from "./SagaStore.ts"
/** Topics: a name and a payload Schema. */
export * as Topic from "./Topic.ts"
