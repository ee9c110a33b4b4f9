/**
 * `Operations` — what an operator does, over the library's own API: the
 * CLI and the dashboard both call these, and these call `DeadLetter`,
 * `Audit`, `Saga`, `OutboxRelay` and the broker (`topics`, `groupStats`) —
 * no second implementation of any of them.
 *
 * Each operation fails with one error type, {@link OperationError}, whose
 * `kind` says what went wrong (and which exit code the CLI returns).
 *
 * ```ts
 * const ops = yield* Operations.make({ broker, store, sagas, engine })
 * const letters = yield* ops.deadLetters({ topic: "orders", reason: "decode" })
 * ```
 *
 * @since 0.1.0
 */
import { Audit, Broker, DeadLetter, Saga, SagaStore } from "@converge/core"
import { OutboxRelay, type SqlStore } from "@converge/store-postgres"
import { Cause, Clock, type Context, Effect, Layer, Schema, type Scope } from "effect"
import type { WorkflowEngine } from "effect/workflow"

/**
 * What can go wrong, as the CLI's exit code sees it: `unavailable` (a server
 * is unreachable, or a source is not configured), `not-found`, `invalid` (a
 * bad name or argument), `conflict` (the thing is not in a state that allows
 * the action: a saga not parked, a malformed dead letter), `failed` (any other).
 *
 * @since 0.1.0
 */
export type ErrorKind = "unavailable" | "not-found" | "invalid" | "conflict" | "failed"

/**
 * An operation failed; `message` is for people, `kind` for scripts.
 *
 * @since 0.1.0
 */
export class OperationError extends Schema.TaggedError<OperationError>("@converge/cli/OperationError")(
  "OperationError",
  {
    kind: Schema.Literals(["unavailable", "not-found", "invalid", "conflict", "failed"]),
    message: Schema.String
  }
) {}

/**
 * The CLI's exit code of each outcome: 0 success, 1 failed, 2 invalid usage,
 * 3 unavailable, 4 not found, 5 conflict.
 *
 * @since 0.1.0
 */
export const exitCodes: Readonly<Record<ErrorKind | "ok", number>> = {
  ok: 0,
  failed: 1,
  invalid: 2,
  unavailable: 3,
  "not-found": 4,
  conflict: 5
}

const textOf = (cause: unknown): string => {
  if (cause instanceof Error) return cause.message
  if (typeof cause === "object" && cause !== null && "message" in cause) return String(cause.message)
  return String(cause)
}

const unreachable = /ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|ETIMEDOUT|ECONNRESET|connect|socket|closed/i

/**
 * Classifies a library error into an {@link OperationError}: not found, conflict, invalid, unavailable
 * (a connection error), or failed; `what` says what was being done.
 *
 * @since 0.1.0
 */
export const fromError = (what: string, error: unknown): OperationError => {
  if (error instanceof OperationError) return error
  const tag = (error as { readonly _tag?: unknown } | null)?._tag
  switch (tag) {
    case "DeadLetterNotFound":
    case "SagaNotFound":
      return new OperationError({ kind: "not-found", message: textOf(error) })
    case "NotReplayable":
    case "NotParked":
      return new OperationError({ kind: "conflict", message: textOf(error) })
    case "InvalidName":
    case "StoreMismatch":
      return new OperationError({ kind: "invalid", message: textOf(error) })
    case "BrokerError": {
      const reason = (error as { readonly reason?: { readonly _tag?: string } }).reason?._tag
      if (reason === "InvalidArgument") return new OperationError({ kind: "invalid", message: textOf(error) })
      if (reason === "ConnectionLost" || unreachable.test(textOf(error))) {
        return new OperationError({
          kind: "unavailable",
          message: `${what}: the broker is unreachable: ${textOf(error)}`
        })
      }
      return new OperationError({ kind: "failed", message: `${what}: ${textOf(error)}` })
    }
  }
  const text = textOf((error as { readonly cause?: unknown } | null)?.cause ?? error)
  if (unreachable.test(text)) return new OperationError({ kind: "unavailable", message: `${what}: ${text}` })
  return new OperationError({ kind: "failed", message: `${what}: ${textOf(error)}` })
}

