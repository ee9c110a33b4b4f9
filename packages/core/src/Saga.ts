/**
 * `Saga` — steps across services that are undone, newest first, when a later
 * step fails (stages 3 and 5 of the pattern).
 *
 * **A saga is an Effect workflow** (`effect/workflow`): its body is an
 * ordinary Effect program over a typed payload; the workflow engine records
 * each step's result, so a coordinator that crashes resumes where it was,
 * on this process or another (`SagaPg.engine` runs Effect's SQL-backed
 * cluster engine on Postgres). Converge adds what sagas across services need:
 *
 * - {@link step}: a local step with a compensation that receives the step's
 *   typed result and the failure's cause. A transactional step's writes, its
 *   step record and the engine's journal entry commit together: a crash
 *   never repeats it.
 * - {@link request}: a step that sends a {@link Command} to another service
 *   (through the outbox, in the step's transaction) and awaits its typed
 *   reply, or fails with {@link StepTimedOut} after `timeout` on a durable
 *   clock. {@link respond} is the other service's side.
 * - compensation retried by its own `Schedule`; when it keeps failing the
 *   saga is parked as `needs-attention` until an operator calls
 *   {@link resume} (after fixing the cause) or {@link resolve}.
 * - inspection: {@link list} and {@link show} (the {@link SagaStore}).
 *
 * ```ts
 * const PlaceOrder = Saga.make("place-order", { payload: Order, idempotencyKey: (o) => o.id })
 *
 * const PlaceOrderLive = Saga.toLayer(PlaceOrder, (order) =>
 *   Effect.gen(function* () {
 *     const reservation = yield* Saga.step({
 *       name: "reserve-stock",
 *       success: Reservation,
 *       run: reserveStock(order),
 *       compensate: (reservation) => releaseStock(reservation)
 *     })
 *     const charge = yield* Saga.request(ChargePayment, { orderId: order.id, cents: order.cents }, {
 *       timeout: "30 seconds",
 *       compensate: (charge) => Saga.send(RefundPayment, { chargeId: charge.id })
 *     })
 *     return { reservation, charge }
 *   })
 * )
 * ```
 *
 * "Exactly once for effect": each step and each compensation is applied
 * once as far as anyone can observe: a transactional step's database writes
 * commit with the engine's record of it (a crash before the commit runs it
 * again, from scratch; after it, never again); a command's effect in another
 * service is made once by that service's inbox, however often the command or
 * its reply is delivered. A step that calls a system outside both (an HTTP
 * API, say) is at-least-once: make it idempotent (`Activity.idempotencyKey`).
 *
 * @since 0.1.0
 */

import { Cause, Context, Duration, Effect, Exit, Layer, Metric, Option, Predicate, Schedule, Schema } from "effect"
import { ClusterSchema } from "effect/cluster"
import { Activity, DurableClock, DurableDeferred, Workflow, type WorkflowEngine } from "effect/workflow"
import * as Audit from "./Audit.ts"
import type * as Consumer from "./Consumer.ts"
import * as Envelope from "./Envelope.ts"
import * as Metrics from "./Metrics.ts"
import * as Publisher from "./Publisher.ts"
import * as Retry from "./Retry.ts"
import * as SagaStore from "./SagaStore.ts"
import * as Topic from "./Topic.ts"

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

/**
 * A {@link request}'s reply did not come within its timeout (a durable clock:
 * it survives restarts). The step counts as failed: the saga compensates.
 *
 * @since 0.1.0
 */
export class StepTimedOut extends Schema.TaggedError<StepTimedOut>("@converge/core/Saga/StepTimedOut")("StepTimedOut", {
  step: Schema.String,
  timeout: Schema.String
}) {
  /** Names the step and the wait. */
  override get message(): string {
    return `saga step ${this.step}: no reply within ${this.timeout}`
  }
}

/**
 * No saga with that execution id in the {@link SagaStore}.
 *
 * @since 0.1.0
 */
export class SagaNotFound extends Schema.TaggedError<SagaNotFound>("@converge/core/Saga/SagaNotFound")("SagaNotFound", {
  executionId: Schema.String
}) {
  /** Names the saga. */
  override get message(): string {
    return `no saga ${this.executionId}`
  }
}

/**
 * {@link resume} or {@link resolve} of a saga that is not parked (`needs-attention`).
 *
 * @since 0.1.0
 */
