/**
 * `@converge/broker-redis-streams` — the Redis Streams `Broker` layer.
 *
 * @since 0.1.0
 */

export * as RedisCluster from "./RedisCluster.ts"
export * as RedisStreamsBroker from "./RedisStreamsBroker.ts"
