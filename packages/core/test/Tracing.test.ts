import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Layer, Schema, Tracer } from "effect"
import { TestClock } from "effect/testing"
import { Consumer, Publisher, Topic } from "../src/index.ts"

const Order = Schema.Struct({ id: Schema.String })
const orders = Topic.make("orders", Order, { key: (o) => o.id })

const Live = Publisher.layer().pipe(Layer.provideMerge(MemoryBroker.layer()))

interface Seen {
  readonly traceId: string | undefined
  readonly parentSpanId: string | undefined
  readonly name: string | undefined
  readonly traceparent: string | undefined
}

/** A consumer that reports the span its handler runs in, and the message's traceparent. */
const observe = Effect.gen(function* () {
  const seen = yield* Deferred.make<Seen>()
  yield* Consumer.make(orders, {
    group: "billing",
    handle: (_, ctx) =>
      Effect.flatMap(Effect.option(Effect.currentSpan), (span) =>
        Deferred.succeed(seen, {
          traceId: span._tag === "Some" ? span.value.traceId : undefined,
          parentSpanId:
            span._tag === "Some" && span.value.parent._tag === "Some" ? span.value.parent.value.spanId : undefined,
          name: span._tag === "Some" ? span.value.name : undefined,
          traceparent: ctx.headers.traceparent
        })
      )
  })
  return seen
})

describe("trace context", () => {
  it.effect("a message published inside a span is handled in that trace (W3C traceparent in the envelope)", () =>
    Effect.gen(function* () {
      const seen = yield* observe
      const request = yield* Effect.withSpan(
        Effect.flatMap(Effect.currentSpan, (span) =>
          Effect.as(Publisher.publish(orders, { id: "o-1" }), { traceId: span.traceId, spanId: span.spanId })
        ),
        "http.request"
      )
      yield* TestClock.adjust(10)
      const got = yield* Deferred.await(seen)
      assert.strictEqual(got.traceId, request.traceId, "the handler's span is in the publisher's trace")
      assert.match(got.traceparent!, /^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/)
      // the publish ran in a producer span (`converge.publish orders`, a child of the request): the message
      // names it, and the handler's span is its child
      const producerSpanId = got.traceparent!.split("-")[2]
      assert.notStrictEqual(producerSpanId, request.spanId)
      assert.strictEqual(got.parentSpanId, producerSpanId, "its parent is the producer span of the publish")
      assert.strictEqual(got.name, "converge.handle orders")
    }).pipe(Effect.provide(Live))
  )

  it.effect("a message published outside any span carries no traceparent, and its handler starts no span", () =>
    Effect.gen(function* () {
      const seen = yield* observe
      yield* Publisher.publish(orders, { id: "o-2" })
      yield* TestClock.adjust(10)
      const got = yield* Deferred.await(seen)
      assert.isUndefined(got.traceparent)
      assert.notStrictEqual(got.name, "converge.handle orders")
    }).pipe(Effect.provide(Live))
  )

  it.effect("no traceparent where propagation is disabled (Tracer.DisablePropagation)", () =>
    Effect.gen(function* () {
      const seen = yield* observe
      yield* Effect.withSpan(Publisher.publish(orders, { id: "o-3" }), "quiet").pipe(
        Effect.provideService(Tracer.DisablePropagation, true)
      )
      yield* TestClock.adjust(10)
      assert.isUndefined((yield* Deferred.await(seen)).traceparent)
    }).pipe(Effect.provide(Live))
  )
})