export class NotParked extends Schema.TaggedError<NotParked>("@converge/core/Saga/NotParked")("NotParked", {
  executionId: Schema.String,
  status: Schema.String
}) {
  /** Names the saga and where it is. */
  override get message(): string {
    return `saga ${this.executionId} is ${this.status}, not needs-attention: nothing to resume or resolve`
  }
}

/**
 * A command or reply could not be sent. `retryable`: a broker or database
 * hiccup (a consumer retries it); otherwise the message is invalid.
 *
 * @since 0.1.0
 */
export class SendFailed extends Schema.TaggedError<SendFailed>("@converge/core/Saga/SendFailed")("SendFailed", {
  topic: Schema.String,
  retryable: Schema.Boolean,
  cause: Schema.Defect()
}) {
  /** Read by `Consumer`'s retry classification. */
  get isRetryable(): boolean {
    return this.retryable
  }
  /** Names the topic and the cause. */
  override get message(): string {
    return `saga: sending to ${this.topic} failed: ${this.cause instanceof Error ? this.cause.message : String(this.cause)}`
  }
}

// ---------------------------------------------------------------------------
// transport and transaction
// ---------------------------------------------------------------------------

/**
 * How a saga sends commands (and a responder its replies). `SagaPg.transport`
 * writes to the outbox in the current transaction (the step's, or the
 * responder's inbox transaction); {@link transportFromPublisher} publishes
 * straight to the broker.
 *
 * @since 0.1.0
 */
export class SagaTransport extends Context.Service<
  SagaTransport,
  {
    /** The topic this coordinator's replies come back on (set as each command's `replyTo`). */
    readonly replyTopic: string
    /** Sends one message; returns its id. */
    readonly send: <A, I>(
      topic: Topic.Topic<A, I>,
      payload: A,
      options: Envelope.MakeOptions
    ) => Effect.Effect<string, SendFailed>
  }
>()("@converge/core/Saga/SagaTransport") {}

/**
 * A {@link SagaTransport} over the `Publisher` (straight to the broker: at-least-once, not tied to a
 * database transaction). Use it with the in-memory engine; with Postgres use `SagaPg.transport`.
 *
 * @since 0.1.0
 */
export const transportFromPublisher = (options: {
  readonly replyTopic: string
}): Layer.Layer<SagaTransport, never, Publisher.Publisher> =>
  Layer.effect(
    SagaTransport,
    Effect.map(Effect.service(Publisher.Publisher), (publisher) =>
      SagaTransport.of({
        replyTopic: options.replyTopic,
        send: (topic, payload, sendOptions) =>
          Effect.mapError(
            Effect.map(publisher.publish(topic, payload, sendOptions), (receipt) => receipt.id),
            (error) => sendFailed(topic.name, error)
          )
      })
    )
  )

/** @internal */
export const sendFailed = (topic: string, error: unknown): SendFailed =>
  new SendFailed({
    topic,
    retryable: Predicate.hasProperty(error, "isRetryable") ? error.isRetryable === true : false,
    cause: error
  })

/**
 * Wraps each step run and compensation attempt. `SagaPg` opens a savepoint
 * there, so a failed attempt's writes roll back while the failure is still
 * recorded; the default runs the effect as is.
 *
 * @since 0.1.0
 */
export const SagaTransaction = Context.Reference<{
  readonly wrap: <A, E, R>(effect: Effect.Effect<A, E, R>) => Effect.Effect<A, E, R>
}>("@converge/core/Saga/SagaTransaction", { defaultValue: () => ({ wrap: (effect) => effect }) })

// ---------------------------------------------------------------------------
// commands and replies
// ---------------------------------------------------------------------------

/**
 * A request another service answers: the command's topic and the schemas of
 * its reply. Both sides share it: the saga calls {@link request}, the service
 * handles it with {@link respond}.
 *
 * @since 0.1.0
 */
export interface Command<C, CI, A, AI, E, EI> {
  readonly topic: Topic.Topic<C, CI>
  readonly success: Schema.Codec<A, AI>
  readonly error: Schema.Codec<E, EI>
}

/**
 * Defines a {@link Command}. `error` is the typed failure the service may reply with (default: none).
 *
 * @since 0.1.0
 */
export const command = <C, CI, A, AI, E = never, EI = never>(
  topic: Topic.Topic<C, CI>,
  reply: { readonly success: Schema.Codec<A, AI>; readonly error?: Schema.Codec<E, EI> | undefined }
): Command<C, CI, A, AI, E, EI> => ({
  topic,
  success: reply.success,
  error: (reply.error ?? Schema.Never) as Schema.Codec<E, EI>
})

