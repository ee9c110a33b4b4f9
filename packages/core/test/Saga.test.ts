/**
 * Sagas on the in-memory workflow engine and the memory broker, with `TestClock`: the step order, the
 * compensation values and cause, a step timeout and the compensation retry driven by virtual time.
 * (The Postgres engine, crashes and the inbox are covered by `SagaTest` and the Postgres package.)
 */
import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Cause, Effect, Exit, Fiber, Layer, Option, Schema } from "effect"
import { TestClock } from "effect/testing"
import { WorkflowEngine } from "effect/workflow"
import { Audit, Consumer, Publisher, Saga, SagaStore, Topic } from "../src/index.ts"

class Declined extends Schema.TaggedError<Declined>()("Declined", { orderId: Schema.String }) {}
class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}

const chargeTopic = Topic.make("payments.charge", Schema.Struct({ orderId: Schema.String, cents: Schema.Int }))
const Charge = Saga.command(chargeTopic, { success: Schema.Struct({ chargeId: Schema.String }), error: Declined })
const Order = Schema.Struct({ id: Schema.String, cents: Schema.Int, sku: Schema.String })

const journal: Array<string> = []
let releaseFailures = 0

const PlaceOrder = Saga.make("place-order", {
  payload: Order,
  idempotencyKey: (o) => o.id,
  success: Schema.String,
  error: Schema.Union([Declined, OutOfStock])
})

const PlaceOrderLive = Saga.toLayer(PlaceOrder, (order) =>
  Effect.gen(function* () {
    const reservation = yield* Saga.step({
      name: "reserve",
      success: Schema.Struct({ reservationId: Schema.String, units: Schema.Int }),
      run: Effect.sync(() => {
        journal.push(`reserve ${order.id}`)
        return { reservationId: `r-${order.id}`, units: 2 }
      }),
      compensate: (r, cause) =>
        Effect.suspend(() => {
          if (releaseFailures > 0) {
            releaseFailures--
            journal.push(`release failed ${r.reservationId}`)
            return Effect.fail(new Error("inventory down"))
          }
          journal.push(
            `release ${r.reservationId} x${r.units} because ${Cause.squash(cause) instanceof OutOfStock ? "OutOfStock" : String(Cause.squash(cause))}`
          )
          return Effect.void
        })
    })
    const charge = yield* Saga.request(
      Charge,
      { orderId: order.id, cents: order.cents },
      {
        name: "charge",
        timeout: "30 seconds",
        compensate: (c) => Effect.sync(() => journal.push(`refund ${c.chargeId}`))
      }
    )
    yield* Saga.step({
      name: "ship",
      success: Schema.String,
      error: OutOfStock,
      run:
        order.sku === "none"
          ? Effect.fail(new OutOfStock({ sku: order.sku }))
          : Effect.sync(() => `shipped ${order.id}`)
    })
    return `${reservation.reservationId} ${charge.chargeId}`
  })
)

/** Payments answers, except for orders whose amount is 7 (it never replies: the timeout test). */
const payments = Consumer.make(chargeTopic, {
  group: "payments",
  handle: (command, context) =>
    command.cents === 7
      ? Effect.void
      : Saga.respond(Charge, (c) =>
          c.cents === 0
            ? Effect.fail(new Declined({ orderId: c.orderId }))
            : Effect.succeed({ chargeId: `ch-${c.orderId}` })
        )(command, context)
})
const replies = Consumer.make(Saga.replyTopic("saga.replies"), { group: "coordinator", handle: Saga.completeReply })

const Live = PlaceOrderLive.pipe(
  Layer.provideMerge(Saga.transportFromPublisher({ replyTopic: "saga.replies" })),
  Layer.provideMerge(SagaStore.layerMemory),
  Layer.provideMerge(Audit.layerMemory()),
  Layer.provideMerge(WorkflowEngine.layerMemory),
  Layer.provideMerge(Publisher.layer()),
  Layer.provideMerge(MemoryBroker.layer())
)

/** Runs a saga in the background while virtual time moves in steps of `step` ms. */
const runWithClock = <A, E, R>(effect: Effect.Effect<A, E, R>, step = 10, limit = 10_000) =>
  Effect.gen(function* () {
    const fiber = yield* Effect.forkChild(effect)
    for (let i = 0; i < limit; i++) {
      const done = fiber.pollUnsafe()
      if (done !== undefined) return done
      yield* Effect.yieldNow
      yield* TestClock.adjust(step)
    }
    return yield* Effect.die(new Error("the saga did not finish in virtual time"))
  }).pipe(Effect.flatten)

const start = Effect.andThen(payments, replies)

