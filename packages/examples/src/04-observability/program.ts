/**
 * Example 04: what Converge records, and how to export it.
 *
 * - **metrics**: `effect/Metric` counters and histograms the runtime updates (see `Metrics` in
 *   `@converge/core`), served as Prometheus text by `effect/observability`'s `PrometheusMetrics` on
 *   `GET /metrics` (an `effect/http` server on `@effect/platform-node`);
 * - **traces**: with `OTEL_EXPORTER_OTLP_ENDPOINT` set (an OpenTelemetry collector, e.g.
 *   `http://127.0.0.1:4318`), `Otlp.layerJson` sends spans, metrics and logs there; the consumer's span
 *   continues the publisher's trace;
 * - **audit**: every lifecycle step of every message (`Audit`), here in memory; `AuditPg` keeps it in
 *   Postgres. The program prints one message's timeline.
 *
 * `pnpm --filter @converge/examples observability` runs it and prints the scrape; `KEEP_RUNNING=1` leaves
 * the endpoint up for `curl http://127.0.0.1:9464/metrics`.
 */
import { createServer } from "node:http"
import { MemoryBroker } from "@converge/broker-memory"
import { Audit, Consumer, DeadLetter, Publisher, Topic } from "@converge/core"
import { NodeHttpServer } from "@effect/platform-node"
import { Console, Data, Effect, Layer, Schedule, Schema } from "effect"
import { FetchHttpClient, HttpRouter } from "effect/http"
import { Otlp, PrometheusMetrics } from "effect/observability"

const Order = Schema.Struct({ id: Schema.String, cents: Schema.Int })
/** The example's topic. */
export const orders = Topic.make("shop.orders", Order, { key: (o) => o.id })
class GatewayTimeout extends Data.TaggedError("GatewayTimeout")<{}> {}
class CardDeclined extends Data.TaggedError("CardDeclined")<{}> {}

/** The Prometheus endpoint: `GET /metrics` on `127.0.0.1:port`. */
export const metricsEndpoint = (port: number) =>
  HttpRouter.serve(PrometheusMetrics.layerHttp({ path: "/metrics" }), {
    disableLogger: true,
    disableListenLog: true
  }).pipe(Layer.provide(NodeHttpServer.layer(() => createServer(), { port, host: "127.0.0.1" })))

/** OTLP export (traces, metrics, logs) to a collector, when its URL is given. */
export const otlp = (baseUrl: string) =>
  Otlp.layerJson({ baseUrl, resource: { serviceName: "converge-example" } }).pipe(Layer.provide(FetchHttpClient.layer))

/** Billing: one order's gateway times out once (retried), one card is declined (dead-lettered). */
export const program = Effect.gen(function* () {
  let timeouts = 1
  yield* Consumer.make(orders, {
    group: "billing",
    errors: { GatewayTimeout: "retry", CardDeclined: "dead-letter" },
    retry: Schedule.spaced("20 millis").pipe(Schedule.upTo({ times: 3 })),
    handle: (order): Effect.Effect<void, GatewayTimeout | CardDeclined> =>
      order.cents === 0
        ? Effect.fail(new CardDeclined())
        : order.id === "o-2" && timeouts-- > 0
          ? Effect.fail(new GatewayTimeout())
          : Effect.logInfo(`billing: billed ${order.id}`)
  })
  const receipts = yield* Effect.withSpan(
    Publisher.publishAll(
      orders,
      [
        { id: "o-1", cents: 1200 },
        { id: "o-2", cents: 800 },
        { id: "o-3", cents: 0 }
      ],
      { correlationId: "checkout-42" }
    ),
    "shop.checkout"
  )
  // wait until the three are settled (two handled, one dead-lettered)
  for (let i = 0; i < 200; i++) {
    const trail = yield* Audit.timeline("checkout-42")
    if (trail.filter((e) => e.kind === "handled" || e.kind === "dead-lettered").length === 3) break
    yield* Effect.sleep(10)
  }
  const timeline = yield* Audit.query({ messageId: receipts[1]!.id })
  const deadLetters = yield* DeadLetter.list(orders.name)
  return { receipts, timeline, deadLetters }
})

/** The example's services: the memory broker, the publisher, an in-memory audit trail. */
export const services = Publisher.layer({ source: "urn:example:shop" }).pipe(
  Layer.provideMerge(MemoryBroker.layer()),
  Layer.provideMerge(Audit.layerMemory({ deliveries: true }))
)

const main = Effect.gen(function* () {
  const result = yield* Effect.scoped(program)
  yield* Console.log("the audit timeline of o-2 (a timeout, retried, then billed):")
  for (const e of result.timeline) {
    yield* Console.log(
      `  ${new Date(e.at).toISOString()}  ${e.kind.padEnd(13)} ${e.group ?? ""} ${e.attempt === undefined ? "" : `attempt ${e.attempt}`} ${e.delayMs === undefined ? "" : `retry in ${e.delayMs} ms`}`
    )
  }
  const scrape = yield* Effect.promise(() => fetch("http://127.0.0.1:9464/metrics").then((r) => r.text()))
  yield* Console.log("\nGET http://127.0.0.1:9464/metrics (the converge_ lines):")
  for (const line of scrape.split("\n")) {
    if (line.startsWith("converge_messages")) yield* Console.log(`  ${line}`)
  }
  if (process.env.KEEP_RUNNING !== undefined) {
    yield* Console.log("\nthe endpoint stays up; Ctrl-C to stop")
    yield* Effect.never
  }
})

if (import.meta.main) {
  const endpoint = process.env.OTEL_EXPORTER_OTLP_ENDPOINT
  const exporters = endpoint === undefined ? metricsEndpoint(9464) : Layer.merge(metricsEndpoint(9464), otlp(endpoint))
  Effect.runPromise(main.pipe(Effect.provide(services), Effect.provide(exporters))).catch((e) => {
    process.stderr.write(`${String(e)}\n`)
    process.exitCode = 1
  })
}