/**
 * A reply on the wire: the token that names the awaiting step, and the
 * JSON-encoded success or typed failure.
 *
 * @since 0.1.0
 */
export const Reply = Schema.Struct({
  token: Schema.String,
  outcome: Schema.Literals(["success", "failure"]),
  value: Schema.Unknown
})

/** A decoded {@link Reply}. @since 0.1.0 */
export type Reply = typeof Reply.Type

/** The CloudEvents type of replies. @since 0.1.0 */
export const replyType = "converge.saga.reply"

/**
 * The header that carries the awaiting step's token on a command (copied to its reply).
 *
 * @since 0.1.0
 */
export const tokenHeader = "convergesagatoken"

const replyTopics = new Map<string, Topic.Topic<Reply, typeof Reply.Encoded>>()

/**
 * The reply topic of that name (cached). Throws `InvalidName` for a bad name.
 *
 * @since 0.1.0
 */
export const replyTopic = (name: string): Topic.Topic<Reply, typeof Reply.Encoded> => {
  let topic = replyTopics.get(name)
  if (topic === undefined) {
    topic = Topic.make(name, Reply, { type: replyType })
    replyTopics.set(name, topic)
  }
  return topic
}

// ---------------------------------------------------------------------------
// definition
// ---------------------------------------------------------------------------

const TypeId = "~@converge/core/Saga"

/**
 * A saga definition: its name and the Effect `Workflow` under it.
 *
 * @since 0.1.0
 */
export interface Saga<
  Name extends string,
  Payload extends Workflow.AnyStructSchema,
  Success extends Schema.Top,
  Error extends Schema.Top
> {
  readonly [TypeId]: typeof TypeId
  readonly name: Name
  /** The workflow: `execute`, `poll`, `interrupt` as Effect defines them. Its error adds {@link StepTimedOut}. */
  readonly workflow: Workflow.Workflow<Name, Payload, Success, Schema.Union<readonly [Error, typeof StepTimedOut]>>
}

/**
 * Defines a saga. `idempotencyKey` names one run: executing the same payload
 * twice joins the first run (an order id, say).
 *
 * @since 0.1.0
 */
export const make = <
  const Name extends string,
  Payload extends Schema.Struct.Fields | Workflow.AnyStructSchema,
  Success extends Schema.Top = Schema.Void,
  Error extends Schema.Top = Schema.Never
>(
  name: Name,
  options: {
    readonly payload: Payload
    readonly idempotencyKey: (
      payload: Payload extends Schema.Struct.Fields ? Schema.Struct.Type<Payload> : Payload["Type"]
    ) => string
    readonly success?: Success | undefined
    readonly error?: Error | undefined
  }
): Saga<Name, Payload extends Schema.Struct.Fields ? Schema.Struct<Payload> : Payload, Success, Error> => {
  const error = Schema.Union([options.error ?? Schema.Never, StepTimedOut])
  const workflow = Workflow.make(name, {
    payload: options.payload,
    idempotencyKey: options.idempotencyKey,
    ...(options.success === undefined ? {} : { success: options.success }),
    error
  })
  return { [TypeId]: TypeId, name, workflow } as unknown as Saga<
    Name,
    Payload extends Schema.Struct.Fields ? Schema.Struct<Payload> : Payload,
    Success,
    Error
  >
}

interface Completed {
  readonly step: string
  readonly value: unknown
  // its services are in the body's requirements already (`step`/`request` carry them)
  readonly compensate: (value: unknown, cause: Cause.Cause<unknown>) => Effect.Effect<void, unknown>
  readonly retry: RetrySchedule
}

type RetrySchedule = Schedule.Schedule<unknown, unknown>

/** The running saga, for its steps. @internal */
class SagaRun extends Context.Service<
  SagaRun,
  {
    readonly executionId: string
    readonly name: string
    readonly completed: Array<Completed>
    readonly names: Map<string, number>
  }
>()("@converge/core/Saga/SagaRun") {}

const exponentialRetry = (attempts: number): RetrySchedule =>
  Retry.exponential("100 millis", "5 seconds").pipe(Schedule.upTo({ times: attempts - 1 }))

/**
 * The default retry of a compensation: exponential from 100 ms (capped at
 * 5 s), 4 retries: 5 attempts, then the saga is parked.
 *
 * @since 0.1.0
 */
export const defaultCompensationRetry: Schedule.Schedule<unknown, unknown> = exponentialRetry(5)

