/**
 * `Metrics` — the runtime's metrics, on `effect/Metric` (stage 6). They are
 * updated by `Publisher`, `Consumer`, `DeadLetter`, `OutboxRelay` and sagas
 * wherever those run, and exported by whatever `effect/observability`
 * exporter the application installs: `PrometheusMetrics.layerHttp` (a
 * `/metrics` text endpoint) or `OtlpMetrics.layer` (push to a collector).
 *
 * | metric | kind | attributes |
 * |:--|:--|:--|
 * | `converge_messages_published_total` | counter | `topic` |
 * | `converge_messages_relayed_total` | counter | `topic` |
 * | `converge_messages_delivered_total` | counter | `topic`, `group` |
 * | `converge_messages_handled_total` | counter | `topic`, `group` |
 * | `converge_messages_retried_total` | counter | `topic`, `group` |
 * | `converge_messages_dead_lettered_total` | counter | `topic`, `group`, `reason` |
 * | `converge_messages_replayed_total` | counter | `topic` |
 * | `converge_messages_lost_in_broker_total` | counter | `topic`, `group` |
 * | `converge_saga_compensations_total` | counter | `saga` |
 * | `converge_sagas_parked_total` | counter | `saga` |
 * | `converge_handler_duration_seconds` | histogram | `topic`, `group` (one handler call in 16; every `handleBatch` message) |
 * | `converge_publish_to_handle_seconds` | histogram | `topic`, `group` (from the envelope's time; one message in 16) |
 * | `converge_relay_batch_size` | histogram | — |
 * | `converge_outbox_backlog` | gauge | — (`OutboxRelay`'s sampler) |
 * | `converge_outbox_oldest_age_seconds` | gauge | — |
 * | `converge_sagas_needing_attention` | gauge | — (`SagaPg`'s sampler) |
 * | `converge_consumer_group_lag` | gauge | `topic`, `group` (`sampleGroups`) |
 * | `converge_consumer_group_pending` | gauge | `topic`, `group` (`sampleGroups`) |
 *
 * @since 0.1.0
 */

import { Duration, Effect, Layer, Metric } from "effect"
import * as Broker from "./Broker.ts"

const seconds = Metric.exponentialBoundaries({ start: 0.0005, factor: 2, count: 20 })

/** Messages published by `Publisher` (outbox messages are counted by the relay: `relayed`). @since 0.1.0 */
export const published = Metric.counter("converge_messages_published_total", {
  description: "Messages published directly (outbox messages count as relayed)",
  incremental: true
})
/** Outbox rows the relay published. @since 0.1.0 */
export const relayed = Metric.counter("converge_messages_relayed_total", {
  description: "Outbox messages the relay published",
  incremental: true
})
/** Deliveries received by consumers. @since 0.1.0 */
export const delivered = Metric.counter("converge_messages_delivered_total", {
  description: "Deliveries received by consumers",
  incremental: true
})
/** Messages handled (acknowledged after the handler succeeded). @since 0.1.0 */
export const handled = Metric.counter("converge_messages_handled_total", {
  description: "Messages whose handler succeeded",
  incremental: true
})
/** Failed attempts that will be retried. @since 0.1.0 */
export const retried = Metric.counter("converge_messages_retried_total", {
  description: "Handler attempts that failed and will be retried",
  incremental: true
})
/** Messages dead-lettered. @since 0.1.0 */
export const deadLettered = Metric.counter("converge_messages_dead_lettered_total", {
  description: "Messages moved to the dead-letter queue",
  incremental: true
})
/** Pending entries the broker lost (deleted while pending, e.g. by a trim). @since 0.1.0 */
export const lostInBroker = Metric.counter("converge_messages_lost_in_broker_total", {
  description: "Pending entries the broker deleted before they were settled",
  incremental: true
})
/** Dead letters replayed. @since 0.1.0 */
export const replayed = Metric.counter("converge_messages_replayed_total", {
  description: "Dead letters replayed to their topic",
  incremental: true
})
/** Saga compensations completed. @since 0.1.0 */
export const compensated = Metric.counter("converge_saga_compensations_total", {
  description: "Saga compensations that completed",
  incremental: true
})
/** Sagas parked as needs-attention. @since 0.1.0 */
export const parked = Metric.counter("converge_sagas_parked_total", {
  description: "Sagas parked as needs-attention",
  incremental: true
})
/**
 * How long handlers take: one `handle` call in 16 is timed (timing every call cost the consumer benchmark
 * 40% of its throughput); a `handleBatch` call's time is spread over its messages.
 *
 * @since 0.1.0
 */
