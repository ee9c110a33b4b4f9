/**
 * `NatsBroker` — the `Broker` on NATS JetStream.
 *
 * It requires {@link NatsClient.NatsClient} (`NatsClient.layer({ servers })`), as the Redis layer requires
 * `Redis`. Every mechanism is JetStream's own, used through the official client (`@nats-io/jetstream`):
 *
 * - **Topics** are streams, one per topic (`<prefix>_<topic>`, subject `<prefix>.t.<topic>`, a `.` in a name
 *   written `~`), created at the first publish or subscribe: file storage (or memory), `replicas` copies on
 *   a JetStream cluster, the messages kept (or the newest `maxMessages`), deduplicated by message id.
 * - **Publish** is `js.publish` with the message id as `Nats-Msg-Id`: stored when the server's `PubAck`
 *   comes back, and a second publish of the same id within `duplicateWindow` (an outbox relay that died
 *   between publish and mark) is dropped by the server and answered with the first one's sequence. A
 *   replay from the dead-letter queue gets an id of its own (`<id>:replay:<dead letter id>`), so it is not
 *   taken for a duplicate. Entries carry the CloudEvents attributes in one JSON header `ce`, the payload as
 *   the body; entry ids are stream sequence numbers.
 * - **Groups** are durable pull consumers (explicit acks, from the stream's start, `ack_wait` = the
 *   subscription's `claimIdle`); the consumers of a group share it, each message going to one of them.
 *   A message not acked within `ack_wait` is redelivered by the server to any of them (the claim of a dead
 *   consumer's messages), its delivery count (`info.deliveryCount`) one higher.
 * - **Settlement**: ack is a double ack (confirmed), `ackAll` one `ACK` each and one round trip; nack is
 *   `NAK` with the delay (the server's own timer); a new attempt number goes to the `<prefix>_attempts`
 *   stream (the newest per message) and is read back on redelivery; dead-letter publishes the message
 *   with its reason to the `<prefix>_dlq` stream (subject per topic), then `TERM`s it.
 * - **Reconnects** are the client's (see `NatsClient`); a consume session whose consumer or stream was
 *   deleted is recreated with backoff (`GroupRecreated`).
 *
 * - **Per-key order** (`orderedPerKey`): a subject per partition and, per group, a consumer per partition
 *   with `max_ack_pending: 1`, so the server holds a partition's next message while one is in flight.
 *
 * Not supported (the conformance suite skips these cases, saying why): the report of messages removed while
 * pending (`LostInBroker`): a JetStream consumer skips a purged message without telling its client; and a
 * claim may hand a message back to the consumer still holding it (`claimSkipsHolder: false`).
 *
 * @since 0.1.0
 */
import { Broker, BrokerError, Envelope, Partition } from "@converge/core"
import type { PubAck } from "@nats-io/jetstream"
import { Config, Duration, Effect, Layer, Result, type Scope } from "effect"
import { deadLetterInfoOf, fieldsOf, toMessage } from "./internal/codec.ts"
import { type Context, checkName, ensureDeadLetters, ensureTopic } from "./internal/context.ts"
import { ackAll } from "./internal/delivery.ts"
import { attempt, fail, fromNats } from "./internal/errors.ts"
import * as Names from "./internal/names.ts"
import { subscribe } from "./internal/subscription.ts"
import { NatsClient } from "./NatsClient.ts"

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Prefix of every stream and subject (default `converge`): letters, digits, `_`, `-`. */
  readonly prefix?: string | undefined
  /** Where streams keep their messages (default `file`). */
  readonly storage?: "file" | "memory" | undefined
  /** Copies of each stream on a JetStream cluster (default 1; at most 5). */
  readonly replicas?: number | undefined
  /** How long the server remembers message ids to drop a repeated publish (default 2 minutes). */
  readonly duplicateWindow?: Duration.Input | undefined
  /** Keep at most this many messages per topic stream (default: all). */
  readonly maxMessages?: number | undefined
  /** Messages a group may have delivered and not settled, over all its consumers (default 10 000). */
  readonly maxAckPending?: number | undefined
  /** How long the attempt number of a nacked message is kept (default 14 days). */
  readonly attemptsMaxAge?: Duration.Input | undefined
  /** How long a publish waits for the server's ack (default 5 seconds). */
  readonly publishTimeout?: Duration.Input | undefined
  /**
   * Per-key order (default false): a topic's messages go to `partitions` subjects by a hash of their key
   * (`Partition.ofMessage`), each read by a consumer of its own per group with one message in flight
   * (`max_ack_pending: 1`): a key's next message waits while one is held, nacked or backing off, and the
   * group's consumers share the partitions. A partition then moves one message per round trip: use several.
   * Publishers and consumers of a topic must agree (the stream records it; a broker configured otherwise
   * fails with `InvalidArgument`).
   */
  readonly orderedPerKey?: boolean | undefined
  /** Partitions of an ordered topic (default 1; 1–1024; only with `orderedPerKey`). */
  readonly partitions?: number | undefined
}