const compensationRetry = (schedule: RetrySchedule | undefined, attempts: number | undefined): RetrySchedule =>
  schedule ?? (attempts === undefined ? defaultCompensationRetry : exponentialRetry(Math.max(1, attempts)))

const encodeJson = <A, I>(schema: Schema.Codec<A, I>, value: A): Effect.Effect<string> =>
  Effect.map(Effect.orDie(Schema.encodeUnknownEffect(Schema.toCodecJson(schema))(value)), (encoded) =>
    JSON.stringify(encoded ?? null)
  )

/**
 * The text recorded for a failure cause: the encoded typed error (`Retry.encodeError`), else the
 * pretty-printed cause.
 *
 * @since 0.1.0
 */
export const describe = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.findErrorOption(cause)
  if (Option.isSome(failure)) return Retry.encodeError(failure.value)
  return Cause.pretty(cause)
}

const record = <R>(name: string, effect: Effect.Effect<void, SagaStore.SagaStoreError, R>) =>
  Activity.make({ name, execute: Effect.orDie(effect) }).annotate(ClusterSchema.WithTransaction, true)

const stepName = (run: SagaRun["Service"], name: string): string => {
  const seen = (run.names.get(name) ?? 0) + 1
  run.names.set(name, seen)
  return seen === 1 ? name : `${name}#${seen}`
}

/** Records an action's outcome (the store's step record and the audit event), in the current transaction. */
const recordOutcome = <A, I>(
  store: SagaStore.SagaStore["Service"],
  run: SagaRun["Service"],
  name: string,
  success: Schema.Codec<A, I>,
  exit: Exit.Exit<A, unknown>,
  startedAt: number
): Effect.Effect<void> =>
  Effect.gen(function* () {
    if (Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) return
    const finishedAt = yield* SagaStore.now
    const base = {
      executionId: run.executionId,
      step: name,
      phase: "action",
      attempts: 1,
      startedAt,
      finishedAt
    } as const
    if (Exit.isSuccess(exit)) {
      const result = yield* encodeJson(success, exit.value)
      yield* Effect.orDie(store.step({ ...base, status: "completed", result }))
      yield* Audit.recordSaga("saga-step-completed", run, { step: name })
    } else {
      const error = describe(exit.cause)
      yield* Effect.orDie(store.step({ ...base, status: "failed", error }))
      yield* Audit.recordSaga("saga-step-failed", run, { step: name, error })
    }
  })

/**
 * Registers the saga's body with the workflow engine: the layer to provide
 * wherever the engine runs (each coordinator process). The body is the
 * saga's program; when it fails (a typed error, a {@link StepTimedOut}, or a
 * defect) the completed steps are compensated newest first, then the saga
 * fails with that error.
 *
 * @since 0.1.0
 */
export const toLayer = <
  Name extends string,
  Payload extends Workflow.AnyStructSchema,
  Success extends Schema.Top,
  Error extends Schema.Top,
  R
>(
  saga: Saga<Name, Payload, Success, Error>,
  body: (
    payload: Payload["Type"],
    executionId: string
  ) => Effect.Effect<Success["Type"], Error["Type"] | StepTimedOut, R>
) =>
  saga.workflow.toLayer((payload, executionId) =>
    Effect.gen(function* () {
      const store = yield* SagaStore.SagaStore
      const run = SagaRun.of({ executionId, name: saga.name, completed: [], names: new Map() })
      const encodedPayload = yield* encodeJson(
        saga.workflow.payloadSchema as unknown as Schema.Codec<unknown, unknown>,
        payload
      )
      // idempotent writes, not journaled activities (each activity costs the engine a round trip): a
      // replay repeats them with no change. Status changes on the compensation path stay activities: a
      // replay must not move a parked saga back to `compensating`
      const at = yield* SagaStore.now
      yield* Effect.orDie(store.started({ executionId, name: saga.name, payload: encodedPayload, at }))
      const exit = yield* Effect.exit(Effect.provideService(body(payload, executionId), SagaRun, run))
      if (Exit.isSuccess(exit)) {
        yield* Effect.orDie(Effect.flatMap(SagaStore.now, (at) => store.status(executionId, "completed", at)))
        return exit.value
      }
      // a suspension (awaiting a reply, a timer, an operator) interrupts the run: not a failure
      if (Cause.hasInterruptsOnly(exit.cause)) return yield* exit
      const error = describe(exit.cause)
      yield* record(
        "saga/compensating",
        Effect.flatMap(SagaStore.now, (at) => store.status(executionId, "compensating", at, { error }))
      )
      for (const done of [...run.completed].reverse()) {
        yield* compensate(run, store, done, exit.cause, error)
      }
      yield* record(
        "saga/compensated",
        Effect.flatMap(SagaStore.now, (at) => store.status(executionId, "compensated", at, { error }))
      )
      return yield* exit
    })
  )

