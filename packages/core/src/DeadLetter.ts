/**
 * `DeadLetter` — the operator's view of a topic's dead-letter queue: list,
 * show, replay, purge.
 *
 * Every dead-lettered message keeps the original envelope (when it could be
 * read), the reason (`decode`, `unknown-type`, `oversized`, `permanent`,
 * `exhausted`, `defect`, `too-many-deliveries`, `malformed`), the last
 * error, the attempts made, the
 * delivery count and the time.
 *
 * **Replay** re-publishes the message to its topic with the same message id,
 * the attempt reset to 1 and a replay marker header (`convergereplay`, the
 * dead-letter entry id), then removes the entry from the dead-letter queue.
 * A replay reaches every group of the topic, including groups that had
 * processed the message: a consumer that uses the inbox absorbs it (the
 * message id is already recorded), one that does not handles it again. The
 * inbox retention must therefore outlive the replay horizon.
 *
 * @since 0.1.0
 */
import { Effect, Metric, Schema } from "effect"
import * as Audit from "./Audit.ts"
import * as Broker from "./Broker.ts"
import type { BrokerError } from "./BrokerError.ts"
import * as BrokerErrors from "./BrokerError.ts"
import * as Envelope from "./Envelope.ts"
import * as Metrics from "./Metrics.ts"

/**
 * Filters of {@link list}; all optional, combined with AND.
 *
 * @since 0.1.0
 */
export interface Filter {
  readonly group?: string | undefined
  readonly reason?: string | undefined
  /** Dead-lettered at or after this time (RFC 3339 or epoch milliseconds). */
  readonly since?: string | number | undefined
  /** Dead-lettered before this time (RFC 3339 or epoch milliseconds). */
  readonly until?: string | number | undefined
  /** At most this many, oldest first. */
  readonly limit?: number | undefined
}

/**
 * The dead-letter entry does not exist (any more).
 *
 * @since 0.1.0
 */
export class DeadLetterNotFound extends Schema.TaggedError<DeadLetterNotFound>(
  "@converge/core/DeadLetter/DeadLetterNotFound"
)("DeadLetterNotFound", { topic: Schema.String, id: Schema.String }) {
  /** Names the topic and the entry. */
  override get message(): string {
    return `No dead letter ${this.id} in topic ${this.topic}`
  }
}

/**
 * The entry cannot be replayed: it was never a readable envelope (a malformed
 * entry). Fix it at the source and publish it anew.
 *
 * @since 0.1.0
 */
export class NotReplayable extends Schema.TaggedError<NotReplayable>("@converge/core/DeadLetter/NotReplayable")(
  "NotReplayable",
  { topic: Schema.String, id: Schema.String, reason: Schema.String }
) {
  /** Says why. */
  override get message(): string {
    return `Dead letter ${this.id} in topic ${this.topic} cannot be replayed: ${this.reason}`
  }
}

const millis = (t: string | number): number => (typeof t === "number" ? t : Date.parse(t))

/**
 * What a replay publishes: to the topic whose queue the entry came from (the envelope's own topic attribute
 * may name another, from a foreign producer), attempt 1, the replay marker.
 */
const replayedEnvelope = (topic: string, letter: Broker.DeadLetter, envelope: Envelope.Encoded): Envelope.Encoded => ({
  ...envelope,
  topic,
  attempt: 1,
  headers: { ...envelope.headers, [Envelope.Headers.replay]: letter.id }
})

/** Dead letters read per broker call by {@link list}. */
const pageSize = 500

/**
 * Lists a topic's dead letters, oldest first, filtered.
 *
 * @since 0.1.0
 */
export const list = (
  topic: string,
  filter?: Filter
): Effect.Effect<ReadonlyArray<Broker.DeadLetter>, BrokerError, Broker.Broker> =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    const since = filter?.since === undefined ? undefined : millis(filter.since)
    const until = filter?.until === undefined ? undefined : millis(filter.until)
    const limit = filter?.limit ?? Number.POSITIVE_INFINITY
    const out: Array<Broker.DeadLetter> = []
    // page through the queue: never more than a page in memory besides what matched
    let after: string | undefined
    while (out.length < limit) {
      const page = yield* broker.deadLetters(topic, { limit: pageSize, after })
      for (const d of page) {
        if (filter?.group !== undefined && d.group !== filter.group) continue
        if (filter?.reason !== undefined && d.reason !== filter.reason) continue
        const at = Date.parse(d.time)
        if (since !== undefined && at < since) continue
        if (until !== undefined && at >= until) continue
        out.push(d)
        if (out.length >= limit) break
      }
      if (page.length < pageSize) break
      after = page[page.length - 1]!.id
    }
    return out
  })

/**
 * One dead letter by its id.
 *
 * @since 0.1.0
 */
export const show = (
  topic: string,
  id: string
): Effect.Effect<Broker.DeadLetter, BrokerError | DeadLetterNotFound, Broker.Broker> =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    const [found] = yield* broker.deadLetters(topic, { from: id, limit: 1 })
    if (found === undefined || found.id !== id) return yield* new DeadLetterNotFound({ topic, id })
    return found
  })

