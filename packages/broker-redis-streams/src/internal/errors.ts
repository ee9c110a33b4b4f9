/**
 * Redis errors as `BrokerError`s: a command the server refused is
 * `CommandFailed`, anything else (a dropped socket, a restart) is
 * `ConnectionLost`.
 *
 * @internal
 */
import { BrokerError } from "@converge/core"
import { Effect } from "effect"
import type * as Redis from "effect/persistence/Redis"

/** Fails with a `BrokerError` of `reason`. */
export const fail = (reason: BrokerError.BrokerErrorReason) => Effect.fail(BrokerError.make(reason))

/**
 * Error replies that a later attempt may not get: the server is loading, out of memory, busy, failing over,
 * or cannot persist, or (on a cluster, to a connection that does not follow redirects) the slot moved. Any other error reply (`ERR`, `WRONGTYPE`, `NOPERM`, a script error, ...) is a refusal
 * that will recur.
 */
const transientReply =
  /^(OOM|LOADING|BUSY|TRYAGAIN|MASTERDOWN|READONLY|CLUSTERDOWN|MISCONF|NOREPLICAS|NOSCRIPT|MOVED|ASK)\b/

/** An error reply of the server (an upper-case code first), as opposed to a failure of the connection. */
const errorReply = /^[A-Z][A-Z_]+\b/

/** A `CommandFailed` for an error reply, retryable or not by its code. */
export const commandFailed = (command: string, text: string, cause?: unknown): BrokerError.CommandFailed =>
  new BrokerError.CommandFailed({ command, message: text, retryable: transientReply.test(text), cause })

/** Maps a `RedisError` to a `BrokerError`: an error reply is `CommandFailed`, anything else `ConnectionLost`. */
export const fromRedis =
  (command: string) =>
  (error: Redis.RedisError): BrokerError.BrokerError => {
    const text = String((error.cause as { message?: unknown } | undefined)?.message ?? error.cause)
    return BrokerError.make(
      errorReply.test(text)
        ? commandFailed(command, text, error)
        : new BrokerError.ConnectionLost({ message: `${command}: ${text}`, cause: error })
    )
  }

/** The stream or its group is gone (docs/reliability.md, trap 3). */
export const isNoGroup = (e: Redis.RedisError | BrokerError.BrokerError): boolean => String(e.cause).includes("NOGROUP")
