/**
 * NATS errors as `BrokerError`s: a request JetStream refused is `CommandFailed` (retryable when the server
 * says it is unavailable), anything about the connection (timeouts, no responders, a closed or draining
 * connection) is `ConnectionLost`.
 *
 * @internal
 */
import { BrokerError } from "@converge/core"
import { JetStreamApiError } from "@nats-io/jetstream"
import { Effect } from "effect"

/** Fails with a `BrokerError` of `reason`. */
export const fail = (reason: BrokerError.BrokerErrorReason) => Effect.fail(BrokerError.make(reason))

/** Maps whatever a NATS call threw to a `BrokerError`. */
export const fromNats =
  (command: string) =>
  (cause: unknown): BrokerError.BrokerError => {
    const text = cause instanceof Error ? cause.message : String(cause)
    if (cause instanceof JetStreamApiError) {
      // 503: JetStream temporarily unavailable (a restart, a leader election)
      return BrokerError.make(
        new BrokerError.CommandFailed({
          command,
          message: `${text} (code ${cause.code}, status ${cause.status})`,
          retryable: cause.status === 503 || cause.status === 408,
          cause
        })
      )
    }
    return BrokerError.make(new BrokerError.ConnectionLost({ message: `${command}: ${text}`, cause }))
  }

/** Runs a NATS call, its failure a `BrokerError`. */
export const attempt = <A>(command: string, f: () => Promise<A>): Effect.Effect<A, BrokerError.BrokerError> =>
  Effect.tryPromise({ try: f, catch: fromNats(command) })
