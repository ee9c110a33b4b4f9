/**
 * The spans of a message's life, with an in-memory tracer: the outbox publish's producer span (a child of
 * the caller's), the relay's span linked to it, the consumer's handle span in the publisher's trace, and
 * a dead-letter span in the same trace.
 */
import { MemoryBroker } from "@converge/broker-memory"
import { Consumer, Topic } from "@converge/core"
import { PgClient } from "@effect/sql-pg"
import { assert, describe, layer } from "@effect/vitest"
import { Data, Effect, Layer, Option, Redacted, Schema, Tracer } from "effect"
import { Outbox, OutboxRelay, SqlStore } from "../src/index.ts"
import { freshSchemaLayer } from "./helpers/schema.ts"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const schema = `converge_spans_test_${process.pid}`
class Declined extends Data.TaggedError("Declined")<{}> {}
const orders = Topic.make("spans.orders", Schema.Struct({ id: Schema.String, ok: Schema.Boolean }))

const spans: Array<Tracer.NativeSpan> = []
const recording = Tracer.make({
  span: (options) => {
    const span = new Tracer.NativeSpan(options)
    spans.push(span)
    return span
  }
})

const Live = Layer.mergeAll(Outbox.layer(), OutboxRelay.layer({ pollInterval: "100 millis" })).pipe(
  Layer.provideMerge(SqlStore.layer({ schema, partitions: 2 })),
  Layer.provideMerge(MemoryBroker.layer()),
  Layer.provideMerge(freshSchemaLayer(schema)),
  Layer.provideMerge(PgClient.layer({ url: Redacted.make(url), maxConnections: 4 })),
  Layer.provideMerge(Layer.succeed(Tracer.Tracer, recording))
)

const named = (name: string) => spans.filter((s) => s.name === name)
const parentId = (s: Tracer.NativeSpan) => (Option.isSome(s.parent) ? s.parent.value.spanId : undefined)
const ancestors = (s: Tracer.AnySpan): Array<string> => {
  const out: Array<string> = []
  let at: Tracer.AnySpan = s
  while (at._tag === "Span" && Option.isSome(at.parent)) {
    at = at.parent.value
    out.push(at.spanId)
  }
  return out
}

describe("spans", () => {
  layer(Live, { timeout: 30_000, excludeTestServices: true })((it) => {
    it.effect("outbox publish → relay (linked) → handle and dead-letter, all in the publisher's trace", () =>
      Effect.gen(function* () {
        yield* Consumer.make(orders, {
          group: "billing",
          errors: { Declined: "dead-letter" },
          handle: (o) => (o.ok ? Effect.void : Effect.fail(new Declined()))
        })
        const request = yield* Effect.withSpan(
          Effect.andThen(
            Outbox.transaction(
              Outbox.publishAll(orders, [
                { id: "o-1", ok: true },
                { id: "o-2", ok: false }
              ])
            ),
            Effect.currentSpan
          ),
          "http.request"
        )
        for (let i = 0; i < 200 && named("converge.dead-letter spans.orders").length === 0; i++) yield* Effect.sleep(20)
        const [producer] = named("converge.outbox.publish spans.orders")
        assert.isDefined(producer)
        assert.strictEqual(producer!.traceId, request.traceId)
        // under the caller's span (the SQL transaction's span sits between them)
        assert.include(ancestors(producer!), request.spanId, "the producer span descends from the caller's")
        assert.strictEqual(producer!.kind, "producer")
        const [relay] = named("converge.relay")
        assert.isDefined(relay, "the relay's cycle has a span")
        assert.deepStrictEqual(
          relay!.links.map((l) => l.span.spanId),
          [producer!.spanId, producer!.spanId],
          "linked to the publisher's span, once per message"
        )
        const handles = named("converge.handle spans.orders")
        assert.strictEqual(handles.length, 2)
        for (const h of handles) {
          assert.strictEqual(h.traceId, request.traceId)
          assert.strictEqual(parentId(h), producer!.spanId)
          assert.strictEqual(h.kind, "consumer")
        }
        const [dead] = named("converge.dead-letter spans.orders")
        assert.strictEqual(dead!.traceId, request.traceId)
        assert.strictEqual(dead!.attributes.get("messaging.converge.dead_letter.reason"), "permanent")
      })
    )
  })
})
