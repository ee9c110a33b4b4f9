/**
 * `Publisher` — typed, direct publishing through the `Broker`.
 *
 * `Publisher.publish(topic, payload)` builds the envelope (UUIDv7 id, `Clock`
 * time), encodes the payload with the topic's Schema and appends it through
 * the `Broker`. Use it for messages that do not come from a database
 * transaction; to publish together with your business writes, use the
 * transactional outbox instead (a message published here after a commit can
 * be lost if the process dies between the commit and the publish).
 *
 * @since 0.1.0
 */
import { Clock, Context, Effect, Layer, type Metric, Result } from "effect"
import * as Audit from "./Audit.ts"
import { Broker } from "./Broker.ts"
import type { BrokerError } from "./BrokerError.ts"
import * as Envelope from "./Envelope.ts"
import * as Metrics from "./Metrics.ts"
import type { InvalidName } from "./Name.ts"
import type * as Topic from "./Topic.ts"

/**
 * What a successful publish returns.
 *
 * @since 0.1.0
 */
export interface Receipt {
  /** The message id (UUIDv7 unless given). */
  readonly id: string
  /** The broker's entry id. */
  readonly entryId: string
}

/**
 * Every way a publish can fail.
 *
 * @since 0.1.0
 */
export type PublishError = BrokerError | Envelope.PayloadError | Envelope.MalformedEnvelope | InvalidName

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /**
   * CloudEvents `source` of every message (default `urn:converge`), e.g. `urn:acme:orders-service`.
   * Must not be empty: publishes then fail with `MalformedEnvelope`.
   */
  readonly source?: string | undefined
}

/**
 * The publisher service.
 *
 * @since 0.1.0
 */
export class Publisher extends Context.Service<
  Publisher,
  {
    /** Publishes one message. */
    readonly publish: <A, I>(
      topic: Topic.Topic<A, I>,
      payload: A,
      options?: Envelope.MakeOptions
    ) => Effect.Effect<Receipt, PublishError>
    /** Publishes many messages of one topic as one broker batch, in order. */
    readonly publishAll: <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      options?: Envelope.MakeOptions
    ) => Effect.Effect<ReadonlyArray<Receipt>, PublishError>
  }
>()("@converge/core/Publisher") {}

/**
 * Builds a publisher over the `Broker` in context.
 *
 * @since 0.1.0
 */
export const make = (options?: Options): Effect.Effect<Publisher["Service"], never, Broker> =>
  Effect.gen(function* () {
    const broker = yield* Broker
    const source = options?.source
    // one prepared counter per topic; updated synchronously with the registry's context, read once
    const publishedBy = Metrics.tagged(Metrics.published)
    const publishedOf = new Map<string, Metric.Metric<number, unknown>>()
    const metricsContext = yield* Effect.context<never>()
    const countPublished = (topic: string, n: number) => {
      let m = publishedOf.get(topic)
      if (m === undefined) {
        m = publishedBy({ topic })
        publishedOf.set(topic, m)
      }
      m.updateUnsafe(n, metricsContext)
    }
    // one fiber read per publish: the clock, the current span (trace context; a producer span when the
    // caller is traced) and the audit sink of the caller's context (the audit layer may sit above this one)
    const publishAll = <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      makeOptions?: Envelope.MakeOptions
    ): Effect.Effect<ReadonlyArray<Receipt>, PublishError> =>
      Effect.withFiber((fiber) => {
        const span = fiber.cache.span
        const traced = span !== undefined && span._tag === "Span"
        const run = Effect.flatMap(
          traced ? Envelope.withTraceContext(makeOptions) : Effect.succeed(makeOptions),
          (withContext) => publishIn(topic, payloads, withContext, fiber.getRef(Audit.AuditSink))
        )
        return traced ? Envelope.producerSpan(topic.name, "converge.publish", run) : run
      })
    const publishIn = <A, I>(
      topic: Topic.Topic<A, I>,
      payloads: Iterable<A>,
      makeOptions: Envelope.MakeOptions | undefined,
      audit: Audit.Sink
    ): Effect.Effect<ReadonlyArray<Receipt>, PublishError> =>
      Effect.flatMap(Clock.currentTimeMillis, (now): Effect.Effect<ReadonlyArray<Receipt>, PublishError> => {
        const made = Envelope.makeEncodedAllResult(topic, payloads, now, makeOptions, source)
        if (Result.isFailure(made)) return Effect.fail(made.failure)
        const encoded = made.success
        if (encoded.length === 0) return Effect.succeed([])
        const published = Effect.map(broker.publish(encoded), (entryIds) => {
          countPublished(topic.name, encoded.length)
          return encoded.map((e, i): Receipt => ({ id: e.id, entryId: entryIds[i]! }))
        })
        return audit.enabled
          ? Effect.tap(published, () =>
              Audit.recordWith(audit, "enqueue", "published", encoded, () => ({ detail: "direct" }))
            )
          : published
      })
    return Publisher.of({
      publishAll,
      publish: (topic, payload, makeOptions) =>
        Effect.map(publishAll(topic, [payload], makeOptions), (receipts) => receipts[0]!)
    })
  })

/**
 * The publisher as a Layer (requires `Broker`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Publisher, never, Broker> =>
  Layer.effect(Publisher, make(options))

/**
 * Publishes one message with the `Publisher` in context.
 *
 * @since 0.1.0
 */
export const publish = <A, I>(
  topic: Topic.Topic<A, I>,
  payload: A,
  options?: Envelope.MakeOptions
): Effect.Effect<Receipt, PublishError, Publisher> => Publisher.use((p) => p.publish(topic, payload, options))

/**
 * Publishes a batch with the `Publisher` in context.
 *
 * @since 0.1.0
 */
export const publishAll = <A, I>(
  topic: Topic.Topic<A, I>,
  payloads: Iterable<A>,
  options?: Envelope.MakeOptions
): Effect.Effect<ReadonlyArray<Receipt>, PublishError, Publisher> =>
  Publisher.use((p) => p.publishAll(topic, payloads, options))
