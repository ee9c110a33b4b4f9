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

/** Maps a `RedisError` to a `BrokerError` (retryable unless the server refused the command). */
export const fromRedis =
  (command: string) =>
  (error: Redis.RedisError): BrokerError.BrokerError => {
    const text = String((error.cause as { message?: unknown } | undefined)?.message ?? error.cause)
    const refused = /^(ERR|WRONGTYPE|NOSCRIPT|BUSYGROUP|NOGROUP|NOPERM|NOAUTH|READONLY|OOM|LOADING|MISCONF)\b/.test(
      text
    )
    return BrokerError.make(
      refused
        ? new BrokerError.CommandFailed({ command, message: text, cause: error })
        : new BrokerError.ConnectionLost({ message: `${command}: ${text}`, cause: error })
    )
  }

/** The stream or its group is gone (docs/reliability.md, trap 3). */
export const isNoGroup = (e: Redis.RedisError | BrokerError.BrokerError): boolean => String(e.cause).includes("NOGROUP")