/**
 * Re-publishes a dead letter (same message id, attempt 1, replay marker) and
 * removes it from the dead-letter queue. Returns the new broker entry id.
 *
 * @since 0.1.0
 */
export const replay = (
  topic: string,
  id: string
): Effect.Effect<string, BrokerError | DeadLetterNotFound | NotReplayable, Broker.Broker> =>
  Effect.gen(function* () {
    const letter = yield* show(topic, id)
    // one replay is a page of one: the same publish, purge, audit event (timed before the publish) and metric
    const [outcome] = yield* replayMany(topic, [letter])
    if (outcome!._tag === "Failed") return yield* Effect.fail(outcome!.error)
    return outcome!.entryId
  })

/**
 * The outcome of one dead letter in {@link replayMany}: replayed (its new broker entry id), or not (why).
 *
 * @since 0.1.0
 */
export type ReplayOutcome =
  | { readonly _tag: "Replayed"; readonly id: string; readonly entryId: string }
  | { readonly _tag: "Failed"; readonly id: string; readonly error: BrokerError | NotReplayable }

/**
 * Replays many dead letters of a topic (as listed by {@link list}) in one `publishEach` and one purge: the
 * same per message as {@link replay} (same message id, attempt 1, replay marker, removed from the queue,
 * audited), in two broker round trips instead of three per message. A message the broker refuses, or an
 * entry that is not an envelope, fails alone and stays in the queue. Give it a page at a time (the CLI
 * replays 100 per call).
 *
 * @since 0.1.0
 */
export const replayMany = (
  topic: string,
  letters: ReadonlyArray<Broker.DeadLetter>
): Effect.Effect<ReadonlyArray<ReplayOutcome>, BrokerError, Broker.Broker> =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    const outcomes: Array<ReplayOutcome> = new Array(letters.length)
    const ready: Array<{
      readonly index: number
      readonly letter: Broker.DeadLetter
      readonly envelope: Envelope.Encoded
    }> = []
    for (let i = 0; i < letters.length; i++) {
      const letter = letters[i]!
      if (letter.envelope === undefined) {
        outcomes[i] = {
          _tag: "Failed",
          id: letter.id,
          error: new NotReplayable({ topic, id: letter.id, reason: `the entry is ${letter.reason}, not an envelope` })
        }
        continue
      }
      ready.push({ index: i, letter, envelope: replayedEnvelope(topic, letter, letter.envelope) })
    }
    if (ready.length === 0) return outcomes
    const at = yield* Audit.currentTime
    const published = yield* broker.publishEach(ready.map((r) => r.envelope))
    const stored: Array<(typeof ready)[number]> = []
    for (let k = 0; k < ready.length; k++) {
      const r = ready[k]!
      const o = published[k]
      if (o !== undefined && o._tag === "Stored") {
        outcomes[r.index] = { _tag: "Replayed", id: r.letter.id, entryId: o.entryId }
        stored.push(r)
      } else {
        outcomes[r.index] = {
          _tag: "Failed",
          id: r.letter.id,
          error:
            o?._tag === "Failed" ? o.error : BrokerErrors.make(new BrokerErrors.NotConfirmed({ message: "no outcome" }))
        }
      }
    }
    if (stored.length > 0) {
      yield* broker.purgeDeadLetters(
        topic,
        stored.map((r) => r.letter.id)
      )
      const sink = yield* Audit.AuditSink
      if (sink.enabled) {
        yield* sink.enqueue(
          stored
            .filter((r) => sink.records(r.envelope.topic, r.envelope.id))
            .map((r) => Audit.eventOf("replayed", r.envelope, at, { detail: `dead letter ${r.letter.id}` }))
        )
      }
      yield* Metric.update(Metric.withAttributes(Metrics.replayed, { topic }), stored.length)
      yield* Effect.logInfo(`${stored.length} dead letter(s) replayed`).pipe(Effect.annotateLogs({ topic }))
    }
    return outcomes
  })

/**
 * Deletes dead letters by id, or all of the topic's; returns how many.
 *
 * @since 0.1.0
 */
export const purge = (topic: string, ids?: ReadonlyArray<string>): Effect.Effect<number, BrokerError, Broker.Broker> =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    const purged = yield* broker.purgeDeadLetters(topic, ids)
    const sink = yield* Audit.AuditSink
    if (sink.enabled && purged > 0) {
      // dead-letter entry ids (the messages are gone): one event per id given, or one for a whole queue
      const at = yield* Audit.currentTime
      const entries = ids ?? ["*"]
      yield* sink.enqueue(
        entries.map((entry) => ({
          kind: "purged" as const,
          messageId: entry,
          topic,
          at,
          process: Audit.processName,
          detail: ids === undefined ? `the whole queue: ${purged} dead letters` : "dead-letter entry id"
        }))
      )
    }
    return purged
  })

/**
 * True when a message is a replay from the dead-letter queue.
 *
 * @since 0.1.0
 */
export const isReplay = (headers: Readonly<Record<string, string>>): boolean =>
  headers[Envelope.Headers.replay] !== undefined
