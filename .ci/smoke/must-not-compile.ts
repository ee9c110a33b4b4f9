// Must NOT type-check: the handler can fail with Declined, and `errors` does not map it. The smoke test
// asserts tsc rejects this file, which proves the installed declarations are real types, not `any`.
import { Consumer, Topic } from "@converge/core"
import { Data, Effect, Schema } from "effect"

const orders = Topic.make("orders", Schema.Struct({ orderId: Schema.String }))
class Declined extends Data.TaggedError("Declined")<{ readonly orderId: string }> {}

export const consumer = Consumer.make(orders, {
  group: "billing",
  handle: (order) => Effect.fail(new Declined({ orderId: order.orderId })),
  errors: {}
})
