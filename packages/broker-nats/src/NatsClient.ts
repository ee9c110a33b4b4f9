/**
 * `NatsClient` — one NATS connection with its JetStream client and manager,
 * as a service: what `NatsBroker` requires, the way `RedisStreamsBroker`
 * requires `Redis`. The connection reconnects by itself (the client's own
 * reconnect loop, with a capped exponential delay and jitter between
 * attempts, and no limit on their number), and is drained when the layer's
 * scope closes.
 *
 * @since 0.1.0
 */
import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream"
import { connect, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node"
import { Config, Context, Effect, Layer, type Scope } from "effect"

/**
 * The connection and its JetStream client and manager.
 *
 * @since 0.1.0
 */
export class NatsClient extends Context.Service<
  NatsClient,
  {
    readonly connection: NatsConnection
    readonly jetstream: JetStreamClient
    readonly manager: JetStreamManager
  }
>()("@converge/broker-nats/NatsClient") {}

/**
 * Connecting failed (no server answered, or the server has no JetStream).
 *
 * @since 0.1.0
 */
export class NatsConnectError extends Error {
  readonly _tag = "NatsConnectError"
}

/**
 * Connection options: the client's own (`servers`, `name`, `user`/`pass`, `token`, `tls`, ...). Defaults:
 * `servers` `127.0.0.1:4222`, reconnect forever, the delay between attempts doubling from 100 ms to 2 s with
 * up to 20% jitter (reset once connected), `pingInterval` 10 s.
 *
 * @since 0.1.0
 */
export type Options = NodeConnectionOptions

/** The delay before reconnect attempt `n` (0-based): 100 ms doubling, at most 2 s, plus up to 20% jitter. */
const reconnectDelay = (n: number): number => {
  const base = Math.min(100 * 2 ** Math.min(n, 5), 2_000)
  return base + Math.floor(Math.random() * base * 0.2)
}

/**
 * Connects (failing with {@link NatsConnectError} when no server answers or JetStream is off) and drains the
 * connection when the scope closes.
 *
 * @since 0.1.0
 */
export const make = (options?: Options): Effect.Effect<NatsClient["Service"], NatsConnectError, Scope.Scope> =>
  Effect.gen(function* () {
    let attempts = 0
    const connection = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () =>
          connect({
            servers: "127.0.0.1:4222",
            maxReconnectAttempts: -1,
            pingInterval: 10_000,
            reconnectDelayHandler: () => reconnectDelay(attempts++),
            ...options
          }),
        catch: (cause) =>
          new NatsConnectError(
            `cannot connect to NATS at ${String(options?.servers ?? "127.0.0.1:4222")}: ${String(cause)}`,
            {
              cause
            }
          )
      }),
      (nc) => Effect.promise(() => nc.drain().catch(() => nc.close()))
    )
    // reset the backoff once connected again, and log what the connection goes through
    const runFork = Effect.runForkWith(yield* Effect.context<never>())
    void (async () => {
      for await (const status of connection.status()) {
        if (status.type === "reconnect") {
          attempts = 0
          runFork(Effect.logInfo("nats: reconnected"))
        } else if (status.type === "disconnect") {
          runFork(Effect.logWarning("nats: disconnected; reconnecting"))
        }
      }
    })().catch(() => {})
    const manager = yield* Effect.tryPromise({
      try: () => jetstreamManager(connection),
      catch: (cause) =>
        new NatsConnectError(`the NATS server has no JetStream (start it with -js): ${String(cause)}`, { cause })
    })
    return { connection, jetstream: jetstream(connection), manager }
  })

/**
 * The client as a layer.
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<NatsClient, NatsConnectError> =>
  Layer.effect(NatsClient, make(options))

/**
 * The client with its servers from `NATS_URL` (comma-separated, default `127.0.0.1:4222`).
 *
 * @since 0.1.0
 */
export const layerConfig: Layer.Layer<NatsClient, NatsConnectError | Config.ConfigError> = Layer.unwrap(
  Effect.map(Config.String("NATS_URL").pipe(Config.withDefault("127.0.0.1:4222")), (url) =>
    layer({ servers: url.split(",").map((s) => s.trim()) })
  )
)
