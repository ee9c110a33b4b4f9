/**
 * `RedisCluster` — the `Redis` service of `effect/persistence/Redis` over
 * node-redis's cluster client (`createCluster`), so `RedisStreamsBroker` (and
 * anything else written against that service) runs on a Redis Cluster
 * unchanged.
 *
 * ## Routing
 *
 * Every command goes through the cluster client's `sendCommand` with its
 * routing key ({@link routingKey}): the first key of the command (the first
 * stream after `STREAMS` for `XREAD`/`XREADGROUP`, the first of `KEYS` for
 * `EVAL`/`EVALSHA`/`FCALL`, the key after the subcommand for `XGROUP`,
 * `XINFO`, `OBJECT` and `MEMORY`). The client follows `MOVED`/`ASK`
 * redirects and refreshes its slot map, and applies the server's command
 * policies: `SCRIPT LOAD` goes to every node (so `Redis.eval` works on any
 * slot), a multi-key `DEL`/`UNLINK`/`EXISTS` is split by slot and summed,
 * `SCAN` walks every master behind one virtual cursor (the usual
 * `cursor !== "0"` loop works), `WAITAOF` asks every master and answers the
 * minimum. Keyless commands (`INFO`, `CONFIG`, ...) go where those policies
 * say, or to a random node.
 *
 * ## Reserved connections
 *
 * `Redis.reserve` gives a connection that no other caller shares, for blocking
 * reads. On a cluster that is a set of dedicated sockets, opened on demand to
 * the master that owns each command's key: a command never waits behind
 * another one's `BLOCK`, so concurrent blocking reads of keys on one node each
 * get a socket of their own. Dedicated sockets do not follow redirects nor
 * reconnect: a `MOVED` (a slot migrated) or a dropped socket fails the command
 * and the connection leaves the pool, and the caller reserves a fresh one (the
 * broker's read loop does that with backoff). Keyless commands on a reserved
 * connection go through the shared client.
 *
 * @since 0.1.0
 */
import { Context, Effect, Layer } from "effect"
import * as Redis from "effect/persistence/Redis"
import { createCluster } from "redis"

type ClusterClient = ReturnType<typeof createCluster>
type ClusterOptions = NonNullable<Parameters<typeof createCluster>[0]>
type NodeClient = Awaited<ReturnType<ClusterClient["getNodeClientForKey"]>>

/**
 * Options of {@link layer}: node-redis's cluster options (`rootNodes`, `defaults`, `useReplicas`, ...) and the
 * pool options of the reserved connections (`maxConnections`, default 10, ...).
 *
 * @since 0.1.0
 */
export type Options = ClusterOptions & Redis.PoolOptions

/**
 * The node-redis cluster client behind the layer, for what the `Redis` service does not cover (the masters,
 * the slot map, a node's own client).
 *
 * @since 0.1.0
 */
export class RedisCluster extends Context.Service<RedisCluster, { readonly client: ClusterClient }>()(
  "@converge/broker-redis-streams/RedisCluster"
) {}

/** Commands without a key: routed by the cluster client's policies or to a random node. */
const keyless = new Set([
  "INFO",
  "CONFIG",
  "SCAN",
  "SCRIPT",
  "FUNCTION",
  "WAIT",
  "WAITAOF",
  "PING",
  "ECHO",
  "TIME",
  "DBSIZE",
  "FLUSHALL",
  "FLUSHDB",
  "CLUSTER",
  "CLIENT",
  "COMMAND",
  "LASTSAVE",
  "ROLE",
  "RANDOMKEY",
  "PUBLISH",
  "SPUBLISH",
  "PUBSUB",
  "SLOWLOG",
  "LATENCY",
  "ACL",
  "HELLO",
  "READONLY",
  "READWRITE"
])

/** Commands whose key follows a subcommand (`XGROUP CREATE <key> ...`). */
const keyAfterSubcommand = new Set(["XGROUP", "XINFO", "OBJECT", "MEMORY"])

/** Commands whose keys follow a key count (`EVALSHA <sha> <numkeys> <key> ...`). */
const keysAfterCount = new Set(["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"])

/**
 * The key a command is routed by on a cluster: the first key it names, or `undefined` for a keyless command
 * (and for a script or function called without keys). `XREAD`/`XREADGROUP` route by their first stream; all
 * keys of one command must hash to one slot, as Redis Cluster requires (except the commands the cluster client
 * splits by slot, such as a multi-key `DEL`).
 *
 * @since 0.1.0
 */
export const routingKey = (command: string, args: ReadonlyArray<string>): string | undefined => {
  const name = command.toUpperCase()
  if (keyless.has(name)) return undefined
  if (keysAfterCount.has(name)) return Number(args[1]) > 0 ? args[2] : undefined
  if (keyAfterSubcommand.has(name)) {
    // `XINFO HELP`, `MEMORY STATS`, ...: no key
    return args.length >= 2 ? args[1] : undefined
  }
  if (name === "XREAD" || name === "XREADGROUP") {
    const at = args.findIndex((a) => a.toUpperCase() === "STREAMS")
    return at >= 0 ? args[at + 1] : undefined
  }
  return args[0]
}

