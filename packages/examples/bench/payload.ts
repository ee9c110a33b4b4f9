/**
 * The benchmark payload: a flat order of about 200 bytes of JSON, and its
 * Schema. Every benchmark (and its baseline) uses the same payload.
 */
import { Schema } from "effect"

/**
 * A new instance of the order Schema (`qty` is `Schema.Int`, built afresh). Effect's Schema JIT is
 * registered per schema node, and a topic compiles its payload Schema: a hand-written baseline that
 * must run on Effect's interpreter takes an instance of its own, whose nodes no topic compiled.
 */
export const makeOrderSchema = () =>
  Schema.Struct({
    orderId: Schema.String,
    customerId: Schema.String,
    sku: Schema.String,
    qty: Schema.Number.check(Schema.isInt()),
    price: Schema.Number,
    total: Schema.Number,
    currency: Schema.Literals(["EUR", "USD"]),
    placedAt: Schema.String,
    note: Schema.String
  })

/** The order, ~200 bytes as JSON. */
export const Order = makeOrderSchema()

/** The order type. */
export type Order = typeof Order.Type

/** The i-th order. */
export const order = (i: number): Order => ({
  orderId: `ord-${i.toString().padStart(10, "0")}`,
  customerId: `cust-${(i % 997).toString().padStart(6, "0")}`,
  sku: `SKU-${(i % 5000).toString().padStart(6, "0")}`,
  qty: 1 + (i % 5),
  price: 40.5 + (i % 100),
  total: (1 + (i % 5)) * (40.5 + (i % 100)),
  currency: i % 2 === 0 ? "EUR" : "USD",
  placedAt: "2026-11-26T10:00:00.000Z",
  note: "leave at the door, please"
})