const ParkDecision = DurableDeferred.make("resume", { success: Schema.Literals(["retry", "resolve"]) })

const compensate = (
  run: SagaRun["Service"],
  store: SagaStore.SagaStore["Service"],
  done: Completed,
  cause: Cause.Cause<unknown>,
  sagaError: string
) =>
  Effect.gen(function* () {
    const { executionId } = run
    const tx = yield* SagaTransaction
    let attempts = 0
    for (let round = 0; ; round++) {
      let lastError = ""
      for (let attempt = 1; ; attempt++) {
        attempts++
        const total = attempts
        const name = `compensate/${done.step}/${round}.${attempt}`
        const exit = yield* Effect.exit(
          Activity.make({
            name,
            error: Schema.String,
            execute: Effect.gen(function* () {
              const startedAt = yield* SagaStore.now
              const result = yield* Effect.exit(tx.wrap(done.compensate(done.value, cause)))
              const finishedAt = yield* SagaStore.now
              const base = {
                executionId,
                step: done.step,
                phase: "compensation",
                attempts: total,
                startedAt,
                finishedAt
              } as const
              if (Exit.isSuccess(result)) {
                yield* Effect.orDie(store.step({ ...base, status: "completed" }))
                yield* Audit.recordSaga("compensation-completed", run, { step: done.step, attempt: total })
                yield* Metric.update(Metric.withAttributes(Metrics.compensated, { saga: run.name }), 1)
                return
              }
              if (Cause.hasInterruptsOnly(result.cause))
                return yield* Effect.failCause(result.cause as Cause.Cause<never>)
              const message = describe(result.cause)
              yield* Effect.orDie(store.step({ ...base, status: "failed", error: message }))
              yield* Audit.recordSaga("compensation-failed", run, { step: done.step, attempt: total, error: message })
              // logged here, in the journaled activity: a replay of the saga does not log it again
              yield* Effect.logWarning(
                `saga ${run.name} ${executionId}: compensation of ${done.step} failed (attempt ${attempt} of round ${round + 1})`,
                message
              )
              return yield* Effect.fail(message)
            })
          }).annotate(ClusterSchema.WithTransaction, true)
        )
        if (Exit.isSuccess(exit)) return
        const failure = Cause.findErrorOption(exit.cause)
        if (Option.isNone(failure)) return yield* exit
        lastError = failure.value
        const delay = yield* Retry.nextDelay(done.retry, attempt, failure.value)
        if (Option.isNone(delay)) break
        yield* DurableClock.sleep({ name, duration: delay.value })
      }
      // kept failing: park until an operator decides
      const decision = DurableDeferred.make(`resume/${done.step}/${round}`, { success: ParkDecision.successSchema })
      const token = yield* DurableDeferred.token(decision)
      const parkedError = lastError
      yield* record(
        `park/${done.step}/${round}`,
        Effect.gen(function* () {
          const at = yield* SagaStore.now
          yield* store.step({
            executionId,
            step: done.step,
            phase: "compensation",
            status: "parked",
            error: parkedError,
            attempts,
            startedAt: at,
            finishedAt: at
          })
          yield* store.status(executionId, "needs-attention", at, {
            error: `compensation of ${done.step} failed ${attempts} times: ${parkedError}`,
            parked: { step: done.step, token }
          })
          yield* Audit.recordSaga("saga-parked", run, { step: done.step, attempt: attempts, error: parkedError })
          yield* Metric.update(Metric.withAttributes(Metrics.parked, { saga: run.name }), 1)
          yield* Effect.logError(
            `saga ${run.name} ${executionId}: compensation of ${done.step} failed ${attempts} times; parked as needs-attention (Saga.resume or Saga.resolve it)`,
            parkedError
          )
        })
      )
      const decided = yield* DurableDeferred.await(decision)
      yield* record(
        `unpark/${done.step}/${round}`,
        Effect.gen(function* () {
          const at = yield* SagaStore.now
          if (decided === "resolve") {
            yield* store.step({
              executionId,
              step: done.step,
              phase: "compensation",
              status: "resolved",
              error: parkedError,
              attempts,
              startedAt: at,
              finishedAt: at
            })
          }
          yield* store.status(executionId, "compensating", at, { error: sagaError })
          yield* Audit.recordSaga("saga-resumed", run, { step: done.step, reason: decided })
        })
      )
      if (decided === "resolve") return
    }
  })

