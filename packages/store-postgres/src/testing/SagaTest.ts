/**
 * The saga suite (S01–S07): an order saga on Postgres (Effect's cluster
 * workflow engine, the outbox, the inbox) over whatever broker layer is
 * given. The same body runs on the memory broker and on Redis Streams; only
 * the layer differs.
 *
 * The saga: `reserve` (a local step), `charge` (a command answered by a
 * payments consumer), `ship` (a local step that fails on demand). Every
 * action and compensation inserts a row into `effects`, so "once" and
 * "in this order" are checked in the database.
 *
 * @since 0.1.0
 */

import { randomUUID } from "node:crypto"
import { Broker, Consumer, Saga, SagaStore, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Clock, Effect, Exit, Layer, Redacted, Schema } from "effect"
import type { SqlError } from "effect/sql/SqlError"
import * as Inbox from "../Inbox.ts"
import * as Outbox from "../Outbox.ts"
import * as OutboxRelay from "../OutboxRelay.ts"
import * as SagaPg from "../SagaPg.ts"
import * as SqlStore from "../SqlStore.ts"

/** The order a test saga places. `fail`: which step fails (`ship`: the local third step). */
export const Order = Schema.Struct({
  id: Schema.String,
  cents: Schema.Int,
  fail: Schema.optional(Schema.Literals(["ship"]))
})

/** The payments service's typed refusal. */
export class Declined extends Schema.TaggedError<Declined>()("Declined", { orderId: Schema.String }) {}
/** The third step's typed failure. */
export class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { orderId: Schema.String }) {}

/** The charge command (payments answers it). */
export const chargeTopic = Topic.make("sagatest.charge", Schema.Struct({ orderId: Schema.String, cents: Schema.Int }))
/** A command nobody answers (the timeout test). */
export const silentTopic = Topic.make("sagatest.silent", Schema.Struct({ orderId: Schema.String }))
/** Charge: a charge id, or `Declined`. */
export const Charge = Saga.command(chargeTopic, {
  success: Schema.Struct({ chargeId: Schema.String }),
  error: Declined
})
/** A command with no consumer. */
export const Silent = Saga.command(silentTopic, { success: Schema.String })

/** Faults the tests switch on: how many more times the `reserve` compensation fails. */
export const faults = { releaseFailures: 0 }

/** The test saga. */
export const OrderSaga = Saga.make("sagatest-order", {
  payload: Order,
  idempotencyKey: (o) => o.id,
  success: Schema.String,
  error: Schema.Union([Declined, OutOfStock])
})

const effect = (what: string, order: string, value = "") =>
  Effect.gen(function* () {
    const { sql, table } = yield* SqlStore.SqlStore
    yield* sql.unsafe(`INSERT INTO ${table("effects")} (what, order_id, value) VALUES ($1, $2, $3)`, [
      what,
      order,
      value
    ])
  }).pipe(Effect.orDie)

/** The saga's body. */
export const OrderSagaLive = Saga.toLayer(OrderSaga, (order) =>
  Effect.gen(function* () {
    const reservation = yield* Saga.step({
      name: "reserve",
      success: Schema.Struct({ reservationId: Schema.String }),
      run: Effect.as(effect("reserve", order.id), { reservationId: `res-${order.id}` }),
      compensate: (r) =>
        faults.releaseFailures > 0
          ? Effect.suspend(() => {
              faults.releaseFailures--
              return Effect.fail(new Error("inventory service unavailable"))
            })
          : effect("release", order.id, r.reservationId)
    })
    const charge = yield* Saga.request(
      Charge,
      { orderId: order.id, cents: order.cents },
      {
        name: "charge",
        timeout: "20 seconds",
        compensate: (c) => effect("refund", order.id, c.chargeId)
      }
    )
    if (order.cents === 13) {
      yield* Saga.request(Silent, { orderId: order.id }, { name: "silent", timeout: "1 second" })
    }
    yield* Saga.step({
      name: "ship",
      success: Schema.String,
      error: OutOfStock,
      run:
        order.fail === "ship"
          ? Effect.andThen(effect("ship-attempt", order.id), Effect.fail(new OutOfStock({ orderId: order.id })))
          : Effect.as(effect("ship", order.id), "shipped")
    })
    return `${reservation.reservationId}/${charge.chargeId}`
  })
)

