/**
 * `MemoryBroker` — an in-memory `Broker` for tests and demos.
 *
 * Deterministic and driven by `Clock` (so `TestClock` controls redelivery
 * delays, claim timeouts and injected delays), it models the same semantics as
 * the Redis Streams layer: consumer groups (fan-out across groups, sharing
 * within one), a pending list with delivery counts, claim of entries idle
 * longer than a threshold, nack with delay, a dead-letter queue per topic,
 * optional per-key ordering and retained history for new groups.
 *
 * It also has **fault knobs** ({@link Faults}) to simulate what real brokers
 * do to you: duplicate the next delivery, drop an ack, reorder within a
 * window, delay deliveries, lose unconfirmed writes on a restart, delete or
 * trim a topic, kill a consumer, write a malformed entry.
 *
 * It is not a stand-in for the real broker in integration tests: it makes the
 * fast, deterministic ones.
 *
 * @example
 * ```ts
 * import { MemoryBroker } from "@converge/broker-memory"
 * const BrokerLive = MemoryBroker.layer({ orderedPerKey: true })
 * ```
 *
 * The module is split by concern under `internal/`: `state` (topics, groups,
 * pending records, subscriptions), `engine` (appends, retention, wake-ups,
 * reads), `delivery` (settlement) and `faults` (the knobs).
 *
 * @since 0.1.0
 */
import { Broker, BrokerError, type Envelope, Name } from "@converge/core"
import { Clock, Context, Duration, Effect, Layer, Result, Schedule, type Scope, Stream } from "effect"
import type * as Cause from "effect/Cause"
import * as Delivery from "./internal/delivery.ts"
import { Core, nextWakeIn, read } from "./internal/engine.ts"
import * as Fault from "./internal/faults.ts"
import { envelopeOf, invalid, type Sub, type TopicState } from "./internal/state.ts"

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /**
   * Per-key ordering within each group: a message is not delivered while an
   * earlier message of the same key is pending (also while it backs off after
   * a nack). Messages without a key are not ordered. Default `false`.
   */
  readonly orderedPerKey?: boolean | undefined
  /**
   * Simulated `appendfsync everysec`: writes become durable only at the next
   * tick of this interval (by `Clock`), and `Faults.restart` loses the rest.
   * Default: every write is durable at once.
   */
  readonly fsyncInterval?: Duration.Input | undefined
  /**
   * Keep about this many entries per topic (trimmed in steps of 100 to 1000
   * entries or 10%, like Redis `MAXLEN ~`). Trimming never removes an entry that is still
   * pending, or not yet read, in any group. Default: unbounded.
   */
  readonly retention?: number | undefined
  /** Seed of the pseudo-random generator used by the reorder knob (default 1). */
  readonly seed?: number | undefined
}

/**
 * A pending entry, as {@link MemoryBroker} reports it.
 *
 * @since 0.1.0
 */
export interface PendingInfo {
  readonly entryId: string
  readonly messageId: string | undefined
  readonly consumer: string
  readonly deliveryCount: number
  /** Waiting for a delayed redelivery (nacked with a delay). */
  readonly delayed: boolean
}

/**
 * Fault injection. Every knob applies to one topic unless said otherwise.
 *
 * @since 0.1.0
 */