/**
 * Filters of {@link Operations.deadLetters}: the topic (all topics the broker lists when omitted), and
 * `DeadLetter.Filter`'s group, reason, time range and limit.
 *
 * @since 0.1.0
 */
export interface DeadLetterFilter extends DeadLetter.Filter {
  readonly topic?: string | undefined
}

/**
 * One group of a topic in {@link Status}.
 *
 * @since 0.1.0
 */
export interface GroupStatus {
  readonly group: string
  /** Delivered, not settled. */
  readonly pending: number
  /** Not yet delivered. */
  readonly lag: number
}

/**
 * What `converge status` shows: each part is absent when its source is not configured.
 *
 * @since 0.1.0
 */
export interface Status {
  readonly outbox?:
    | { readonly unpublished: number; readonly oldestMillis: number; readonly dead: number; readonly schema: string }
    | undefined
  readonly topics?:
    | ReadonlyArray<{
        readonly topic: string
        readonly deadLetters: number
        readonly groups: ReadonlyArray<GroupStatus>
      }>
    | undefined
  /** Sagas per status (counted up to 10 000 each). */
  readonly sagas?: Readonly<Record<SagaStore.Status, number>> | undefined
}

/**
 * The operator's API. Every method fails with {@link OperationError} only.
 *
 * @since 0.1.0
 */
export interface Operations {
  /** What this instance reads: a description of each source, for headers and `--json`. */
  readonly sources: Sources
  /** The broker's topics, their groups and dead-letter counts. */
  readonly topics: Effect.Effect<ReadonlyArray<Broker.TopicInfo>, OperationError>
  readonly status: Effect.Effect<Status, OperationError>
  readonly deadLetters: (filter: DeadLetterFilter) => Effect.Effect<ReadonlyArray<Broker.DeadLetter>, OperationError>
  readonly deadLetter: (topic: string, id: string) => Effect.Effect<Broker.DeadLetter, OperationError>
  /** Replays one dead letter; returns its new broker entry id. */
  readonly replay: (topic: string, id: string) => Effect.Effect<string, OperationError>
  /** Replays a page of dead letters in one publish and one purge (`DeadLetter.replayMany`): an outcome each. */
  readonly replayMany: (
    topic: string,
    letters: ReadonlyArray<Broker.DeadLetter>
  ) => Effect.Effect<ReadonlyArray<DeadLetter.ReplayOutcome>, OperationError>
  /** Purges dead letters by id (the topic's whole queue when `ids` is omitted); returns how many. */
  readonly purge: (topic: string, ids?: ReadonlyArray<string>) => Effect.Effect<number, OperationError>
  /**
   * What the audit recorded in the last `windowMs`: events per kind (throughput, for the dashboard's
   * overview); empty without an audit log.
   */
  readonly activity: (windowMs: number) => Effect.Effect<Readonly<Partial<Record<Audit.Kind, number>>>, OperationError>
  /** The audit timeline of a message id or a correlation id. */
  readonly trace: (id: string) => Effect.Effect<ReadonlyArray<Audit.Stored>, OperationError>
  readonly sagas: (filter: SagaStore.Filter) => Effect.Effect<ReadonlyArray<SagaStore.Summary>, OperationError>
  readonly saga: (executionId: string) => Effect.Effect<SagaStore.Detail, OperationError>
  readonly resumeSaga: (executionId: string) => Effect.Effect<void, OperationError>
  readonly resolveSaga: (executionId: string) => Effect.Effect<void, OperationError>
  readonly outboxDead: (limit: number) => Effect.Effect<ReadonlyArray<OutboxRelay.DeadRow>, OperationError>
  /** Moves `outbox_dead` rows back into the outbox (all when `seqs` is omitted); returns how many. */
  readonly requeue: (seqs?: ReadonlyArray<string>) => Effect.Effect<number, OperationError>
}