export const handlerDuration = Metric.histogram("converge_handler_duration_seconds", {
  description: "Handler duration per message",
  boundaries: seconds
})
/** From the message's publication (its envelope time) to its acknowledgement; one message in 16. @since 0.1.0 */
export const publishToHandle = Metric.histogram("converge_publish_to_handle_seconds", {
  description: "Latency from publication (envelope time) to handling",
  boundaries: seconds
})
/** Rows per relay cycle that published any. @since 0.1.0 */
export const relayBatchSize = Metric.histogram("converge_relay_batch_size", {
  description: "Messages published per relay cycle",
  boundaries: Metric.exponentialBoundaries({ start: 1, factor: 2, count: 14 })
})
/** Unpublished outbox rows (sampled). @since 0.1.0 */
export const outboxBacklog = Metric.gauge("converge_outbox_backlog", { description: "Unpublished outbox rows" })
/** Age of the oldest unpublished outbox row, in seconds (sampled). @since 0.1.0 */
export const outboxOldestAge = Metric.gauge("converge_outbox_oldest_age_seconds", {
  description: "Age of the oldest unpublished outbox row"
})
/** Sagas parked as needs-attention now (sampled). @since 0.1.0 */
export const sagasNeedingAttention = Metric.gauge("converge_sagas_needing_attention", {
  description: "Sagas parked as needs-attention"
})

const histogramBoundaries = new Map<string, ReadonlyArray<number>>([
  ["converge_handler_duration_seconds", seconds],
  ["converge_publish_to_handle_seconds", seconds],
  ["converge_relay_batch_size", Metric.exponentialBoundaries({ start: 1, factor: 2, count: 14 })]
])

/**
 * The same metric with fixed attributes, made once per attribute set and kept: the runtime's hot paths
 * update these. (`Metric.withAttributes` adds the attributes to the context at every update, and the
 * series key is then computed again each time: measured, it cost the consumer benchmark half its
 * throughput.)
 *
 * @since 0.1.0
 */
export const tagged = <State>(
  metric: Metric.Metric<number, State>
): ((attributes: Readonly<Record<string, string>>) => Metric.Metric<number, State>) => {
  const cache = new Map<string, Metric.Metric<number, State>>()
  return (attributes) => {
    const key = JSON.stringify(attributes)
    let m = cache.get(key)
    if (m === undefined) {
      const options = { description: metric.description, attributes }
      m = (metric.type === "Counter"
        ? Metric.counter(metric.id, { ...options, incremental: true })
        : metric.type === "Histogram"
          ? Metric.histogram(metric.id, { ...options, boundaries: histogramBoundaries.get(metric.id) ?? seconds })
          : Metric.gauge(metric.id, options)) as unknown as Metric.Metric<number, State>
      cache.set(key, m)
    }
    return m
  }
}

/** Messages a group has not received yet (sampled). @since 0.1.0 */
export const groupLag = Metric.gauge("converge_consumer_group_lag", {
  description: "Messages not yet delivered to the consumer group (delayed retries included)"
})
/** Messages delivered to a group and not settled (sampled). @since 0.1.0 */
export const groupPending = Metric.gauge("converge_consumer_group_pending", {
  description: "Messages delivered to the consumer group and not yet settled"
})

/**
 * Samples `converge_consumer_group_lag` and `converge_consumer_group_pending` for these groups every
 * `interval` (default 15 s) with the broker's `groupStats` (a broker without it: logged once, nothing
 * sampled). Run it in one process per deployment (the values are the broker's, not the process's).
 *
 * @since 0.1.0
 */
export const sampleGroups = (options: {
  readonly groups: ReadonlyArray<{ readonly topic: string; readonly group: string }>
  readonly interval?: Duration.Input | undefined
}): Layer.Layer<never, never, Broker.Broker> =>
  Layer.effectDiscard(
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const stats = broker.groupStats
      if (stats === undefined) {
        yield* Effect.logWarning(
          "metrics: this broker does not report group lag; converge_consumer_group_* not sampled"
        )
        return
      }
      const interval = Duration.fromInputUnsafe(options.interval ?? "15 seconds")
      const lagOf = tagged(groupLag)
      const pendingOf = tagged(groupPending)
      const sample = Effect.forEach(
        options.groups,
        ({ topic, group }) =>
          stats(topic, group).pipe(
            Effect.flatMap((s) =>
              Effect.andThen(
                Metric.update(lagOf({ topic, group }), s.lag),
                Metric.update(pendingOf({ topic, group }), s.pending)
              )
            ),
            Effect.catch((e) => Effect.logDebug(`metrics: sampling ${topic}/${group} failed`, e))
          ),
        { discard: true }
      )
      yield* Effect.forkScoped(Effect.forever(Effect.andThen(sample, Effect.sleep(interval))))
    })
  )
