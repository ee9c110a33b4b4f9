/**
 * `Retry` — stage 4 of the pattern: what a failure means, and when to try
 * again.
 *
 * A handler's error channel is a union of tagged errors. A
 * {@link Classification} maps every tag to an {@link Outcome} (`"retry"`,
 * `"dead-letter"` or `"ignore"`, or a function of the error), and **a
 * classification that misses a tag does not compile** ({@link RequiredTags}).
 * Errors that carry `isRetryable` themselves (`SqlError`, `BrokerError`) may
 * be left out: they classify themselves. Defects (a thrown exception,
 * `Effect.die`) are retried by the same schedule, then dead-lettered with
 * reason `defect`.
 *
 * A retryable failure steps a `Schedule` (input: the error, or a
 * {@link Defect}). {@link decide} turns one failed attempt into a
 * {@link Decision}: acknowledge, dead-letter (with a reason and the encoded
 * error), or retry after a delay. The attempt number travels with the
 * message, and the schedule is replayed for the earlier attempts, so an
 * exponential schedule with `upTo` continues where it left off after a
 * redelivery or a restart. The `Consumer` runtime uses this module to wait
 * short delays in process and to turn longer ones into delayed redeliveries
 * through the broker.
 *
 * ```ts
 * const policy = Retry.policy<PaymentTimeout | CardDeclined>({
 *   errors: { PaymentTimeout: "retry", CardDeclined: "dead-letter" },
 *   retry: Retry.exponential("200 millis", "30 seconds").pipe(Schedule.jittered, Schedule.upTo({ times: 8 }))
 * })
 * ```
 *
 * @since 0.1.0
 */
import { Cause, Duration, Effect, Option, Predicate, Result, Schedule } from "effect"

/**
 * What happens to a message whose handler failed with a given error.
 *
 * - `"retry"`: step the retry schedule (in process, then through the broker),
 *   dead-letter with reason `exhausted` when it ends.
 * - `"dead-letter"`: a permanent failure; dead-letter at once with reason
 *   `permanent`.
 * - `"ignore"`: acknowledge the message and move on (log only).
 *
 * @since 0.1.0
 */
export type Outcome = "retry" | "dead-letter" | "ignore"

/**
 * Any tagged error.
 *
 * @since 0.1.0
 */
export interface Tagged {
  readonly _tag: string
}

/**
 * The tags of an error union.
 *
 * @since 0.1.0
 */
export type Tags<E> = E extends { readonly _tag: infer T extends string } ? T : never

/**
 * The tags that must be mapped: every tag whose error does not say
 * `isRetryable` itself.
 *
 * @since 0.1.0
 */
export type RequiredTags<E> = E extends { readonly _tag: infer T extends string }
  ? E extends { readonly isRetryable: boolean }
    ? never
    : T
  : never

/**
 * The outcome of one tag: a fixed outcome, or one computed from the error.
 *
 * @since 0.1.0
 */
export type OutcomeOf<E> = Outcome | ((error: E) => Outcome)

/**
 * The error classification of a handler with error union `E`: every tag of
 * `E` without `isRetryable` must be present.
 *
 * @since 0.1.0
 */
export type Classification<E> = {
  readonly [K in RequiredTags<E>]: OutcomeOf<Extract<E, { readonly _tag: K }>>
} & {
  readonly [K in Tags<E>]?: OutcomeOf<Extract<E, { readonly _tag: K }>>
}

/**
 * What the retry schedule sees as input: the handler's error, or a defect.
 *
 * @since 0.1.0
 */
export type RetryInput<E> = E | Defect

/**
 * A defect (an exception thrown by a handler, or `Effect.die`), as the retry
 * schedule sees it.
 *
 * @since 0.1.0
 */
export interface Defect {
  readonly _tag: "Defect"
  readonly defect: unknown
}

/**
 * What to do after one failed attempt.
 *
 * - `Ack`: the classification said `"ignore"`.
 * - `DeadLetter`: with reason `permanent` (classified so), `exhausted` (the
 *   schedule ended) or `defect` (the schedule ended on a defect), and the
 *   encoded error.
 * - `Retry`: after `delay`.
 *
 * @since 0.1.0
 */
export type Decision =
  | { readonly _tag: "Ack" }
  | {
      readonly _tag: "DeadLetter"
      readonly reason: "permanent" | "exhausted" | "defect"
      readonly error: string
    }
  | { readonly _tag: "Retry"; readonly delay: Duration.Duration; readonly error: string }

/**
 * Exponential backoff, doubling from `base`, each delay capped at `cap`
 * (unbounded in count: bound it with `Schedule.upTo`). The shape of the
 * default retry, of the consumer's resubscription and of the outbox relay's
 * backoff.
 *
 * @since 0.1.0
 */
export const exponential = (base: Duration.Input, cap: Duration.Input): Schedule.Schedule<Duration.Duration> => {
  const max = Duration.fromInputUnsafe(cap)
  return Schedule.exponential(base, 2).pipe(
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, max)))
  )
}

/**
 * The default retry schedule: exponential from 100 ms, doubling, each delay
 * capped at 30 seconds, 10 retries.
 *
 * @since 0.1.0
 */
