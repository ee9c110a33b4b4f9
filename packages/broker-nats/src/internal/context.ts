/**
 * What the parts of one NATS broker share: the client, the names and the resolved options, and the
 * streams and consumers already ensured.
 *
 * @internal
 */
import { Broker, BrokerError } from "@converge/core"
import type { JetStreamClient, JetStreamManager, StreamConfig } from "@nats-io/jetstream"
import { AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { Effect } from "effect"
import { attempt } from "./errors.ts"
import type { Names } from "./names.ts"

/** The shared state of one broker. */
export interface Context {
  readonly connection: NatsConnection
  readonly js: JetStreamClient
  readonly jsm: JetStreamManager
  readonly names: Names
  readonly storage: "file" | "memory"
  readonly replicas: number
  readonly duplicateWindowMs: number
  readonly maxMessages: number | undefined
  readonly maxAckPending: number
  readonly attemptsMaxAgeMs: number
  readonly publishTimeoutMs: number
  /** Per-key order: a subject and a consumer per partition, one message in flight per partition. */
  readonly ordered: boolean
  /** Partitions of an ordered topic. */
  readonly partitions: number
  /** Streams known to exist (created or checked once). */
  readonly streams: Set<string>
  /** True once the layer shut down. */
  readonly isClosed: () => boolean
}

/** Fails with `InvalidArgument` when `value` is not a valid name of `kind` (`Broker.checkName`). */
export const checkName: typeof Broker.checkName = Broker.checkName

/** How long a pull request of a subscription lasts on the server (the client's minimum). */
export const pullExpiresMs = 1_000

/**
 * The delay of the `NAK` that gives a closing subscription's messages back: past the life of its last pull
 * request, which the server may still hand a message to after the subscription closed (nobody would read it,
 * and the server would not count that delivery). A closing consumer's messages reach the others after it.
 */
export const releaseDelayMs = pullExpiresMs + 200

const nanos = (ms: number) => ms * 1_000_000

/** Creates a stream if it does not exist (once per broker; `add` of an existing equal stream is fine too). */
export const ensureStream = (
  ctx: Context,
  config: Partial<StreamConfig> & { readonly name: string }
): Effect.Effect<void, BrokerError.BrokerError> =>
  ctx.streams.has(config.name)
    ? Effect.void
    : attempt("stream info", () => ctx.jsm.streams.info(config.name)).pipe(
        Effect.catchIf(
          (e) => e.reason._tag === "CommandFailed" && /stream not found/i.test(e.reason.message),
          () =>
            attempt("stream add", () =>
              ctx.jsm.streams.add({
                storage: ctx.storage === "memory" ? StorageType.Memory : StorageType.File,
                num_replicas: ctx.replicas,
                retention: RetentionPolicy.Limits,
                discard: DiscardPolicy.Old,
                allow_direct: true,
                ...config
              })
            ).pipe(
              // created meanwhile by another publisher or consumer (or a foreign client): use it as it is
              Effect.catch((e) =>
                attempt("stream info", () => ctx.jsm.streams.info(config.name)).pipe(Effect.mapError(() => e))
              )
            )
        ),
        Effect.tap(() => Effect.sync(() => ctx.streams.add(config.name))),
        Effect.asVoid
      )

/** What a topic's stream records of its layout (its `description`), fixed by its first publisher or consumer. */
const layoutOf = (ctx: Context) => (ctx.ordered ? `converge:ordered:${ctx.partitions}` : "converge:unordered")

/**
 * A topic's stream: every message of the topic, kept (or the newest `maxMessages`), deduplicated by id; ordered,
 * one subject per partition. The layout is recorded in the stream's description, and a broker configured
 * otherwise fails with `InvalidArgument` at its first publish or subscribe instead of publishing to subjects
 * nobody reads (a stream without a description, written by another client, counts as unordered).
 */
export const ensureTopic = (ctx: Context, topic: string): Effect.Effect<void, BrokerError.BrokerError> => {
  const name = ctx.names.stream(topic)
  if (ctx.streams.has(name)) return Effect.void
  return ensureStream(ctx, {
    name,
    subjects: [ctx.ordered ? `${ctx.names.subject(topic)}.*` : ctx.names.subject(topic)],
    description: layoutOf(ctx),
    duplicate_window: nanos(ctx.duplicateWindowMs),
    ...(ctx.maxMessages === undefined ? {} : { max_msgs: ctx.maxMessages })
  }).pipe(
    Effect.andThen(attempt("stream info", () => ctx.jsm.streams.info(name))),
    Effect.flatMap((info) => {
      const found = info.config.description ?? "converge:unordered"
      if (found === layoutOf(ctx)) return Effect.void
      ctx.streams.delete(name)
      return Effect.fail(
        BrokerError.make(
          new BrokerError.InvalidArgument({
            argument: ctx.ordered ? "orderedPerKey" : "partitions",
            message: `topic ${JSON.stringify(topic)} is ${found.replace("converge:", "").replace(":", " with partitions: ")} on NATS, and this broker is configured ${layoutOf(ctx).replace("converge:", "").replace(":", " with partitions: ")}: every publisher and consumer of a topic must use the same orderedPerKey and partitions`
          })
        )
      )
    })
  )
}

/** The dead-letter stream (every topic's, a subject each). */
export const ensureDeadLetters = (ctx: Context) =>
  ensureStream(ctx, { name: ctx.names.dlqStream, subjects: [ctx.names.dlqSubject("*")] })

/** The attempts of nacked messages: the newest per subject, for `attemptsMaxAge`. */
export const ensureAttempts = (ctx: Context) =>
  ensureStream(ctx, {
    name: ctx.names.attemptsStream,
    subjects: [`${ctx.names.attemptSubject("*", "*", 0).replace(/\.0$/, ".*")}`],
    max_msgs_per_subject: 1,
    max_age: nanos(ctx.attemptsMaxAgeMs)
  })

/**
 * A group's durable pull consumer on a topic's stream, created from the stream's start (a new group reads the
 * retained history), explicit acks, redelivery after `ackWaitMs` without an ack (the claim of a dead
 * consumer's messages), no delivery limit (Converge dead-letters by attempts). An existing consumer with
 * another `ack_wait` is updated to this one.
 */
export const ensureGroup = (ctx: Context, topic: string, group: string, ackWaitMs: number) =>
  Effect.forEach(
    ctx.ordered
      ? Array.from({ length: ctx.partitions }, (_, i) => ({
          durable: ctx.names.partitionDurable(group, i),
          filter: ctx.names.partitionSubject(topic, i)
        }))
      : [{ durable: ctx.names.durable(group), filter: undefined }],
    ({ durable, filter }) => ensureConsumer(ctx, ctx.names.stream(topic), durable, filter, ackWaitMs),
    { discard: true }
  )

/**
 * One durable consumer. Ordered (`filter`: a partition's subject): at most one message of the partition in
 * flight (`max_ack_pending: 1`), so the next message of a key waits while one is held, nacked or backing off,
 * and the group's consumers share the partitions' messages without leases.
 */
const ensureConsumer = (ctx: Context, stream: string, durable: string, filter: string | undefined, ackWaitMs: number) =>
  Effect.gen(function* () {
    const existing = yield* attempt("consumer info", () => ctx.jsm.consumers.info(stream, durable)).pipe(
      Effect.map((info) => info as { readonly config: { readonly ack_wait?: number } } | undefined),
      Effect.catchIf(
        (e) => e.reason._tag === "CommandFailed" && /consumer not found/i.test(e.reason.message),
        () => Effect.succeed(undefined)
      )
    )
    if (existing === undefined) {
      yield* attempt("consumer add", () =>
        ctx.jsm.consumers.add(stream, {
          durable_name: durable,
          ack_policy: AckPolicy.Explicit,
          deliver_policy: DeliverPolicy.All,
          ack_wait: nanos(ackWaitMs),
          max_deliver: -1,
          max_ack_pending: filter === undefined ? ctx.maxAckPending : 1,
          ...(filter === undefined ? {} : { filter_subject: filter })
        })
      )
    } else if (existing.config.ack_wait !== nanos(ackWaitMs)) {
      yield* attempt("consumer update", () => ctx.jsm.consumers.update(stream, durable, { ack_wait: nanos(ackWaitMs) }))
    }
  })