/**
 * Descriptions of the sources (`redis://127.0.0.1:6379`, never a password).
 *
 * @since 0.1.0
 */
export interface Sources {
  readonly broker?: string | undefined
  readonly database?: string | undefined
  readonly schema?: string | undefined
  readonly sagaSchema?: string | undefined
}

/**
 * What {@link make} reads from: contexts that hold the services (each optional: an operation whose source
 * is missing fails with `unavailable`, naming the setting to give).
 *
 * @since 0.1.0
 */
export interface Input {
  readonly sources: Sources
  /** A `Broker`. */
  readonly broker?: Context.Context<Broker.Broker> | undefined
  /** The store's `SqlStore`, and the `AuditLog` when the audit is in Postgres or memory. */
  readonly store?: Context.Context<SqlStore.SqlStore> | undefined
  readonly audit?: Context.Context<Audit.AuditLog> | undefined
  /** The saga store. */
  readonly sagas?: Context.Context<SagaStore.SagaStore> | undefined
  /**
   * The workflow engine `Saga.resume`/`resolve` go through: a layer, built on first use (the cluster
   * engine takes about 2 s to start) and kept for the scope of {@link make}.
   */
  readonly engine?: Layer.Layer<WorkflowEngine.WorkflowEngine, unknown> | undefined
}

const missing = (what: string, setting: string) =>
  new OperationError({ kind: "unavailable", message: `no ${what} configured: ${setting}` })

/**
 * The operations over the given sources.
 *
 * @since 0.1.0
 */
