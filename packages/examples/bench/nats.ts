/**
 * NATS JetStream benchmarks, at the `Broker` level (encoded envelopes; every body is `JSON.parse`d on the
 * consuming side, as the baselines do), each next to a hand-written loop on the same client
 * (`@nats-io/jetstream`) in the same run. Needs a NATS server with JetStream at `NATS_URL` (default
 * 127.0.0.1:4222).
 */
import { randomUUID } from "node:crypto"
import { NatsBroker, NatsClient } from "@converge/broker-nats"
import { Broker, Envelope, Topic } from "@converge/core"
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream"
import { connect } from "@nats-io/transport-node"
import { Effect, Layer, Result, type Scope } from "effect"
import { type Bench, consumeThroughBroker, pairs, row } from "./harness.ts"
import { Order, order } from "./payload.ts"

const servers = process.env.NATS_URL ?? "127.0.0.1:4222"
const orders = Topic.make("bench-nats", Order, { key: (o) => o.orderId })
const batch = 100
const count = 20_000

let cache: Array<Envelope.Encoded> | undefined
const messages = () => {
  if (cache !== undefined) return cache
  const iso = new Date().toISOString()
  cache = Array.from({ length: count }, (_, i) => {
    const r = Envelope.makeEncodedResult(orders, order(i), Date.now(), undefined, iso)
    if (Result.isFailure(r)) throw r.failure
    return r.success
  })
  return cache
}

/** Deletes the streams whose names start with `prefix`. */
const deleteStreams = async (prefix: string) => {
  const nc = await connect({ servers })
  const jsm = await jetstreamManager(nc)
  for await (const s of jsm.streams.list()) {
    if (s.config.name.startsWith(prefix)) await jsm.streams.delete(s.config.name).catch(() => false)
  }
  await nc.close()
}

/** Runs an Effect with a fresh broker (its own prefix), and deletes its streams afterwards. */
const withBroker = <A>(f: Effect.Effect<A, unknown, Broker.Broker | Scope.Scope>) => {
  const prefix = `cvbench_${randomUUID().slice(0, 8)}`
  return Effect.runPromise(
    f.pipe(
      Effect.scoped,
      Effect.provide(NatsBroker.layer({ prefix }).pipe(Layer.provide(NatsClient.layer({ servers }))))
    )
  ).finally(() => deleteStreams(`${prefix}_`))
}

/** A raw client, a stream of its own (file storage, as the broker's) and a durable consumer on it. */
const withRaw = async <A>(
  f: (
    js: ReturnType<typeof jetstream>,
    jsm: Awaited<ReturnType<typeof jetstreamManager>>,
    stream: string,
    subject: string
  ) => Promise<A>
) => {
  const nc = await connect({ servers })
  const jsm = await jetstreamManager(nc)
  const stream = `cvbench_raw_${randomUUID().slice(0, 8)}`
  const subject = `${stream}.orders`
  await jsm.streams.add({ name: stream, subjects: [subject] })
  try {
    return await f(jetstream(nc), jsm, stream, subject)
  } finally {
    await jsm.streams.delete(stream).catch(() => false)
    await nc.close()
  }
}

// --- publish -----------------------------------------------------------------

const publishConverge = () =>
  withBroker(
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const all = messages()
      const start = performance.now()
      for (let b = 0; b < all.length; b += batch) yield* broker.publish(all.slice(b, b + batch))
      return performance.now() - start
    })
  )

/** The hand-written baseline: `js.publish` of the JSON body with the message id, a batch in flight at once. */
const publishRaw = () =>
  withRaw(async (js, _jsm, _stream, subject) => {
    const all = messages()
    const start = performance.now()
    for (let b = 0; b < all.length; b += batch) {
      await Promise.all(all.slice(b, b + batch).map((m) => js.publish(subject, m.data, { msgID: m.id })))
    }
    return performance.now() - start
  })

// --- consume -----------------------------------------------------------------

/** Converge: subscribe, JSON.parse each body, one ackAll per read. */
const consumeConverge = () => withBroker(consumeThroughBroker(orders.name, messages(), batch))

/** The hand-written baseline: a durable consumer's `consume()` iterator, JSON.parse and `ack()` each. */
const consumeRaw = () =>
  withRaw(async (js, jsm, stream, subject) => {
    const all = messages()
    for (let b = 0; b < all.length; b += 1000) {
      await Promise.all(all.slice(b, b + 1000).map((m) => js.publish(subject, m.data, { msgID: m.id })))
    }
    await jsm.consumers.add(stream, { durable_name: "g", ack_policy: AckPolicy.Explicit })
    const consumer = await js.consumers.get(stream, "g")
    const start = performance.now()
    const iterator = await consumer.consume({ max_messages: batch })
    let consumed = 0
    for await (const m of iterator) {
      JSON.parse(new TextDecoder().decode(m.data))
      m.ack()
      if (++consumed >= all.length) break
    }
    const elapsed = performance.now() - start
    await iterator.close()
    return elapsed
  })

const compare = (
  name: string,
  baseline: string,
  ours: () => Promise<number>,
  theirs: () => Promise<number>
): Bench => ({
  name,
  run: async () => [row(name, baseline, await pairs(ours, theirs, count))]
})

/** The NATS benchmarks. */
export const benches: ReadonlyArray<Bench> = [
  compare("nats/publish", "@nats-io/jetstream js.publish, a batch in flight, msgID", publishConverge, publishRaw),
  compare("nats/consume", "@nats-io/jetstream consume() loop, JSON.parse + ack", consumeConverge, consumeRaw)
]