// ---------------------------------------------------------------------------
// steps
// ---------------------------------------------------------------------------

/**
 * Options of a step's compensation.
 *
 * @since 0.1.0
 */
export interface CompensationOptions<A, R> {
  /**
   * Undoes the step, given its result and the saga's failure. Runs once per
   * saga for effect (in the step's transaction mode); a failure is retried by
   * `retry`, then parks the saga.
   */
  readonly compensate?: ((value: A, cause: Cause.Cause<unknown>) => Effect.Effect<void, unknown, R>) | undefined
  /** The compensation's retry (default {@link defaultCompensationRetry}, 5 attempts). */
  readonly retry?: Schedule.Schedule<unknown, unknown> | undefined
  /** With the default schedule: attempts before parking (default 5). */
  readonly attempts?: number | undefined
}

const pushCompensation = <A, R>(
  run: SagaRun["Service"],
  step: string,
  value: A,
  options: CompensationOptions<A, R>
) => {
  if (options.compensate === undefined) return
  run.completed.push({
    step,
    value,
    compensate: options.compensate as Completed["compensate"],
    retry: compensationRetry(options.retry, options.attempts)
  })
}

/**
 * A local step: runs `run` once (an `Activity`; its result is journaled) and
 * registers `compensate` to undo it if the saga fails later.
 *
 * `transactional` (default `true`): with `SagaPg.engine` the step runs in
 * the engine's database transaction: its SQL writes through the same client
 * (and `Outbox.publish`/{@link send}), its step record and the engine's
 * journal entry commit together, so a crash never applies it twice. Set it to
 * `false` for a step that does not write the saga's database (it would hold a
 * transaction open for nothing).
 *
 * @since 0.1.0
 */
export const step = <A, AI, E = never, EI = never, R = never, R2 = never>(
  options: {
    readonly name: string
    readonly success: Schema.Codec<A, AI>
    readonly error?: Schema.Codec<E, EI> | undefined
    readonly run: Effect.Effect<A, E, R>
    readonly transactional?: boolean | undefined
  } & CompensationOptions<A, R2>
): Effect.Effect<
  A,
  E,
  R | R2 | SagaRun | SagaStore.SagaStore | WorkflowEngine.WorkflowEngine | WorkflowEngine.WorkflowInstance
> =>
  Effect.gen(function* () {
    const run = yield* SagaRun
    const store = yield* SagaStore.SagaStore
    const tx = yield* SagaTransaction
    const name = stepName(run, options.name)
    const value = yield* Activity.make({
      name: `step/${name}`,
      success: options.success as Schema.Codec<A, AI>,
      error: (options.error ?? Schema.Never) as Schema.Codec<E, EI>,
      execute: Effect.gen(function* () {
        const startedAt = yield* SagaStore.now
        const exit = yield* Effect.exit(tx.wrap(options.run))
        yield* recordOutcome(store, run, name, options.success, exit, startedAt)
        return yield* exit
      })
    }).annotate(ClusterSchema.WithTransaction, options.transactional ?? true)
    pushCompensation(run, name, value, options)
    return value
  })

/**
 * Sends a message from a saga step or compensation with the {@link SagaTransport} (through the outbox
 * with `SagaPg.transport`: in the step's transaction). Correlated with the saga.
 *
 * @since 0.1.0
 */
export const send = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  options?: Envelope.MakeOptions
): Effect.Effect<string, SendFailed, SagaTransport> =>
  Effect.flatMap(Effect.service(SagaTransport), (transport) =>
    Effect.flatMap(Effect.serviceOption(SagaRun), (run) =>
      transport.send(topic, payload, {
        ...options,
        correlationId: options?.correlationId ?? (Option.isSome(run) ? run.value.executionId : undefined)
      })
    )
  )

/**
 * A message-driven step: sends `command` (with `replyTo` and a token header,
 * correlated with the saga) in one journaled, transactional activity, then
 * awaits the typed reply. A failure reply fails the step with the command's
 * typed error; no reply within `timeout` (a durable clock) fails it with
 * {@link StepTimedOut}. Either way the saga compensates the steps before it.
 * A reply that comes after the timeout is ignored.
 *
 * @since 0.1.0
 */
