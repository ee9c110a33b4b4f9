/**
 * `@converge/broker-redis-streams` — the Redis Streams `Broker` layer.
 *
 * Not implemented yet: this package holds the place of the production broker
 * layer, which comes with its own issue (`RedisStreamsBroker.layer`, over the
 * abstract `effect/persistence/Redis` service). Until then, use
 * `@converge/broker-memory`.
 *
 * @since 0.1.0
 */
export {}
