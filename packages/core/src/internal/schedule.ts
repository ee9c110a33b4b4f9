/**
 * Exponential backoff (doubling from `base`) whose delays never exceed `cap`:
 * the retry shape of the consumer, its resubscription and the relay.
 *
 * @internal
 */
import { Duration, Effect, Schedule } from "effect"

export const cappedExponential = (base: Duration.Input, cap: Duration.Input): Schedule.Schedule<Duration.Duration> => {
  const max = Duration.fromInputUnsafe(cap)
  return Schedule.exponential(base, 2).pipe(
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, max)))
  )
}