export const make = (input: Input): Effect.Effect<Operations, never, Scope.Scope> =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const on =
      <S>(context: Context.Context<S> | undefined, what: string, setting: string) =>
      <A, E>(name: string, effect: Effect.Effect<A, E, S>): Effect.Effect<A, OperationError> =>
        context === undefined
          ? Effect.fail(missing(what, setting))
          : effect.pipe(
              Effect.provide(context),
              Effect.catchCause((cause) => {
                const error = Cause.findErrorOption(cause)
                return Effect.fail(fromError(name, error._tag === "Some" ? error.value : Cause.squash(cause)))
              })
            )
    const onBroker = on(input.broker, "broker", "--redis-url or REDIS_URL")
    const onStore = on(input.store, "database", "--database-url or DATABASE_URL")
    const onAudit = on(input.audit, "audit log", "--database-url or DATABASE_URL")
    const onSagas = on(input.sagas, "saga store", "--database-url or DATABASE_URL")

    // the engine is built once, on the first resume/resolve, in the scope of the operations
    let engine: Context.Context<WorkflowEngine.WorkflowEngine> | undefined
    const engineContext = Effect.suspend(() => {
      if (engine !== undefined) return Effect.succeed(engine)
      if (input.engine === undefined) return Effect.fail(missing("workflow engine", "--database-url or DATABASE_URL"))
      return Layer.buildWithScope(input.engine, scope).pipe(
        Effect.tap((built) =>
          Effect.sync(() => {
            engine = built
          })
        ),
        Effect.mapError((e) => fromError("starting the workflow engine client", e))
      )
    })
    const decide = (name: string, f: typeof Saga.resume) => (executionId: string) =>
      Effect.flatMap(engineContext, (built) =>
        onSagas(name, Effect.provide(f(executionId), built) as Effect.Effect<void, unknown, SagaStore.SagaStore>)
      )

    const topics = Effect.gen(function* () {
      const broker = yield* onBroker("listing topics", Effect.service(Broker.Broker))
      if (broker.topics === undefined) {
        return yield* new OperationError({
          kind: "unavailable",
          message: "the broker cannot list its topics (Broker.topics): give --topic"
        })
      }
      return yield* onBroker("listing topics", broker.topics)
    })

    const deadLetters = (filter: DeadLetterFilter) =>
      Effect.gen(function* () {
        const names = filter.topic !== undefined ? [filter.topic] : (yield* topics).map((t) => t.name)
        const out: Array<Broker.DeadLetter> = []
        const limit = filter.limit ?? Number.POSITIVE_INFINITY
        for (const topic of names) {
          if (out.length >= limit) break
          const page = yield* onBroker(
            `listing the dead letters of ${topic}`,
            DeadLetter.list(topic, { ...filter, limit: Number.isFinite(limit) ? limit - out.length : undefined })
          )
          out.push(...page)
        }
        return out
      })

    /** An operator's action, recorded by the audit sink of the sources when there is one. */
    const audited = <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
      input.audit === undefined ? effect : Effect.provide(effect, input.audit)

    const countSagas = Effect.gen(function* () {
      const counts: Partial<Record<SagaStore.Status, number>> = {}
      for (const status of SagaStore.statuses) {
        counts[status] = (yield* onSagas("counting sagas", Saga.list({ status, limit: 10_000 }))).length
      }
      return counts as Record<SagaStore.Status, number>
    })

    const status = Effect.gen(function* () {
      const outbox =
        input.store === undefined
          ? undefined
          : yield* onStore(
              "reading the outbox",
              Effect.all({ lag: OutboxRelay.backlog, dead: OutboxRelay.deadCount })
            ).pipe(Effect.map(({ lag, dead }) => ({ ...lag, dead, schema: input.sources.schema ?? "converge" })))
      const topicStatus =
        input.broker === undefined
          ? undefined
          : yield* Effect.forEach(yield* topics, (t) =>
              Effect.gen(function* () {
                const broker = yield* onBroker("reading group stats", Effect.service(Broker.Broker))
                const groups = yield* Effect.forEach(t.groups, (group) =>
                  broker.groupStats === undefined
                    ? Effect.succeed({ group, pending: Number.NaN, lag: Number.NaN })
                    : onBroker(`reading group ${group} of ${t.name}`, broker.groupStats(t.name, group)).pipe(
                        Effect.map((s) => ({ group, pending: s.pending, lag: s.lag }))
                      )
                )
                return { topic: t.name, deadLetters: t.deadLetters, groups }
              })
            )
      const sagas = input.sagas === undefined ? undefined : yield* countSagas
      return { outbox, topics: topicStatus, sagas }
    })

    return {
      sources: input.sources,
      topics,
      status,
      deadLetters,
      deadLetter: (topic, id) => onBroker(`reading dead letter ${id} of ${topic}`, DeadLetter.show(topic, id)),
      replay: (topic, id) => onBroker(`replaying dead letter ${id} of ${topic}`, audited(DeadLetter.replay(topic, id))),
      replayMany: (topic, letters) =>
        onBroker(`replaying dead letters of ${topic}`, audited(DeadLetter.replayMany(topic, letters))),
      purge: (topic, ids) => onBroker(`purging dead letters of ${topic}`, audited(DeadLetter.purge(topic, ids))),
      activity: (windowMs) =>
        input.audit === undefined
          ? Effect.succeed({})
          : onAudit(
              "reading recent activity",
              Effect.gen(function* () {
                const now = yield* Clock.currentTimeMillis
                const events = yield* Audit.query({
                  kinds: ["published", "relayed", "handled", "retried", "dead-lettered", "replayed"],
                  from: now - windowMs,
                  limit: 100_000
                })
                const counts: Partial<Record<Audit.Kind, number>> = {}
                for (const e of events) counts[e.kind] = (counts[e.kind] ?? 0) + 1
                return counts
              })
            ),
      trace: (id) => onAudit(`reading the audit trail of ${id}`, Audit.query({ correlationId: id, limit: 10_000 })),
      sagas: (filter) => onSagas("listing sagas", Saga.list(filter)),
      saga: (id) => onSagas(`reading saga ${id}`, Saga.show(id)),
      resumeSaga: decide("resuming a saga", Saga.resume),
      resolveSaga: decide("resolving a saga", Saga.resolve),
      outboxDead: (limit) => onStore("reading outbox_dead", OutboxRelay.deadRows(limit)),
      requeue: (seqs) => onStore("requeueing outbox_dead rows", OutboxRelay.requeueDead(seqs))
    } satisfies Operations
  })