/** The `host:port` of a node client. */
const addressOf = (client: NodeClient): string => {
  const socket = client.options?.socket as { readonly host?: string; readonly port?: number } | undefined
  return `${socket?.host ?? "?"}:${socket?.port ?? "?"}`
}

const make = Effect.fnUntraced(function* ({
  acquireTimeout,
  idleTimeout,
  maxConnections,
  minConnections,
  ...options
}: Options) {
  const client = yield* Effect.acquireRelease(
    Effect.sync(() => createCluster(options)),
    (client) => Effect.ignoreCause(Effect.promise(() => client.close()))
  )
  // node-redis rethrows `error` events that have no listener, which would crash the process on a transient
  // socket failure; command failures are still reported as `RedisError`
  const runSync = Effect.runSyncWith(yield* Effect.context<never>())
  client.on("error", (cause) => {
    runSync(Effect.logWarning("RedisCluster client error", cause))
  })
  yield* Effect.tryPromise({
    try: () => client.connect(),
    catch: (cause) => new Redis.RedisError({ cause })
  })

  const send = <A = unknown>(command: string, ...args: ReadonlyArray<string>): Effect.Effect<A, Redis.RedisError> =>
    Effect.tryPromise({
      try: () => client.sendCommand(routingKey(command, args), undefined, [command, ...args]) as Promise<A>,
      catch: (cause) => new Redis.RedisError({ cause })
    })

  /** A reserved connection: dedicated sockets per master, opened on demand, one per command in flight. */
  const connect = Effect.sync(() => {
    const idle = new Map<string, Array<NodeClient>>()
    const opened = new Set<NodeClient>()
    let closed = false
    const take = async (key: string): Promise<readonly [string, NodeClient]> => {
      const shared = await client.getNodeClientForKey(key)
      const address = addressOf(shared)
      const free = idle.get(address)?.pop()
      if (free?.isOpen) return [address, free]
      const socket = shared.options?.socket
      const dedicated = shared.duplicate({ socket: { ...socket, reconnectStrategy: false } } as never) as NodeClient
      dedicated.on("error", (cause: unknown) => {
        runSync(Effect.logWarning("RedisCluster reserved connection error", cause))
      })
      opened.add(dedicated)
      await dedicated.connect()
      if (closed) {
        dedicated.destroy()
        throw new Error("the reserved connection was closed")
      }
      return [address, dedicated]
    }
    const sendReserved = <A = unknown>(
      command: string,
      ...args: ReadonlyArray<string>
    ): Effect.Effect<A, Redis.RedisError> => {
      const key = routingKey(command, args)
      if (key === undefined) return send<A>(command, ...args)
      return Effect.tryPromise({
        try: async () => {
          const [address, socket] = await take(key)
          try {
            return (await socket.sendCommand([command, ...args])) as A
          } finally {
            if (!closed && socket.isOpen) {
              const list = idle.get(address) ?? []
              list.push(socket)
              idle.set(address, list)
            }
          }
        },
        catch: (cause) => new Redis.RedisError({ cause })
      })
    }
    return {
      send: sendReserved,
      // `destroy` rejects in-flight commands (a blocked read) instead of waiting for their replies
      close: Effect.sync(() => {
        closed = true
        for (const socket of opened) if (socket.isOpen) socket.destroy()
        opened.clear()
        idle.clear()
      })
    }
  })

  const redis = yield* Redis.make({
    send,
    connect,
    pool: { acquireTimeout, idleTimeout, maxConnections, minConnections },
    subscribe: (channel, onMessage) =>
      Effect.acquireRelease(
        Effect.tryPromise({
          try: () => client.subscribe(channel, (message, channel) => onMessage({ channel, message })),
          catch: (cause) => new Redis.RedisError({ cause })
        }),
        () => Effect.ignoreCause(Effect.promise(() => client.unsubscribe(channel)))
      ).pipe(Effect.as(Effect.never))
  })
  return Context.make(RedisCluster, { client }).pipe(Context.add(Redis.Redis, redis))
})

/**
 * Provides `Redis` (and {@link RedisCluster}) over a node-redis cluster client, connected when the layer is
 * built (it fails with `RedisError` when no root node answers) and closed when the layer's scope ends.
 *
 * ```ts
 * RedisStreamsBroker.layer({ partitions: 8 }).pipe(
 *   Layer.provide(RedisCluster.layer({ rootNodes: [{ url: "redis://10.0.0.1:6379" }, { url: "redis://10.0.0.2:6379" }] }))
 * )
 * ```
 *
 * @since 0.1.0
 */
export const layer = (options: Options): Layer.Layer<Redis.Redis | RedisCluster, Redis.RedisError> =>
  Layer.effectContext(make(options))
