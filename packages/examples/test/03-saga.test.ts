import { MemoryBroker } from "@converge/broker-memory"
import { assert, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { program } from "../src/03-saga/program.ts"
import * as Checkout from "../src/03-saga/saga.ts"
import { pgliteLayer } from "../src/embedded.ts"

it.live(
  "example 03 on PGlite: alice's checkout completes; bob's declined payment cancels his order; carol's stock shortage refunds her payment, then cancels her order",
  () =>
    Effect.gen(function* () {
      const summary = yield* Effect.scoped(program)
      assert.deepStrictEqual(summary.sagas, [
        {
          orderId: "order-1",
          status: "completed",
          steps: [
            "place-order:completed",
            "charge-payment:completed",
            "reserve-stock:completed",
            "confirm-order:completed"
          ]
        },
        {
          orderId: "order-2",
          status: "compensated",
          steps: ["place-order:completed", "charge-payment:failed", "undo place-order:completed"]
        },
        {
          orderId: "order-3",
          status: "compensated",
          steps: [
            "place-order:completed",
            "charge-payment:completed",
            "reserve-stock:failed",
            "undo charge-payment:completed",
            "undo place-order:completed"
          ]
        }
      ])
      assert.deepStrictEqual(summary.orders, [
        { id: "order-1", status: "confirmed" },
        { id: "order-2", status: "cancelled" },
        { id: "order-3", status: "cancelled" }
      ])
      assert.deepStrictEqual(summary.payments, [
        { id: "pay-order-1", status: "charged" },
        { id: "pay-order-3", status: "refunded" }
      ])
      assert.deepStrictEqual(summary.stock, [
        { sku: "cups", units: 3 },
        { sku: "tea", units: 8 }
      ])
      assert.deepStrictEqual(
        summary.loyalty,
        [{ customer: "alice", points: 24 }],
        "the cancelled orders' points were taken back"
      )
    }).pipe(
      Effect.provide(
        Checkout.layer({
          schema: "checkout",
          runnerStorage: "memory",
          stock: [
            ["tea", 10],
            ["cups", 3]
          ]
        }).pipe(Layer.provideMerge(MemoryBroker.layer({ orderedPerKey: true })), Layer.provideMerge(pgliteLayer))
      )
    ),
  60_000
)