export interface Faults {
  /** The next `times` deliveries of the topic are delivered twice (the copy counts as a redelivery). */
  readonly duplicateNext: (topic: string, times?: number) => Effect.Effect<void>
  /** The next `times` acks of the topic report success but do nothing (the entry stays pending, to be claimed). */
  readonly dropNextAck: (topic: string, times?: number) => Effect.Effect<void>
  /** Shuffle new deliveries of the topic within windows of `window` messages (1 = off). Deterministic by seed. */
  readonly reorder: (topic: string, window: number) => Effect.Effect<void>
  /** New messages of the topic become visible only `delay` after their publish (0 = off). */
  readonly delay: (topic: string, delay: Duration.Input) => Effect.Effect<void>
  /** Marks every write durable now (a simulated fsync). */
  readonly fsync: Effect.Effect<void>
  /**
   * A simulated broker restart: writes not yet durable (see
   * `Options.fsyncInterval`) are lost, with their pending state. Returns how
   * many entries were lost. Subscriptions keep running (they reconnect).
   */
  readonly restart: Effect.Effect<number>
  /** Deletes the topic: entries, groups, pending lists and dead letters (like `DEL` of a stream key). */
  readonly deleteTopic: (topic: string) => Effect.Effect<void>
  /** Trims the topic to its newest `maxLen` entries, pending ones included; returns the removed entry ids. */
  readonly trim: (topic: string, maxLen: number) => Effect.Effect<ReadonlyArray<string>>
  /**
   * Kills every subscription of `consumer` in `group`, as a crash would: its
   * streams fail, and its unsettled deliveries cannot be acked any more (they
   * stay pending for a claim). Returns how many subscriptions were killed.
   */
  readonly killConsumer: (topic: string, group: string, consumer: string) => Effect.Effect<number>
  /** Appends raw fields as an entry, as a foreign client could (e.g. a malformed entry). Returns its id. */
  readonly appendRaw: (topic: string, fields: Envelope.Fields) => Effect.Effect<string>
}

/**
 * The memory broker's own service: fault knobs and inspection, beside the
 * `Broker` it provides.
 *
 * @since 0.1.0
 */
export class MemoryBroker extends Context.Service<
  MemoryBroker,
  {
    readonly faults: Faults
    /** The pending list of a group, oldest first. */
    readonly pending: (topic: string, group: string) => Effect.Effect<ReadonlyArray<PendingInfo>>
    /** How many entries a topic retains. */
    readonly length: (topic: string) => Effect.Effect<number>
    /**
     * The consumer groups of a topic, in creation order (like `XINFO GROUPS`). A group exists from its
     * first subscription on; entries it has not read are retained for it whatever the `retention`.
     */
    readonly groups: (topic: string) => Effect.Effect<ReadonlyArray<string>>
  }
>()("@converge/broker-memory/MemoryBroker") {}

