/**
 * Example 03, narrated: three checkouts through the saga of `saga.ts`.
 *
 * - alice's order goes through: placed, charged, stock reserved, confirmed;
 * - bob's card is declined: the payment step fails, so the one completed step
 *   is undone — his order is cancelled (and the loyalty service, hearing
 *   `orders.cancelled`, takes back his points);
 * - carol asks for more cups than there are: the stock step fails, so the
 *   completed steps are undone newest first — her payment is refunded, then
 *   her order is cancelled.
 *
 * Runs on the broker and `SqlClient` in context (`pnpm demo` provides them).
 */
import { Saga, type SagaStore } from "@converge/core"
import { SqlStore } from "@converge/store-postgres"
import { Console, Effect, Exit } from "effect"
import { type Checkout, CheckoutSaga } from "./saga.ts"

/** The three checkouts. */
export const checkouts: ReadonlyArray<Checkout> = [
  { orderId: "order-1", customer: "alice", sku: "tea", quantity: 2, cents: 2_400 },
  { orderId: "order-2", customer: "bob", sku: "tea", quantity: 1, cents: 90_000 },
  { orderId: "order-3", customer: "carol", sku: "cups", quantity: 50, cents: 12_500 }
]

const line = (step: SagaStore.StepRecord) => {
  const what = step.phase === "action" ? step.step : `undo ${step.step}`
  const took = step.finishedAt === undefined ? "" : ` (${step.finishedAt - step.startedAt} ms)`
  const detail = step.error ?? (step.result === "null" ? "" : (step.result ?? ""))
  return `    ${what.padEnd(22)} ${step.status.padEnd(10)}${took} ${detail}`
}

/** What the run left in each service's tables. */
export interface Summary {
  readonly sagas: ReadonlyArray<{
    readonly orderId: string
    readonly status: SagaStore.Status
    readonly steps: ReadonlyArray<string>
  }>
  readonly orders: ReadonlyArray<{ readonly id: string; readonly status: string }>
  readonly payments: ReadonlyArray<{ readonly id: string; readonly status: string }>
  readonly stock: ReadonlyArray<{ readonly sku: string; readonly units: number }>
  readonly loyalty: ReadonlyArray<{ readonly customer: string; readonly points: number }>
}

/** Runs the three checkouts, narrating each, and returns what the services' tables hold. */
export const program = Effect.gen(function* () {
  const sagas: Array<Summary["sagas"][number]> = []
  for (const checkout of checkouts) {
    yield* Console.log(
      `${checkout.customer} checks out ${checkout.quantity} × ${checkout.sku} for ${(checkout.cents / 100).toFixed(2)} € (${checkout.orderId})`
    )
    const exit = yield* Effect.exit(CheckoutSaga.workflow.execute(checkout))
    const executionId = yield* CheckoutSaga.workflow.executionId(checkout)
    const detail = yield* Saga.show(executionId)
    for (const step of detail.steps) yield* Console.log(line(step))
    yield* Console.log(
      Exit.isSuccess(exit)
        ? `  → ${detail.status}: paid with ${exit.value.paymentId}\n`
        : `  → ${detail.status}: the completed steps were undone, newest first\n`
    )
    sagas.push({
      orderId: checkout.orderId,
      status: detail.status,
      steps: detail.steps.map((s) => `${s.phase === "action" ? "" : "undo "}${s.step}:${s.status}`)
    })
  }
  // the refund and the loyalty updates are messages: give them a moment to be handled
  const { sql, table } = yield* SqlStore.SqlStore
  const read = Effect.all({
    orders: sql.unsafe<{ readonly id: string; readonly status: string }>(
      `SELECT id, status FROM ${table("orders")} ORDER BY id`
    ),
    payments: sql.unsafe<{ readonly id: string; readonly status: string }>(
      `SELECT id, status FROM ${table("payments")} ORDER BY id`
    ),
    stock: sql.unsafe<{ readonly sku: string; readonly units: number }>(
      `SELECT sku, units FROM ${table("stock")} ORDER BY sku`
    ),
    loyalty: sql.unsafe<{ readonly customer: string; readonly points: number }>(
      `SELECT customer, points FROM ${table("loyalty")} ORDER BY customer`
    )
  })
  let state = yield* read
  for (
    let i = 0;
    i < 100 &&
    (state.payments.some((p) => p.status === "charged" && p.id !== "pay-order-1") || state.loyalty.length !== 1);
    i++
  ) {
    yield* Effect.sleep(50)
    state = yield* read
  }
  yield* Console.log("What the services hold now")
  yield* Console.log(`  orders:    ${state.orders.map((o) => `${o.id} ${o.status}`).join(", ")}`)
  yield* Console.log(`  payments:  ${state.payments.map((p) => `${p.id} ${p.status}`).join(", ")}`)
  yield* Console.log(`  stock:     ${state.stock.map((s) => `${s.sku} ${s.units}`).join(", ")}`)
  yield* Console.log(
    `  loyalty:   ${state.loyalty.map((l) => `${l.customer} ${l.points} points`).join(", ")} (bob's and carol's points were taken back)`
  )
  return { sagas, ...state } satisfies Summary
}).pipe(Effect.orDie)
