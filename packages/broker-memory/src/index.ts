/**
 * `@converge/broker-memory` — the in-memory `Broker` with fault knobs.
 *
 * @since 0.1.0
 */
export * as MemoryBroker from "./MemoryBroker.ts"