/**
 * Builds the broker and its fault knobs in the current scope.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<
  { readonly broker: Broker.Broker["Service"]; readonly memory: MemoryBroker["Service"] },
  never,
  Scope.Scope
> =>
  Effect.gen(function* () {
    const core = new Core({
      ordered: options?.orderedPerKey ?? false,
      retention: options?.retention ?? Number.POSITIVE_INFINITY,
      fsyncEnabled: options?.fsyncInterval !== undefined,
      seed: options?.seed ?? 1
    })
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        core.closed = true
        for (const s of core.subs) s.wake()
      })
    )
    if (options?.fsyncInterval !== undefined) {
      const fsync = Effect.sync(() => {
        for (const t of core.topics.values()) for (const e of t.entries) e.durable = true
      })
      yield* Effect.forkScoped(Effect.repeat(fsync, Schedule.spaced(options.fsyncInterval)))
    }

    /** After a batch was appended: trim each touched topic once, in steps (like MAXLEN ~), and wake a reader. */
    const appended = (touched: Iterable<string>): void => {
      for (const topic of touched) {
        const t = core.topics.get(topic)!
        if (t.entries.length > core.retention + core.retentionSlack) core.applyRetention(t)
        core.wakeOne(topic)
      }
    }

    const publish = (messages: ReadonlyArray<Envelope.Encoded>) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) => {
        if (core.closed)
          return Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
        // a batch is nearly always of one topic: each check and set below runs once per run of a topic
        let last = ""
        for (const m of messages) {
          if (m.topic === last || core.validTopics.has(m.topic)) {
            last = m.topic
            continue
          }
          const ok = Name.check("topic", m.topic)
          if (Result.isFailure(ok)) return Effect.fail(invalid("topic", ok.failure))
          core.validTopics.add(m.topic)
          last = m.topic
        }
        const ids: Array<string> = new Array(messages.length)
        const touched = new Set<string>()
        let t: TopicState | undefined
        for (let i = 0; i < messages.length; i++) {
          const m = messages[i]!
          if (t === undefined || m.topic !== t.name) {
            t = core.topic(m.topic)
            touched.add(m.topic)
          }
          ids[i] = core.append(t, m, undefined, m.key, now).id
        }
        appended(touched)
        return Effect.succeed(ids)
      })

    /** Per-message outcomes: a message of an invalid topic fails alone; every other one is stored. */
    const publishEach = (messages: ReadonlyArray<Envelope.Encoded>) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) => {
        if (core.closed)
          return Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
        const touched = new Set<string>()
        const outcomes = messages.map((m): Broker.PublishOutcome => {
          if (!core.validTopics.has(m.topic)) {
            const ok = Name.check("topic", m.topic)
            if (Result.isFailure(ok)) return { _tag: "Failed", error: invalid("topic", ok.failure) }
            core.validTopics.add(m.topic)
          }
          touched.add(m.topic)
          return { _tag: "Stored", entryId: core.append(core.topic(m.topic), m, undefined, m.key, now).id }
        })
        appended(touched)
        return Effect.succeed(outcomes)
      })

    const subscribe = (options: Broker.SubscribeOptions): Stream.Stream<Broker.Delivery, BrokerError.BrokerError> =>
      Stream.unwrap(
        Effect.gen(function* () {
          for (const [kind, value] of [
            ["topic", options.topic],
            ["group", options.group],
            ["consumer", options.consumer]
          ] as const) {
            const ok = Name.check(kind, value)
            if (Result.isFailure(ok)) return yield* Effect.fail(invalid(kind, ok.failure))
          }
          if (core.closed)
            return yield* Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
          const batchSize = options.batchSize
          if (batchSize !== undefined && !(Number.isInteger(batchSize) && batchSize >= 1 && batchSize <= 100_000)) {
            return yield* Effect.fail(
              BrokerError.make(
                new BrokerError.InvalidArgument({
                  argument: "batchSize",
                  message: `batchSize must be an integer from 1 to 100000, got ${batchSize}`
                })
              )
            )
          }
          const max = batchSize ?? 100
          const claimIdle = Duration.toMillis(options.claimIdle ?? "30 seconds")
          const onEvent = options.onEvent ?? Broker.logEvent
          const sub: Sub = {
            topic: options.topic,
            group: options.group,
            consumer: options.consumer,
            closed: false,
            killed: false,
            firstRead: true,
            nextClaimAt: 0,
            leftWork: false,
            batch: max,
            wake: () => {}
          }
          core.subs.add(sub)
          yield* Effect.addFinalizer(() =>
            Effect.sync(() => {
              sub.closed = true
              core.subs.delete(sub)
              // this subscription may have been woken for work it never read: pass it on
              core.wakeOne(options.topic, options.group)
            })
          )
          let t = core.topic(options.topic)
          let g = core.group(t, options.group)
          let recreations = 0

          const pull: Effect.Effect<
            readonly [Broker.Delivery, ...Array<Broker.Delivery>],
            BrokerError.BrokerError | Cause.Done
          > = Effect.gen(function* () {
            while (true) {
              if (sub.killed) {
                return yield* Effect.fail(
                  BrokerError.make(new BrokerError.ConnectionLost({ message: `consumer ${sub.consumer} was killed` }))
                )
              }
              if (core.closed) {
                return yield* Effect.fail(BrokerError.make(new BrokerError.BrokerClosed({ message: "broker closed" })))
              }
              if (core.topics.get(options.topic) !== t || t.groups.get(options.group) !== g) {
                // the topic or the group vanished (NOGROUP): recreate from the oldest entry, with backoff
                const delay = Duration.toMillis(
                  Duration.min(Duration.times(Duration.millis(100), 2 ** Math.min(recreations, 6)), Duration.seconds(5))
                )
                recreations++
                yield* Effect.sleep(delay)
                t = core.topic(options.topic)
                g = core.group(t, options.group)
                sub.firstRead = true
                yield* onEvent({ _tag: "GroupRecreated", topic: t.name, group: g.name })
                continue
              }
              const now = yield* Clock.currentTimeMillis
              const events: Array<Broker.SubscriptionEvent> = []
              const batch = read(core, sub, t, g, max, claimIdle, now, events)
              for (const event of events) yield* onEvent(event)
              if (batch.length > 0) {
                recreations = 0
                // a full batch that left work behind: the next waiting reader of the group takes it
                if (sub.leftWork) core.wakeOne(t.name, g.name)
                return batch as unknown as readonly [Broker.Delivery, ...Array<Broker.Delivery>]
              }
              if (events.length > 0) continue
              const wakeIn = nextWakeIn(sub, t, g, claimIdle, now)
              const signal = core.waitFor(options.topic, sub)
              yield* wakeIn === undefined ? signal : Effect.raceFirst(signal, Effect.sleep(wakeIn))
            }
          })
          return Stream.fromPull(Effect.succeed(pull))
        })
      )

    const ackAll = Delivery.ackAll(core)

    const deadLetters = (topic: string, opts?: Broker.DeadLettersOptions) =>
      Effect.sync(() => {
        const dlq = core.topics.get(topic)?.dlq ?? []
        // ids are `<n>-0`, in order: a cursor compares by n
        const seqOf = (id: string) => Number.parseInt(id, 10)
        const start =
          opts?.after !== undefined
            ? dlq.findIndex((d) => seqOf(d.id) > seqOf(opts.after!))
            : opts?.from !== undefined
              ? dlq.findIndex((d) => seqOf(d.id) >= seqOf(opts.from!))
              : 0
        if (start < 0) return []
        return dlq.slice(start, opts?.limit === undefined ? undefined : start + opts.limit)
      })

    const purgeDeadLetters = (topic: string, ids?: ReadonlyArray<string>) =>
      Effect.sync(() => {
        const t = core.topics.get(topic)
        if (t === undefined) return 0
        const before = t.dlq.length
        if (ids === undefined) t.dlq.length = 0
        else {
          const drop = new Set(ids)
          const keep = t.dlq.filter((d) => !drop.has(d.id))
          t.dlq.length = 0
          t.dlq.push(...keep)
        }
        return before - t.dlq.length
      })

    const faults: Faults = Fault.make(core)

    const memory = MemoryBroker.of({
      faults,
      pending: (topic, group) =>
        Effect.sync(() => {
          const g = core.topics.get(topic)?.groups.get(group)
          if (g === undefined) return []
          return Array.from(g.pending.values(), (p) => ({
            entryId: p.entry.id,
            messageId: envelopeOf(p.entry)?.id,
            consumer: p.consumer,
            deliveryCount: p.count,
            delayed: p.dueAt !== undefined
          }))
        }),
      length: (topic) => Effect.sync(() => core.topics.get(topic)?.entries.length ?? 0),
      groups: (topic) => Effect.sync(() => Array.from(core.topics.get(topic)?.groups.keys() ?? []))
    })

    return {
      broker: Broker.Broker.of({
        publish,
        publishEach,
        subscribe,
        ackAll,
        deadLetters,
        purgeDeadLetters,
        groupStats: (topic, group) =>
          Effect.sync(() => {
            const t = core.topics.get(topic)
            const g = t?.groups.get(group)
            if (t === undefined || g === undefined) return { pending: 0, lag: t?.entries.length ?? 0 }
            const unread = t.entries.length - t.indexFrom(g.cursor)
            return { pending: g.pending.size, lag: unread + g.ready.length + g.delayed }
          }),
        topics: Effect.sync(() =>
          [...core.topics.values()]
            .filter((t) => !t.deleted)
            .map((t) => ({ name: t.name, groups: [...t.groups.keys()].sort(), deadLetters: t.dlq.length }))
            .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
        )
      }),
      memory
    }
  })

/**
 * The memory broker as a Layer: provides the `Broker` and its
 * {@link MemoryBroker} fault knobs.
 *
 * @since 0.1.0
 */
export const layer = (options?: Options): Layer.Layer<Broker.Broker | MemoryBroker> =>
  Layer.effectContext(
    Effect.map(make(options), ({ broker, memory }) =>
      Context.make(Broker.Broker, broker).pipe(Context.add(MemoryBroker, memory))
    )
  )
