/**
 * Memory broker throughput: publish → consume → ack with Schema encode and
 * decode, against a hand-written baseline doing the same Schema encode +
 * `JSON.stringify` / `JSON.parse` + Schema decode through a plain array queue.
 *
 * A topic compiles its payload Schema with Effect's JIT (Topic option `jit`).
 * The baseline of every row runs Schema as a hand-written program does by
 * default, on Effect's interpreter; at batch 100 a second row compares the
 * same Converge runs with a baseline that compiles its Schema too, so the
 * table shows what Converge's own machinery costs over the bare codec work.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Broker, Publisher, Topic } from "@converge/core"
import { Effect, Layer, Result, Schema, Stream } from "effect"
import { type Bench, median, type Row, rate, round } from "./harness.ts"
import { makeOrderSchema, Order, order } from "./payload.ts"

const orders = Topic.make("bench-orders", Order, { key: (o) => o.orderId })

/** The Schema encode and decode of a baseline. */
interface Codec {
  readonly encode: (u: unknown) => Result.Result<unknown, unknown>
  readonly decode: (u: unknown) => Result.Result<unknown, unknown>
}

/**
 * A codec over an order Schema of its own: on Effect's interpreter, or compiled by its JIT the way a
 * topic compiles its Schema (making a topic over it registers the compiled code on the Schema).
 */
const makeCodec = (jit: boolean): Codec => {
  const schema = makeOrderSchema()
  if (jit) Topic.make("bench-baseline", schema)
  return { encode: Schema.encodeUnknownResult(schema), decode: Schema.decodeUnknownResult(schema) }
}

const interpreted = makeCodec(false)
const compiled = makeCodec(true)

/** The hand-written baseline: an array queue, the same codec work, nothing else. */
export const baseline = (count: number, batch: number, consumers: number, codec: Codec = interpreted): number => {
  const { decode, encode } = codec
  const payloads = Array.from({ length: count }, (_, i) => order(i))
  const queue: Array<string | undefined> = []
  let head = 0
  let consumed = 0
  const start = performance.now()
  for (let b = 0; b < count; b += batch) {
    const end = Math.min(count, b + batch)
    for (let i = b; i < end; i++) {
      const encoded = encode(payloads[i])
      if (Result.isFailure(encoded)) throw encoded.failure
      queue.push(JSON.stringify(encoded.success))
    }
    // consumers take turns draining, like competing consumers would
    for (let c = 0; c < consumers && head < queue.length; c++) {
      const share = Math.ceil((queue.length - head) / (consumers - c))
      for (let k = 0; k < share; k++) {
        const text = queue[head]!
        queue[head++] = undefined // a consumed message is released, as the broker's retention: 0 does
        const decoded = decode(JSON.parse(text))
        if (Result.isFailure(decoded)) throw decoded.failure
        consumed++
      }
    }
  }
  if (consumed !== count) throw new Error(`baseline consumed ${consumed} of ${count}`)
  return performance.now() - start
}

/** Converge on the memory broker: Publisher → Broker → typed decode → ack. */
export const converge = (count: number, batch: number, consumers: number): Promise<number> =>
  Effect.runPromise(
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const memory = yield* MemoryBroker.MemoryBroker
      const publisher = yield* Publisher.Publisher
      const payloads = Array.from({ length: count }, (_, i) => order(i))
      let consumed = 0
      let failed = 0
      const done = Promise.withResolvers<void>()
      for (let c = 0; c < consumers; c++) {
        yield* broker
          .subscribe({ topic: orders.name, group: "bench", consumer: `c${c}`, batchSize: Math.max(batch, 100) })
          .pipe(
            // decode every delivery of a read, then ack the read with one ackAll (like XACK with many ids)
            Stream.runForEachArray((deliveries) =>
              Effect.suspend((): Effect.Effect<number, unknown> => {
                for (const d of deliveries) {
                  const decoded = orders.decode(d.envelope.data)
                  if (Result.isFailure(decoded)) {
                    failed++
                    return Effect.fail(decoded.failure)
                  }
                }
                consumed += deliveries.length
                if (consumed === count) done.resolve()
                return broker.ackAll(deliveries)
              })
            ),
            Effect.forkScoped
          )
      }
      // the group must exist before the first publish: with retention 0, entries no group needs are dropped
      while (!(yield* memory.groups(orders.name)).includes("bench")) yield* Effect.sleep(1)
      const start = performance.now()
      for (let b = 0; b < count; b += batch) {
        yield* publisher.publishAll(orders, payloads.slice(b, Math.min(count, b + batch)))
        if (batch === 1 && b % 64 === 0) yield* Effect.yieldNow
      }
      yield* Effect.promise(() => done.promise)
      const elapsed = performance.now() - start
      if (failed > 0) throw new Error(`${failed} decode failures`)
      return elapsed
    }).pipe(
      Effect.scoped,
      Effect.provide(Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer({ retention: 0 }))))
    )
  )

// This VM's speed changes from one run to the next: the ratios of single adjacent pairs spread from
// ~0.5x to ~1.1x around ~0.75x. The median of 7 pairs still moved 0.63x-0.83x between invocations; of
// 15 pairs, 0.71x-0.80x (measured in four invocations each).
const runs = 15

const measure = async (batch: number, consumers: number): Promise<Array<Row>> => {
  const count = batch === 1 ? 20_000 : 50_000
  // at batch 100, each pair also runs the baseline with a compiled Schema (a second row)
  const withCompiled = batch === 100
  // warm up both paths (JIT), then alternate runs; this machine's speed drifts, so the
  // ratio is the median of the ratios of adjacent runs, and each rate the median of its runs
  baseline(count, batch, consumers)
  if (withCompiled) baseline(count, batch, consumers, compiled)
  await converge(count, batch, consumers)
  const ours: Array<number> = []
  const theirs: Array<number> = []
  const ratios: Array<number> = []
  const theirsCompiled: Array<number> = []
  const ratiosCompiled: Array<number> = []
  for (let i = 0; i < runs; i++) {
    const base = rate(count, baseline(count, batch, consumers))
    const baseCompiled = withCompiled ? rate(count, baseline(count, batch, consumers, compiled)) : undefined
    const msgs = rate(count, await converge(count, batch, consumers))
    theirs.push(base)
    ours.push(msgs)
    ratios.push(msgs / base)
    if (baseCompiled !== undefined) {
      theirsCompiled.push(baseCompiled)
      ratiosCompiled.push(msgs / baseCompiled)
    }
  }
  const name = `memory/batch=${batch}/consumers=${consumers}`
  const row: Row = {
    bench: name,
    msgs_per_s: round(median(ours)),
    baseline: "array-queue+schema+json",
    baseline_msgs_per_s: round(median(theirs)),
    ratio: round(median(ratios), 3)
  }
  if (!withCompiled) return [row]
  return [
    row,
    {
      bench: `memory-vs-jit-baseline/batch=${batch}/consumers=${consumers}`,
      msgs_per_s: round(median(ours)),
      baseline: "array-queue+schema-jit+json",
      baseline_msgs_per_s: round(median(theirsCompiled)),
      ratio: round(median(ratiosCompiled), 3)
    }
  ]
}

/** One benchmark per batch size × consumer count (at batch 100, two rows: see the module comment). */
export const benches: ReadonlyArray<Bench> = [1, 100, 1000].flatMap((batch) =>
  [1, 4, 16].map((consumers) => ({
    name: `memory/batch=${batch}/consumers=${consumers}`,
    run: () => measure(batch, consumers)
  }))
)