describe("Saga (in-memory engine, TestClock)", () => {
  it.effect(
    "the third step fails: steps 2 and 1 are compensated in that order, with their typed values and the cause",
    () =>
      Effect.gen(function* () {
        journal.length = 0
        yield* start
        const exit = yield* Effect.exit(
          runWithClock(PlaceOrder.workflow.execute({ id: "o1", cents: 100, sku: "none" }))
        )
        assert.isTrue(Exit.isFailure(exit))
        if (Exit.isFailure(exit))
          assert.deepStrictEqual(Cause.findErrorOption(exit.cause), Option.some(new OutOfStock({ sku: "none" })))
        assert.deepStrictEqual(journal, ["reserve o1", "refund ch-o1", "release r-o1 x2 because OutOfStock"])
        const [summary] = yield* Saga.list({ name: "place-order" })
        assert.strictEqual(summary?.status, "compensated")
        // the audit trail of the saga, and of the command and reply it exchanged, under its correlation id
        const trail = yield* Audit.timeline(summary!.executionId)
        assert.deepStrictEqual(
          trail.filter((e) => e.topic === "place-order").map((e) => `${e.kind} ${e.detail}`),
          [
            "saga-step-completed reserve",
            "saga-step-completed charge",
            "saga-step-failed ship",
            "compensation-completed charge",
            "compensation-completed reserve"
          ]
        )
        assert.deepStrictEqual(
          trail.filter((e) => e.topic === "payments.charge").map((e) => e.kind),
          ["published", "handled"]
        )
      }).pipe(Effect.scoped, Effect.provide(Live))
  )

  it.effect(
    "a step that gets no reply within its timeout (virtual time) fails with StepTimedOut; the saga compensates",
    () =>
      Effect.gen(function* () {
        journal.length = 0
        yield* start
        const fiber = yield* Effect.forkChild(
          Effect.exit(PlaceOrder.workflow.execute({ id: "o2", cents: 7, sku: "a" }))
        )
        // 29 s of virtual time: still waiting
        for (let i = 0; i < 290; i++) yield* TestClock.adjust(100)
        assert.isUndefined(fiber.pollUnsafe(), "no timeout before 30 s")
        assert.deepStrictEqual(journal, ["reserve o2"])
        // past 30 s: on until the saga has compensated (a loaded machine can register the step's timer, and the
        // compensation's, a few adjustments late; a fixed count then left the join waiting for time forever)
        for (let i = 0; i < 600 && fiber.pollUnsafe() === undefined; i++) yield* TestClock.adjust(100)
        const exit = yield* Fiber.join(fiber)
        assert.isTrue(Exit.isFailure(exit))
        if (Exit.isFailure(exit)) {
          const error = Cause.findErrorOption(exit.cause)
          assert.isTrue(Option.isSome(error) && error.value instanceof Saga.StepTimedOut)
        }
        assert.strictEqual(journal[0], "reserve o2")
        assert.strictEqual(journal.length, 2)
        assert.match(journal[1]!, /^release r-o2 x2 because .*no reply within 30s/)
      }).pipe(Effect.scoped, Effect.provide(Live))
  )

  it.effect(
    "a compensation that keeps failing is retried on its schedule (virtual time), then parked; resume completes it",
    () =>
      Effect.gen(function* () {
        journal.length = 0
        releaseFailures = 100
        yield* start
        const fiber = yield* Effect.forkChild(
          Effect.exit(PlaceOrder.workflow.execute({ id: "o3", cents: 0, sku: "a" }))
        )
        for (let i = 0; i < 400; i++) yield* TestClock.adjust(10) // 4 s: 100+200+400+800 ms of backoff fit
        assert.deepStrictEqual(journal.filter((j) => j.startsWith("release failed")).length, 5)
        const [parked] = yield* Saga.list({ status: "needs-attention" })
        assert.isDefined(parked)
        const detail = yield* Saga.show(parked!.executionId)
        assert.strictEqual(detail.parked?.step, "reserve")
        assert.include(detail.error!, "inventory down")
        releaseFailures = 0
        yield* Saga.resume(parked!.executionId)
        for (let i = 0; i < 50 && fiber.pollUnsafe() === undefined; i++) yield* TestClock.adjust(10)
        const exit = yield* Fiber.join(fiber)
        assert.isTrue(Exit.isFailure(exit))
        assert.match(journal.at(-1)!, /^release r-o3 x2 because/)
        assert.strictEqual((yield* Saga.show(parked!.executionId)).status, "compensated")
      }).pipe(Effect.scoped, Effect.provide(Live))
  )
})