export const request = <C, CI, A, AI, E, EI, R2 = never>(
  command: Command<C, CI, A, AI, E, EI>,
  payload: C,
  options: {
    /** The step's name (default: the command's topic). */
    readonly name?: string | undefined
    readonly timeout: Duration.Input
  } & CompensationOptions<A, R2>
): Effect.Effect<
  A,
  E | StepTimedOut,
  R2 | SagaRun | SagaStore.SagaStore | SagaTransport | WorkflowEngine.WorkflowEngine | WorkflowEngine.WorkflowInstance
> =>
  Effect.gen(function* () {
    const run = yield* SagaRun
    const store = yield* SagaStore.SagaStore
    const transport = yield* SagaTransport
    const name = stepName(run, options.name ?? command.topic.name)
    const timeout = Duration.fromInputUnsafe(options.timeout)
    const reply = DurableDeferred.make(`reply/${name}`, { success: command.success, error: command.error })
    const token = yield* DurableDeferred.token(reply)
    const startedAt = yield* Activity.make({
      name: `send/${name}`,
      success: Schema.Number,
      execute: Effect.gen(function* () {
        const at = yield* SagaStore.now
        yield* Effect.orDie(
          transport.send(command.topic, payload, {
            correlationId: run.executionId,
            replyTo: transport.replyTopic,
            headers: { [tokenHeader]: token }
          })
        )
        yield* Effect.orDie(
          store.step({
            executionId: run.executionId,
            step: name,
            phase: "action",
            status: "waiting",
            attempts: 1,
            startedAt: at
          })
        )
        return at
      })
    }).annotate(ClusterSchema.WithTransaction, true)

    // Effect.raceAll settles on the first success: both arms succeed with an outcome, so a failure reply
    // wins the race at once instead of waiting for the timer
    const Outcome = Schema.Union([
      Schema.Struct({ _tag: Schema.tag("Reply"), value: command.success }),
      Schema.Struct({ _tag: Schema.tag("Failure"), error: command.error }),
      Schema.Struct({ _tag: Schema.tag("TimedOut") })
    ])
    type Outcome =
      | { readonly _tag: "Reply"; readonly value: A }
      | { readonly _tag: "Failure"; readonly error: E }
      | { readonly _tag: "TimedOut" }
    const outcome = yield* DurableDeferred.raceAll({
      name: `await/${name}`,
      success: Outcome,
      error: Schema.Never,
      effects: [
        Effect.matchCause(DurableDeferred.await(reply), {
          onSuccess: (value): Outcome => ({ _tag: "Reply", value }),
          onFailure: (cause): Outcome => {
            const failure = Cause.findErrorOption(cause)
            if (Option.isSome(failure)) return { _tag: "Failure", error: failure.value }
            throw Cause.squash(cause)
          }
        }),
        Effect.as(DurableClock.sleep({ name: `timeout/${name}`, duration: timeout, inMemoryThreshold: 0 }), {
          _tag: "TimedOut"
        } as Outcome)
      ]
    }) as unknown as Effect.Effect<Outcome, never, WorkflowEngine.WorkflowEngine | WorkflowEngine.WorkflowInstance>
    const exit: Exit.Exit<A, E | StepTimedOut> =
      outcome._tag === "Reply"
        ? Exit.succeed(outcome.value)
        : outcome._tag === "Failure"
          ? Exit.fail(outcome.error)
          : Exit.fail(new StepTimedOut({ step: name, timeout: Duration.format(timeout) }))
    // idempotent (a replay rewrites the same record; the store keeps the first finishedAt)
    yield* recordOutcome(store, run, name, command.success, exit, startedAt)
    if (Exit.isFailure(exit)) return yield* exit
    pushCompensation(run, name, exit.value, options)
    return exit.value
  })

// ---------------------------------------------------------------------------
// the answering side and the reply path
// ---------------------------------------------------------------------------

/**
 * The handler of a service that answers a {@link Command}: runs `handle` and
 * sends its success, or its typed failure, back to the command's `replyTo`
 * with the command's token (a defect is not a reply: the consumer retries
 * it). The reply's id derives from the command's, so a redelivered command
 * replies with the same message (the coordinator's inbox drops the copy).
 * Give it to `Consumer.make` as `handle` (with `Inbox.handler` around it on
 * Postgres, so the effect and the reply commit together).
 *
 * @since 0.1.0
 */