/** Payments: charges once per command (inbox), declines a zero amount. */
const payments = Consumer.make(chargeTopic, {
  group: "sagatest-payments",
  handle: Inbox.handler(
    Saga.respond(Charge, (command) =>
      command.cents === 0
        ? Effect.fail(new Declined({ orderId: command.orderId }))
        : Effect.as(effect("charge", command.orderId), { chargeId: `ch-${command.orderId}` })
    )
  )
})

/** The reply topic of the suite. */
export const replyTopic = "sagatest.replies"

const effectsOf = (order: string) =>
  Effect.gen(function* () {
    const { sql, table } = yield* SqlStore.SqlStore
    const rows = yield* sql.unsafe<{ readonly what: string; readonly value: string }>(
      `SELECT what, value FROM ${table("effects")} WHERE order_id = $1 ORDER BY seq`,
      [order]
    )
    return rows.map((r) => (r.value === "" ? r.what : `${r.what}:${r.value}`))
  }).pipe(Effect.orDie)

/**
 * The `effects` table the test saga and its services write (in the store's schema), created when the layer
 * builds.
 *
 * @since 0.1.0
 */
export const EffectsTable: Layer.Layer<never, SqlError, SqlStore.SqlStore> = Layer.effectDiscard(
  Effect.gen(function* () {
    const { sql, table } = yield* SqlStore.SqlStore
    yield* sql.unsafe(
      `CREATE TABLE ${table("effects")} (seq bigint GENERATED ALWAYS AS IDENTITY, what text NOT NULL, order_id text NOT NULL, value text NOT NULL DEFAULT '')`
    ).raw
  })
)

/** Polls until `check` holds (or fails after `timeoutMs`). */
export const eventually = <A, E, R>(
  what: string,
  effect: Effect.Effect<A, E, R>,
  check: (a: A) => boolean,
  timeoutMs = 20_000
): Effect.Effect<A, E | Error, R> =>
  Effect.gen(function* () {
    const deadline = (yield* Clock.currentTimeMillis) + timeoutMs
    let last: A = yield* effect
    while (!check(last)) {
      if ((yield* Clock.currentTimeMillis) > deadline) {
        return yield* Effect.fail(new Error(`${what}: still ${JSON.stringify(last)}`))
      }
      yield* Effect.sleep(100)
      last = yield* effect
    }
    return last
  })

/** The saga's status; `absent` before its first step is recorded. */
const statusOf = (executionId: string) =>
  Saga.show(executionId).pipe(
    Effect.map((d): string => d.status),
    Effect.catchTag("SagaNotFound", () => Effect.succeed("absent")),
    Effect.orDie
  )

/**
 * Registers the suite. `broker`: the broker layer under test (fresh per suite run).
 *
 * @since 0.1.0
 */
