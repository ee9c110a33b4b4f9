/**
 * `SagaStore` — what a saga coordinator records for people: each saga's
 * status, and each step's result or error with its timings. The workflow
 * engine keeps its own journal for replay; this is the inspection side (the
 * API behind `Saga.list`/`Saga.show`, the operator tools and the audit
 * trail), written by the saga runtime in the same transaction as a
 * transactional step.
 *
 * Two implementations: {@link layerMemory} here (tests, the in-memory
 * engine) and the Postgres one in `@converge/store-postgres` (`SagaPg`).
 *
 * @since 0.1.0
 */

import { Clock, Context, Effect, Layer, Option, Schema } from "effect"

/**
 * Where a saga is:
 *
 * | status | meaning |
 * |:--|:--|
 * | `running` | steps are running (or it waits for a reply) |
 * | `compensating` | a step failed; the completed steps are being undone, newest first |
 * | `completed` | every step succeeded |
 * | `compensated` | a step failed and every completed step was undone (or resolved by an operator) |
 * | `needs-attention` | a compensation kept failing: parked until an operator resumes or resolves it |
 *
 * @since 0.1.0
 */
export type Status = "running" | "compensating" | "completed" | "compensated" | "needs-attention"

/** Every {@link Status}, in lifecycle order. @since 0.1.0 */
export const statuses: ReadonlyArray<Status> = [
  "running",
  "compensating",
  "completed",
  "compensated",
  "needs-attention"
]

/**
 * A step's record: `action` rows for the steps, `compensation` rows for their undoing.
 *
 * | status | meaning |
 * |:--|:--|
 * | `waiting` | a command was sent; the reply has not come |
 * | `completed` / `failed` | done, with its encoded `result` or its `error` |
 * | `parked` | (compensation) kept failing; waits for an operator |
 * | `resolved` | (compensation) an operator marked it done by hand |
 *
 * @since 0.1.0
 */
export interface StepRecord {
  readonly executionId: string
  /** The step's name (unique in its saga; a repeated name gets `#2`, `#3`, ...). */
  readonly step: string
  readonly phase: "action" | "compensation"
  readonly status: "waiting" | "completed" | "failed" | "parked" | "resolved"
  /** The step's result, JSON-encoded by its schema. */
  readonly result?: string | undefined
  /** The error, encoded (`Retry.encodeError`) or a timeout's text. */
  readonly error?: string | undefined
  /** Attempts made (compensations are retried). */
  readonly attempts: number
  /** Epoch milliseconds (`Clock`). */
  readonly startedAt: number
  readonly finishedAt?: number | undefined
}

/**
 * One saga as listed.
 *
 * @since 0.1.0
 */
export interface Summary {
  /** The workflow execution id (derived from the saga's idempotency key). */
  readonly executionId: string
  /** The saga's name (`Saga.make`'s first argument). */
  readonly name: string
  readonly status: Status
  /** Why it compensates or is parked. */
  readonly error?: string | undefined
  readonly createdAt: number
  readonly updatedAt: number
}

/**
 * One saga in full: its payload, where it is parked, and every step record in the order they started.
 *
 * @since 0.1.0
 */
export interface Detail extends Summary {
  /** The payload, JSON-encoded. */
  readonly payload: string
  /** The parked compensation (`needs-attention` only): its step and the token that resumes it. */
  readonly parked?: { readonly step: string; readonly token: string } | undefined
  readonly steps: ReadonlyArray<StepRecord>
}

/**
 * A filter of {@link SagaStore}'s `list`.
 *
 * @since 0.1.0
 */
export interface Filter {
  readonly status?: Status | undefined
  readonly name?: string | undefined
  /** At most this many, newest first (default 100). */
  readonly limit?: number | undefined
}

/**
 * The store could not be read or written (the database is down, say).
 *
 * @since 0.1.0
 */
export class SagaStoreError extends Schema.TaggedError<SagaStoreError>("@converge/core/SagaStore/SagaStoreError")(
  "SagaStoreError",
  { operation: Schema.String, cause: Schema.Defect() }
) {
  /** Names the operation. */
  override get message(): string {
    return `saga store: ${this.operation} failed: ${this.cause instanceof Error ? this.cause.message : String(this.cause)}`
  }
}