export const respond =
  <C, CI, A, AI, E, EI, R>(
    command: Command<C, CI, A, AI, E, EI>,
    handle: (payload: C, context: Consumer.MessageContext) => Effect.Effect<A, E, R>
  ) =>
  (payload: C, context: Consumer.MessageContext): Effect.Effect<void, SendFailed, R | SagaTransport> =>
    Effect.gen(function* () {
      const token = context.headers[tokenHeader]
      const replyTo = context.headers[Envelope.Headers.replyTo]
      const exit = yield* Effect.exit(handle(payload, context))
      if (token === undefined || replyTo === undefined || replyTo === "") {
        if (Exit.isFailure(exit)) {
          yield* Effect.logWarning(
            `saga command on ${context.topic} failed and has no reply-to: the failure is dropped`,
            Cause.pretty(exit.cause)
          )
        }
        return
      }
      let outcome: "success" | "failure"
      let value: unknown
      if (Exit.isSuccess(exit)) {
        outcome = "success"
        value = yield* Effect.orDie(Schema.encodeUnknownEffect(Schema.toCodecJson(command.success))(exit.value))
      } else {
        const failure = Cause.findErrorOption(exit.cause)
        if (Option.isNone(failure)) return yield* Effect.failCause(exit.cause as Cause.Cause<never>)
        outcome = "failure"
        value = yield* Effect.orDie(Schema.encodeUnknownEffect(Schema.toCodecJson(command.error))(failure.value))
      }
      const transport = yield* SagaTransport
      const topic = yield* Effect.try({ try: () => replyTopic(replyTo), catch: (e) => sendFailed(replyTo, e) })
      yield* transport.send(
        topic,
        { token, outcome, value },
        {
          id: `reply-${context.id}`.slice(0, 200),
          correlationId: context.headers[Envelope.Headers.correlationId],
          causationId: context.id
        }
      )
    })

const AnyReply = DurableDeferred.make("reply", { success: Schema.Unknown, error: Schema.Unknown })

/**
 * Completes the step that awaits `reply` (by its token). A reply for a step
 * that already completed or timed out changes nothing.
 *
 * @since 0.1.0
 */
export const completeReply = (reply: Reply): Effect.Effect<void, never, WorkflowEngine.WorkflowEngine> =>
  DurableDeferred.done(AnyReply, {
    token: reply.token as DurableDeferred.Token,
    exit: reply.outcome === "success" ? Exit.succeed(reply.value) : Exit.fail(reply.value)
  })

// ---------------------------------------------------------------------------
// inspection and operator actions
// ---------------------------------------------------------------------------

/**
 * Sagas by status and name, newest first.
 *
 * @since 0.1.0
 */
export const list = (
  filter?: SagaStore.Filter
): Effect.Effect<ReadonlyArray<SagaStore.Summary>, SagaStore.SagaStoreError, SagaStore.SagaStore> =>
  SagaStore.SagaStore.use((store) => store.list(filter))

/**
 * One saga with its steps (results, errors, timings).
 *
 * @since 0.1.0
 */
export const show = (
  executionId: string
): Effect.Effect<SagaStore.Detail, SagaNotFound | SagaStore.SagaStoreError, SagaStore.SagaStore> =>
  SagaStore.SagaStore.use((store) =>
    Effect.flatMap(store.show(executionId), (found) =>
      Option.isSome(found) ? Effect.succeed(found.value) : Effect.fail(new SagaNotFound({ executionId }))
    )
  )

const decide = (executionId: string, decision: "retry" | "resolve") =>
  Effect.gen(function* () {
    const detail = yield* show(executionId)
    if (detail.status !== "needs-attention" || detail.parked === undefined) {
      return yield* new NotParked({ executionId, status: detail.status })
    }
    yield* DurableDeferred.done(ParkDecision, {
      token: detail.parked.token as DurableDeferred.Token,
      exit: Exit.succeed(decision)
    })
  })

/**
 * Resumes a parked saga after its cause was fixed: the failed compensation
 * runs again (with its retry schedule), then the rest. It parks again if it
 * still fails.
 *
 * @since 0.1.0
 */
export const resume = (
  executionId: string
): Effect.Effect<
  void,
  SagaNotFound | NotParked | SagaStore.SagaStoreError,
  SagaStore.SagaStore | WorkflowEngine.WorkflowEngine
> => decide(executionId, "retry")

/**
 * Marks a parked saga's failed compensation as done by hand (the operator
 * undid it outside the saga); the saga goes on compensating the other steps.
 *
 * @since 0.1.0
 */
export const resolve = (
  executionId: string
): Effect.Effect<
  void,
  SagaNotFound | NotParked | SagaStore.SagaStoreError,
  SagaStore.SagaStore | WorkflowEngine.WorkflowEngine
> => decide(executionId, "resolve")

/** @internal */
export type { SagaRun }
