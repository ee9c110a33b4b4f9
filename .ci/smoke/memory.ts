// A user's program, outside the workspace: publish and consume on the memory broker, from the packed tarballs.
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { Data, Deferred, Effect, Layer, Schema } from "effect"

const Order = Schema.Struct({ orderId: Schema.String, amountCents: Schema.Int })
const orders = Topic.make("orders", Order, { key: (o) => o.orderId })
class Declined extends Data.TaggedError("Declined")<{ readonly orderId: string }> {}

const program = Effect.gen(function* () {
  const done = yield* Deferred.make<ReadonlyArray<string>>()
  const billed: Array<string> = []
  yield* Consumer.make(orders, {
    group: "billing",
    handle: (order) =>
      order.amountCents <= 0
        ? Effect.fail(new Declined({ orderId: order.orderId }))
        : Effect.suspend(() => {
            billed.push(order.orderId)
            return billed.length === 3 ? Deferred.succeed(done, billed) : Effect.void
          }),
    errors: { Declined: "dead-letter" }
  })
  yield* Publisher.publishAll(orders, [
    { orderId: "o-0", amountCents: 0 },
    { orderId: "o-1", amountCents: 100 },
    { orderId: "o-2", amountCents: 200 },
    { orderId: "o-3", amountCents: 300 }
  ])
  const all = yield* Deferred.await(done).pipe(Effect.timeout("10 seconds"))
  const dead = yield* DeadLetter.list(orders.name)
  if (all.join() !== "o-1,o-2,o-3") return yield* Effect.die(`billed ${all.join()}`)
  if (dead.length !== 1 || dead[0]!.envelope?.key !== "o-0") return yield* Effect.die("o-0 not dead-lettered")
  return `memory: billed ${all.join(", ")}; dead-lettered ${dead[0]!.envelope?.key} (${dead[0]!.reason})`
})

const main = program.pipe(
  Effect.scoped,
  Effect.provide(Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer())))
)

Effect.runPromise(main).then(
  (line) => process.stdout.write(`${line}\n`),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