/**
 * The store. Writes are idempotent upserts: the runtime may repeat one when a
 * workflow replays after a crash.
 *
 * @since 0.1.0
 */
export class SagaStore extends Context.Service<
  SagaStore,
  {
    /** Records a new saga as `running` (a repeat keeps the first record). */
    readonly started: (run: {
      readonly executionId: string
      readonly name: string
      readonly payload: string
      readonly at: number
    }) => Effect.Effect<void, SagaStoreError>
    /** Moves a saga to `status`; `error` and `parked` replace the saga's (absent: cleared). */
    readonly status: (
      executionId: string,
      status: Status,
      at: number,
      extra?: {
        readonly error?: string | undefined
        readonly parked?: { readonly step: string; readonly token: string } | undefined
      }
    ) => Effect.Effect<void, SagaStoreError>
    /**
     * Writes a step record (keyed by execution, step and phase). A record with the status and attempts it already
     * has changes nothing (a replay repeats its writes); `startedAt` is kept from the first record.
     */
    readonly step: (record: StepRecord) => Effect.Effect<void, SagaStoreError>
    /** Sagas by status and name, newest first. */
    readonly list: (filter?: Filter) => Effect.Effect<ReadonlyArray<Summary>, SagaStoreError>
    /** One saga with its steps. */
    readonly show: (executionId: string) => Effect.Effect<Option.Option<Detail>, SagaStoreError>
  }
>()("@converge/core/SagaStore") {}

/**
 * An in-memory {@link SagaStore} (one per layer build): for tests and the in-memory workflow engine.
 *
 * @since 0.1.0
 */
export const makeMemory: Effect.Effect<SagaStore["Service"]> = Effect.sync(() => {
  const runs = new Map<string, { summary: Summary; payload: string; parked: Detail["parked"] }>()
  const steps = new Map<string, Array<StepRecord>>()
  return SagaStore.of({
    started: (run) =>
      Effect.sync(() => {
        if (runs.has(run.executionId)) return
        runs.set(run.executionId, {
          summary: {
            executionId: run.executionId,
            name: run.name,
            status: "running",
            createdAt: run.at,
            updatedAt: run.at
          },
          payload: run.payload,
          parked: undefined
        })
      }),
    status: (executionId, status, at, extra) =>
      Effect.sync(() => {
        const run = runs.get(executionId)
        if (run === undefined) return
        run.summary = { ...run.summary, status, updatedAt: at, error: extra?.error }
        run.parked = extra?.parked
      }),
    step: (record) =>
      Effect.sync(() => {
        const list = steps.get(record.executionId) ?? []
        const at = list.findIndex((r) => r.step === record.step && r.phase === record.phase)
        const previous = at >= 0 ? list[at]! : undefined
        if (previous !== undefined && previous.status === record.status && previous.attempts === record.attempts) return // a replay's repeat
        if (previous !== undefined) list[at] = { ...record, startedAt: previous.startedAt }
        else list.push(record)
        steps.set(record.executionId, list)
      }),
    list: (filter) =>
      Effect.sync(() =>
        [...runs.values()]
          .map((r) => r.summary)
          .filter((s) => filter?.status === undefined || s.status === filter.status)
          .filter((s) => filter?.name === undefined || s.name === filter.name)
          .sort((a, b) => b.createdAt - a.createdAt)
          .slice(0, filter?.limit ?? 100)
      ),
    show: (executionId) =>
      Effect.sync(() => {
        const run = runs.get(executionId)
        if (run === undefined) return Option.none()
        return Option.some({
          ...run.summary,
          payload: run.payload,
          parked: run.parked,
          steps: [...(steps.get(executionId) ?? [])]
        })
      })
  })
})

/**
 * {@link makeMemory} as a layer.
 *
 * @since 0.1.0
 */
export const layerMemory: Layer.Layer<SagaStore> = Layer.effect(SagaStore, makeMemory)

/** The current time in epoch milliseconds, from `Clock`. @internal */
export const now: Effect.Effect<number> = Clock.currentTimeMillis
