/**
 * `@converge/broker-nats` — the NATS JetStream `Broker` layer.
 *
 * @since 0.1.0
 */
export * as NatsBroker from "./NatsBroker.ts"
export * as NatsClient from "./NatsClient.ts"
