/**
 * Consumer-runtime overhead: `Consumer.make` with a no-op handler on the
 * memory broker, against a raw broker subscription in the same run that does
 * the same work by hand (decode every delivery with the topic's Schema, run
 * the same handler Effect with the same concurrency, ack each read with one
 * `ackAll`). Both drain the same pre-published messages.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Broker, Consumer, Publisher, Topic } from "@converge/core"
import { Effect, Layer, Result, type Scope, Stream } from "effect"
import { type Bench, median, type Row, rate, round } from "./harness.ts"
import { type Order, Order as OrderSchema, order } from "./payload.ts"

const orders = Topic.make("bench-consumer", OrderSchema, { key: (o) => o.orderId })
const Live = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))

/** Publishes `count` orders, then times `drain` until all are handled. */
const timed = (count: number, drain: (done: () => void) => Effect.Effect<void, unknown, Broker.Broker | Scope.Scope>) =>
  Effect.runPromise(
    Effect.gen(function* () {
      const payloads = Array.from({ length: count }, (_, i) => order(i))
      for (let b = 0; b < count; b += 1000) yield* Publisher.publishAll(orders, payloads.slice(b, b + 1000))
      let handled = 0
      const all = Promise.withResolvers<void>()
      const start = performance.now()
      yield* drain(() => {
        if (++handled === count) all.resolve()
      })
      yield* Effect.promise(() => all.promise)
      return performance.now() - start
    }).pipe(Effect.scoped, Effect.provide(Live))
  )

/** The handler both paths run for every message: a no-op that counts. */
const handler = (done: () => void) => (_order: Order) => Effect.sync(done)

/**
 * The raw subscription: decode each delivery with the topic's Schema, run
 * the same handler Effect, and ack each read with one `ackAll` — what a
 * hand-rolled consumer on the `Broker` does, without the runtime's
 * classification, retries, context, lanes and shutdown.
 */
const raw = (count: number, concurrency: number) =>
  timed(count, (done) =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const handle = handler(done)
      yield* broker.subscribe({ topic: orders.name, group: "raw", consumer: "c0" }).pipe(
        Stream.runForEachArray((ds) =>
          Effect.andThen(
            Effect.forEach(
              ds,
              (d) => {
                const decoded = orders.decode(d.envelope.data)
                return Result.isFailure(decoded) ? Effect.die(decoded.failure) : handle(decoded.success)
              },
              { concurrency, discard: true }
            ),
            broker.ackAll(ds)
          )
        ),
        Effect.forkScoped
      )
    })
  )

/** The consumer runtime with a no-op handler. */
const runtime = (count: number, concurrency: number) =>
  timed(count, (done) =>
    Consumer.make(orders, {
      group: "runtime",
      consumer: "c0",
      concurrency,
      handle: handler(done)
    })
  )

const measure = async (concurrency: number): Promise<Row> => {
  const count = 50_000
  await raw(count, concurrency)
  await runtime(count, concurrency)
  const ours: Array<number> = []
  const theirs: Array<number> = []
  const ratios: Array<number> = []
  for (let i = 0; i < 7; i++) {
    const base = rate(count, await raw(count, concurrency))
    const msgs = rate(count, await runtime(count, concurrency))
    theirs.push(base)
    ours.push(msgs)
    ratios.push(msgs / base)
  }
  return {
    bench: `consumer/concurrency=${concurrency}`,
    msgs_per_s: round(median(ours)),
    baseline: "raw-subscription+decode+handler+ackAll",
    baseline_msgs_per_s: round(median(theirs)),
    ratio: round(median(ratios), 3)
  }
}

/** Consumer runtime vs raw subscription, at concurrency 1 and 16. */
export const benches: ReadonlyArray<Bench> = [1, 16].map((concurrency) => ({
  name: `consumer/concurrency=${concurrency}`,
  run: async () => [await measure(concurrency)]
}))