/** The `Nats-Msg-Id` of a message: its id, or for a replay its id and the dead letter's. */
const msgIdOf = (e: Envelope.Encoded): string => {
  const replay = e.headers[Envelope.Headers.replay]
  return replay === undefined ? e.id : `${e.id}:replay:${replay}`
}

/**
 * Builds the broker over the `NatsClient` in context. Invalid options fail with `InvalidArgument` naming the
 * option.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<Broker.Broker["Service"], BrokerError.BrokerError, NatsClient | Scope.Scope> =>
  Effect.gen(function* () {
    const client = yield* NatsClient
    const prefix = options?.prefix ?? "converge"
    if (!Names.prefixPattern.test(prefix)) {
      return yield* fail(
        new BrokerError.InvalidArgument({
          argument: "prefix",
          message: `prefix ${JSON.stringify(prefix)} must be 1-64 letters, digits, '_' or '-'`
        })
      )
    }
    const replicas = yield* Broker.checkInteger("replicas", options?.replicas ?? 1, 1, 5)
    const maxAckPending = yield* Broker.checkInteger("maxAckPending", options?.maxAckPending ?? 10_000, 1, 1_000_000)
    const ordered = options?.orderedPerKey ?? false
    const partitions = yield* Broker.checkInteger("partitions", options?.partitions ?? 1, 1, 1024)
    if (!ordered && partitions > 1) {
      return yield* fail(
        new BrokerError.InvalidArgument({
          argument: "partitions",
          message: `partitions (${partitions}) needs orderedPerKey: true on NATS, where an unordered group reads the whole topic with one consumer`
        })
      )
    }
    if (options?.maxMessages !== undefined) {
      yield* Broker.checkInteger("maxMessages", options.maxMessages, 1, Number.MAX_SAFE_INTEGER)
    }
    let closed = false
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        closed = true
      })
    )
    const ctx: Context = {
      connection: client.connection,
      js: client.jetstream,
      jsm: client.manager,
      names: Names.make(prefix),
      storage: options?.storage ?? "file",
      replicas,
      duplicateWindowMs: Duration.toMillis(Duration.fromInputUnsafe(options?.duplicateWindow ?? "2 minutes")),
      maxMessages: options?.maxMessages,
      maxAckPending,
      attemptsMaxAgeMs: Duration.toMillis(Duration.fromInputUnsafe(options?.attemptsMaxAge ?? "14 days")),
      publishTimeoutMs: Duration.toMillis(Duration.fromInputUnsafe(options?.publishTimeout ?? "5 seconds")),
      streams: new Set(),
      ordered,
      partitions,
      isClosed: () => closed
    }
    const names = ctx.names

    const guard = <A>(f: Effect.Effect<A, BrokerError.BrokerError>) =>
      closed ? fail(new BrokerError.BrokerClosed({ message: "the broker layer was shut down" })) : f

    const publishEach: Broker.Broker["Service"]["publishEach"] = (messages) =>
      guard(
        Effect.gen(function* () {
          // each topic of the batch checked and its stream ensured once; a bad topic fails its messages alone
          const topicErrors = new Map<string, BrokerError.BrokerError | undefined>()
          for (const e of messages) {
            if (topicErrors.has(e.topic)) continue
            const ready = yield* Effect.result(Effect.andThen(checkName("topic", e.topic), ensureTopic(ctx, e.topic)))
            topicErrors.set(e.topic, Result.isFailure(ready) ? ready.failure : undefined)
          }
          // then every message in flight at once (the client pipelines them on the connection)
          const send = (e: Envelope.Encoded, subject: string) => {
            const { headers, data } = toMessage(e)
            return ctx.js.publish(subject, data, { msgID: msgIdOf(e), headers, timeout: ctx.publishTimeoutMs })
          }
          const outcomes: Array<Broker.PublishOutcome> = new Array(messages.length)
          const stored = (i: number, ack: PubAck) => {
            outcomes[i] = { _tag: "Stored", entryId: String(ack.seq) }
          }
          const failed = (i: number, error: BrokerError.BrokerError) => {
            outcomes[i] = { _tag: "Failed", error }
          }
          const ready: Array<number> = []
          messages.forEach((e, i) => {
            const refused = topicErrors.get(e.topic)
            if (refused === undefined) ready.push(i)
            else failed(i, refused)
          })
          if (!ordered) {
            // every message in flight at once (the client pipelines them on the connection)
            yield* Effect.promise(() =>
              Promise.all(
                ready.map((i) =>
                  send(messages[i]!, names.subject(messages[i]!.topic)).then(
                    (ack) => stored(i, ack),
                    (cause) => failed(i, fromNats("publish")(cause))
                  )
                )
              )
            )
            return outcomes
          }
          // ordered: a partition's messages one after another (partitions at once), and none after a retryable
          // failure, so a key's messages are never stored out of order; a refused message fails alone
          const byPartition = new Map<string, Array<number>>()
          for (const i of ready) {
            const e = messages[i]!
            const subject = names.partitionSubject(e.topic, Partition.ofMessage(e, partitions))
            const list = byPartition.get(subject) ?? []
            list.push(i)
            byPartition.set(subject, list)
          }
          yield* Effect.promise(() =>
            Promise.all(
              Array.from(byPartition, async ([subject, indexes]) => {
                let stop: BrokerError.BrokerError | undefined
                for (const i of indexes) {
                  if (stop !== undefined) {
                    failed(
                      i,
                      BrokerError.make(
                        new BrokerError.CommandFailed({
                          command: "publish",
                          message: `not attempted: an earlier message of its partition failed (${stop.message})`,
                          retryable: true
                        })
                      )
                    )
                    continue
                  }
                  try {
                    stored(i, await send(messages[i]!, subject))
                  } catch (cause) {
                    const error = fromNats("publish")(cause)
                    failed(i, error)
                    if (error.isRetryable) stop = error
                  }
                }
              })
            )
          )
          return outcomes
        })
      )

    const publish: Broker.Broker["Service"]["publish"] = (messages) =>
      Effect.flatMap(publishEach(messages), (outcomes) => {
        const ids: Array<string> = []
        for (const o of outcomes) {
          if (o._tag === "Failed") return Effect.fail(o.error)
          ids.push(o.entryId)
        }
        return Effect.succeed(ids)
      })

    const deadLetters: Broker.Broker["Service"]["deadLetters"] = (topic, opts) =>
      Effect.gen(function* () {
        yield* checkName("topic", topic)
        yield* ensureDeadLetters(ctx)
        const parse = (id: string) => {
          const n = Number(id)
          return Number.isSafeInteger(n) && n >= 1
            ? Effect.succeed(n)
            : fail(
                new BrokerError.InvalidArgument({
                  argument: "id",
                  message: `${JSON.stringify(id)} is not a dead-letter id (a stream sequence number)`
                })
              )
        }
        let seq =
          opts?.after !== undefined
            ? (yield* parse(opts.after)) + 1
            : opts?.from !== undefined
              ? yield* parse(opts.from)
              : 1
        const limit = opts?.limit ?? Number.POSITIVE_INFINITY
        const out: Array<Broker.DeadLetter> = []
        while (out.length < limit) {
          const stored = yield* attempt("dead-letter read", () =>
            ctx.jsm.direct.getMessage(names.dlqStream, { seq, next_by_subj: names.dlqSubject(topic) })
          ).pipe(
            Effect.catchIf(
              (e) => /no message found|not found/i.test(e.message),
              () => Effect.succeed(null)
            )
          )
          if (stored === null) break
          const fields = fieldsOf(stored.header, stored.data)
          const info = deadLetterInfoOf(stored.header)
          const read = Envelope.fromFields(fields)
          out.push({
            id: String(stored.seq),
            topic,
            group: info.group,
            originalEntryId: info.entry,
            reason: info.reason,
            error: info.error,
            attempts: info.attempts,
            deliveryCount: info.deliveries,
            time: info.time,
            fields,
            envelope: Result.isSuccess(read) ? read.success : undefined
          })
          seq = stored.seq + 1
        }
        return out
      })

    const purgeDeadLetters: Broker.Broker["Service"]["purgeDeadLetters"] = (topic, ids) =>
      Effect.gen(function* () {
        yield* checkName("topic", topic)
        yield* ensureDeadLetters(ctx)
        if (ids === undefined) {
          const purged = yield* attempt("dead-letter purge", () =>
            ctx.jsm.streams.purge(names.dlqStream, { filter: names.dlqSubject(topic) })
          )
          return purged.purged
        }
        // only ids of this topic's queue: read each before deleting it
        let n = 0
        for (const id of ids) {
          const seq = Number(id)
          if (!Number.isSafeInteger(seq) || seq < 1) continue
          const stored = yield* attempt("dead-letter read", () =>
            ctx.jsm.direct.getMessage(names.dlqStream, { seq })
          ).pipe(Effect.orElseSucceed(() => null))
          if (stored === null || stored.subject !== names.dlqSubject(topic)) continue
          const deleted = yield* attempt("dead-letter delete", () =>
            ctx.jsm.streams.deleteMessage(names.dlqStream, seq, false)
          ).pipe(Effect.orElseSucceed(() => false))
          if (deleted) n++
        }
        return n
      })

    const groupStats: NonNullable<Broker.Broker["Service"]["groupStats"]> = (topic, group) =>
      Effect.gen(function* () {
        yield* checkName("topic", topic)
        yield* checkName("group", group)
        const durables = ordered
          ? Array.from({ length: partitions }, (_, i) => names.partitionDurable(group, i))
          : [names.durable(group)]
        const each = yield* Effect.forEach(durables, (durable) =>
          attempt("consumer info", () => ctx.jsm.consumers.info(names.stream(topic), durable)).pipe(
            Effect.map((i) => ({ pending: i.num_ack_pending, lag: i.num_pending })),
            Effect.catchIf(
              (e) => /not found/i.test(e.message),
              () => Effect.succeed({ pending: 0, lag: 0 })
            )
          )
        )
        return {
          pending: each.reduce((a, x) => a + x.pending, 0),
          lag: each.reduce((a, x) => a + x.lag, 0)
        }
      })

    const topics: NonNullable<Broker.Broker["Service"]["topics"]> = Effect.gen(function* () {
      const streams = yield* attempt("stream list", async () => {
        const out: Array<string> = []
        for await (const s of ctx.jsm.streams.list()) out.push(s.config.name)
        return out
      })
      const dlq = yield* attempt("dead-letter counts", () =>
        ctx.jsm.streams.info(names.dlqStream, { subjects_filter: names.dlqSubject("*") })
      ).pipe(
        Effect.map((info) => info.state.subjects ?? {}),
        Effect.orElseSucceed((): Record<string, number> => ({}))
      )
      const out: Array<Broker.TopicInfo> = []
      for (const stream of streams.sort()) {
        const topic = names.topicOf(stream)
        if (topic === undefined) continue
        const groups = yield* attempt("consumer list", async () => {
          const found: Array<string> = []
          for await (const c of ctx.jsm.consumers.list(stream)) found.push(names.groupOf(c.name))
          return Array.from(new Set(found)).sort()
        })
        out.push({ name: topic, groups, deadLetters: dlq[names.dlqSubject(topic)] ?? 0 })
      }
      return out
    })

    return Broker.Broker.of({
      publish,
      publishEach,
      subscribe: (sub) => subscribe(ctx, sub),
      ackAll: ackAll(ctx),
      deadLetters,
      purgeDeadLetters,
      groupStats,
      topics
    })
  })

/**
 * The NATS JetStream broker as a Layer (requires `NatsClient`, e.g. `NatsClient.layer({ servers })`).
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Broker.Broker, BrokerError.BrokerError, NatsClient> =>
  Layer.effect(Broker.Broker, make(options))

/**
 * The layer with its options from configuration: `CONVERGE_NATS_PREFIX` (default `converge`),
 * `CONVERGE_NATS_STORAGE` (`file` | `memory`, default `file`), `CONVERGE_NATS_REPLICAS` (default 1). A bad
 * value is a `ConfigError` naming the variable.
 *
 * @since 0.1.0
 */
export const layerConfig: Layer.Layer<Broker.Broker, BrokerError.BrokerError | Config.ConfigError, NatsClient> =
  Layer.unwrap(
    Effect.gen(function* () {
      const prefix = yield* Config.String("CONVERGE_NATS_PREFIX").pipe(Config.withDefault("converge"))
      const storage = yield* Config.Literals(["file", "memory"], "CONVERGE_NATS_STORAGE").pipe(
        Config.withDefault("file" as const)
      )
      const replicas = yield* Config.Int("CONVERGE_NATS_REPLICAS").pipe(Config.withDefault(1))
      return layer({ prefix, storage, replicas })
    })
  )