export const suite = (
  name: string,
  options: {
    readonly broker: Layer.Layer<Broker.Broker, unknown>
    readonly url?: string | undefined
  }
): void => {
  const url = options.url ?? process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
  const schema = `converge_saga_${randomUUID().replaceAll("-", "").slice(0, 12)}`
  const Pg = PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })
  const Schema_ = Layer.effectDiscard(Effect.addFinalizer(() => SagaPg.dropStore(schema)))
  const Services = Layer.mergeAll(
    OrderSagaLive,
    SagaPg.replies({ topic: replyTopic, group: "sagatest-coordinator" }),
    Layer.effectDiscard(payments)
  ).pipe(
    Layer.provideMerge(SagaPg.layer({ replyTopic, pollInterval: 200 })),
    Layer.provideMerge(EffectsTable),
    Layer.provideMerge(
      Layer.mergeAll(
        Outbox.layer(),
        Inbox.layer(),
        OutboxRelay.layer({ pollInterval: "100 millis", retention: "1 hour" })
      )
    ),
    Layer.provideMerge(SqlStore.layer({ schema, partitions: 4 })),
    Layer.provideMerge(Schema_),
    Layer.provideMerge(options.broker),
    Layer.provideMerge(Pg)
  )
  const run = randomUUID().slice(0, 8)
  const id = (n: string) => `${n}-${run}`

  describe(`SagaTest ${name}`, () => {
    layer(Services, { timeout: 60_000, excludeTestServices: true })((it) => {
      it.effect("S01 a saga whose steps succeed completes; each action once", () =>
        Effect.gen(function* () {
          const order = id("ok")
          const result = yield* OrderSaga.workflow.execute({ id: order, cents: 100 })
          assert.strictEqual(result, `res-${order}/ch-${order}`)
          assert.deepStrictEqual(yield* effectsOf(order), ["reserve", "charge", "ship"])
          const executionId = yield* OrderSaga.workflow.executionId({ id: order, cents: 100 })
          const detail = yield* Saga.show(executionId)
          assert.strictEqual(detail.status, "completed")
          assert.deepStrictEqual(
            detail.steps.map((s) => `${s.phase}:${s.step}:${s.status}`),
            ["action:reserve:completed", "action:charge:completed", "action:ship:completed"]
          )
          assert.strictEqual(detail.steps[1]!.result, JSON.stringify({ chargeId: `ch-${order}` }))
          assert.isAtLeast(detail.steps[1]!.finishedAt!, detail.steps[1]!.startedAt)
        })
      )

      it.effect(
        "S02 the third step fails: steps 2 and 1 are compensated once each, newest first, with their values",
        () =>
          Effect.gen(function* () {
            const order = id("ship-fails")
            const exit = yield* Effect.exit(OrderSaga.workflow.execute({ id: order, cents: 100, fail: "ship" }))
            assert.isTrue(Exit.isFailure(exit))
            // the failed step's own write ("ship-attempt") rolled back with its savepoint
            assert.deepStrictEqual(yield* effectsOf(order), [
              "reserve",
              "charge",
              `refund:ch-${order}`,
              `release:res-${order}`
            ])
            const executionId = yield* OrderSaga.workflow.executionId({ id: order, cents: 100, fail: "ship" })
            const detail = yield* Saga.show(executionId)
            assert.strictEqual(detail.status, "compensated")
            assert.include(detail.error!, "OutOfStock")
            assert.deepStrictEqual(
              detail.steps.map((s) => `${s.phase}:${s.step}:${s.status}`),
              [
                "action:reserve:completed",
                "action:charge:completed",
                "action:ship:failed",
                "compensation:charge:completed",
                "compensation:reserve:completed"
              ]
            )
          })
      )

      it.effect("S03 a typed failure reply fails the step: the earlier step is compensated", () =>
        Effect.gen(function* () {
          const order = id("declined")
          const exit = yield* Effect.exit(OrderSaga.workflow.execute({ id: order, cents: 0 }))
          assert.isTrue(Exit.isFailure(exit))
          if (Exit.isFailure(exit)) assert.include(String(exit.cause), "Declined")
          assert.deepStrictEqual(yield* effectsOf(order), ["reserve", `release:res-${order}`])
        })
      )

      it.effect(
        "S04 no reply within the step's timeout: the step fails with StepTimedOut and the saga compensates",
        () =>
          Effect.gen(function* () {
            const order = id("silent")
            const exit = yield* Effect.exit(OrderSaga.workflow.execute({ id: order, cents: 13 }))
            assert.isTrue(Exit.isFailure(exit))
            if (Exit.isFailure(exit)) assert.include(String(exit.cause), "StepTimedOut")
            assert.deepStrictEqual(yield* effectsOf(order), [
              "reserve",
              "charge",
              `refund:ch-${order}`,
              `release:res-${order}`
            ])
            const executionId = yield* OrderSaga.workflow.executionId({ id: order, cents: 13 })
            const silent = (yield* Saga.show(executionId)).steps.find((s) => s.step === "silent")!
            assert.strictEqual(silent.status, "failed")
            assert.include(silent.error!, "no reply within 1s")
          })
      )

      it.effect("S05 a reply delivered twice advances the saga once (the coordinator's inbox drops the copy)", () =>
        Effect.gen(function* () {
          const order = id("dup")
          yield* OrderSaga.workflow.execute({ id: order, cents: 100 })
          const { sql, table } = yield* SqlStore.SqlStore
          const rows = yield* sql.unsafe<{
            readonly message_id: string
            readonly data: string
            readonly headers: Record<string, string>
            readonly type: string
            readonly source: string
            readonly time: string
            readonly key: string | null
          }>(
            `SELECT message_id, data, headers, type, source, time, key FROM ${table("outbox")} WHERE topic = $1 AND data LIKE $2`,
            [replyTopic, `%"success"%`]
          ).withoutTransform
          const executionId = yield* OrderSaga.workflow.executionId({ id: order, cents: 100 })
          const reply = rows.find((r) => r.headers.correlationid === executionId)
          if (reply === undefined) return assert.fail("the charge reply went through the outbox")
          const broker = yield* Broker.Broker
          // the same message again, as a redelivery or a duplicate publish would bring it
          yield* broker.publish([
            {
              id: reply.message_id,
              topic: replyTopic,
              type: reply.type,
              source: reply.source,
              time: new Date(reply.time).toISOString(),
              key: reply.key ?? undefined,
              headers: reply.headers,
              attempt: 1,
              data: reply.data
            }
          ])
          const claims = () =>
            Effect.map(
              sql.unsafe<{ readonly n: number }>(
                `SELECT count(*)::int AS n FROM ${table("inbox")} WHERE message_id = $1 AND consumer = 'sagatest-coordinator'`,
                [reply.message_id]
              ),
              (r) => r[0]!.n
            )
          assert.strictEqual(yield* claims(), 1)
          yield* Effect.sleep(1500)
          assert.strictEqual(yield* claims(), 1)
          assert.deepStrictEqual(yield* effectsOf(order), ["reserve", "charge", "ship"])
          const detail = yield* Saga.show(executionId)
          assert.strictEqual(detail.steps.filter((s) => s.step.startsWith("charge")).length, 1)
          assert.strictEqual(detail.status, "completed")
        })
      )

      it.effect(
        "S06 a compensation failing 5 times parks the saga as needs-attention; resumed after the fix, it completes",
        () =>
          Effect.gen(function* () {
            const order = id("parked")
            faults.releaseFailures = 1_000
            const payload = { id: order, cents: 0 }
            const executionId = yield* OrderSaga.workflow.execute(payload, { discard: true })
            yield* eventually("parked", statusOf(executionId), (s) => s === "needs-attention")
            const parked = yield* Saga.show(executionId)
            assert.strictEqual(faults.releaseFailures, 1_000 - 5, "five attempts, then parked")
            assert.strictEqual(parked.parked?.step, "reserve")
            assert.include(parked.error!, "inventory service unavailable")
            const step = parked.steps.find((s) => s.phase === "compensation" && s.step === "reserve")!
            assert.strictEqual(step.status, "parked")
            assert.strictEqual(step.attempts, 5)
            assert.deepStrictEqual(
              (yield* Saga.list({ status: "needs-attention", name: "sagatest-order" })).map((s) => s.executionId),
              [executionId]
            )
            assert.deepStrictEqual(yield* effectsOf(order), ["reserve"], "nothing released while parked")
            // an operator fixes the cause and resumes
            faults.releaseFailures = 0
            yield* Saga.resume(executionId)
            yield* eventually("compensated", statusOf(executionId), (s) => s === "compensated")
            assert.deepStrictEqual(yield* effectsOf(order), ["reserve", `release:res-${order}`])
            const again = yield* Effect.flip(Saga.resume(executionId))
            assert.strictEqual(again._tag, "NotParked")
            const unknown = yield* Effect.flip(Saga.resume("no-such-saga"))
            assert.strictEqual(unknown._tag, "SagaNotFound")
          })
      )

      it.effect(
        "S07 an operator resolves a parked compensation by hand: the saga ends compensated, it is not applied",
        () =>
          Effect.gen(function* () {
            const order = id("resolved")
            faults.releaseFailures = 1_000
            const executionId = yield* OrderSaga.workflow.execute({ id: order, cents: 0 }, { discard: true })
            yield* eventually("parked", statusOf(executionId), (s) => s === "needs-attention")
            yield* Saga.resolve(executionId)
            yield* eventually("compensated", statusOf(executionId), (s) => s === "compensated")
            faults.releaseFailures = 0
            const detail = yield* Saga.show(executionId)
            assert.strictEqual(
              detail.steps.find((s) => s.phase === "compensation" && s.step === "reserve")?.status,
              "resolved"
            )
            assert.deepStrictEqual(yield* effectsOf(order), ["reserve"])
            const statuses = new Set((yield* Saga.list({ name: "sagatest-order" })).map((s) => s.status))
            for (const s of statuses) assert.include(SagaStore.statuses, s)
          })
      )
    })
  })
}