export const defaultSchedule: Schedule.Schedule<unknown, unknown> = exponential("100 millis", "30 seconds").pipe(
  Schedule.upTo({ times: 10 })
)

/**
 * A classification and a schedule for one error union, checked together.
 *
 * @since 0.1.0
 */
export interface Policy<E> {
  readonly errors: Classification<E>
  readonly retry: Schedule.Schedule<unknown, RetryInput<E>>
}

/**
 * Builds a {@link Policy}; `retry` defaults to {@link defaultSchedule}. The
 * type parameter is the handler's error union: leaving one of its tags out
 * of `errors` is a compile error.
 *
 * @since 0.1.0
 */
export const policy = <E>(options: {
  readonly errors: Classification<NoInfer<E>>
  readonly retry?: Schedule.Schedule<unknown, NoInfer<RetryInput<E>>> | undefined
}): Policy<E> => ({ errors: options.errors, retry: options.retry ?? defaultSchedule })

/**
 * The outcome of one error under a classification: the tag's mapping, else
 * the error's own `isRetryable`, else `"retry"` (an unmapped tag can only
 * come from a cast: treat it as transient).
 *
 * @since 0.1.0
 */
export const classify = <E>(errors: Classification<E>, error: unknown): Outcome => {
  const tag = Predicate.hasProperty(error, "_tag") && typeof error._tag === "string" ? error._tag : undefined
  const mapped = tag === undefined ? undefined : (errors as Record<string, OutcomeOf<unknown> | undefined>)[tag]
  if (mapped !== undefined) return typeof mapped === "function" ? mapped(error) : mapped
  if (Predicate.hasProperty(error, "isRetryable") && typeof error.isRetryable === "boolean") {
    return error.isRetryable ? "retry" : "dead-letter"
  }
  return "retry"
}

/**
 * The delay before the attempt after `attempt` (1-based), or none when the
 * schedule ends there. The schedule is replayed from its start for the
 * earlier attempts (each step sees `input`), so it continues where it left
 * off after a redelivery or a restart. A schedule that fails counts as ended.
 *
 * @since 0.1.0
 */
export const nextDelay = <In>(
  schedule: Schedule.Schedule<unknown, In>,
  attempt: number,
  input: In
): Effect.Effect<Option.Option<Duration.Duration>> =>
  Effect.gen(function* () {
    const step = yield* Schedule.toStep(schedule)
    let delay = Duration.zero
    for (let i = 1; i <= attempt; i++) {
      const now = yield* Effect.clockWith((c) => c.currentTimeMillis)
      const result = yield* Effect.result(step(now, input))
      if (Result.isFailure(result)) return Option.none<Duration.Duration>()
      delay = result.success[1]
    }
    return Option.some(delay)
  }).pipe(Effect.catchCause(() => Effect.succeed(Option.none<Duration.Duration>())))

/**
 * Decides what follows a failed attempt (`attempt`, 1-based) whose cause is
 * `cause`: a typed failure by its classification (and the schedule when it
 * is `"retry"`), a defect by the schedule alone. An interruption must not
 * reach it (it settles nothing).
 *
 * @since 0.1.0
 */
export const decide = <E>(policy: Policy<E>, cause: Cause.Cause<E>, attempt: number): Effect.Effect<Decision> => {
  const failure = Cause.findErrorOption(cause)
  if (Option.isSome(failure)) {
    const error = failure.value
    const outcome = classify(policy.errors, error)
    if (outcome === "ignore") return Effect.succeed({ _tag: "Ack" })
    if (outcome === "dead-letter") {
      return Effect.succeed({ _tag: "DeadLetter", reason: "permanent", error: encodeError(error) })
    }
    return Effect.map(
      nextDelay(policy.retry, attempt, error as RetryInput<E>),
      (delay): Decision =>
        Option.isSome(delay)
          ? { _tag: "Retry", delay: delay.value, error: encodeError(error) }
          : { _tag: "DeadLetter", reason: "exhausted", error: encodeError(error) }
    )
  }
  const defect = Cause.squash(cause)
  const input: Defect = { _tag: "Defect", defect }
  return Effect.map(
    nextDelay(policy.retry, attempt, input),
    (delay): Decision =>
      Option.isSome(delay)
        ? { _tag: "Retry", delay: delay.value, error: encodeError(defect) }
        : { _tag: "DeadLetter", reason: "defect", error: encodeError(defect) }
  )
}

/**
 * Encodes an error for the dead-letter queue: JSON of its own fields (plus
 * `message` and `name` of an `Error`) where it can, its string form
 * otherwise.
 *
 * @since 0.1.0
 */
export const encodeError = (error: unknown): string => {
  if (Predicate.isObject(error)) {
    const out: Record<string, unknown> = {}
    for (const k of Object.keys(error)) out[k] = (error as Record<string, unknown>)[k]
    if (error instanceof Error) {
      if (error.message !== "") out.message ??= error.message
      if (error.name !== "Error" && error.name !== out._tag) out.name ??= error.name
    }
    try {
      return JSON.stringify(out)
    } catch {
      // fall through: circular or not serializable
    }
  }
  return String(error)
}
