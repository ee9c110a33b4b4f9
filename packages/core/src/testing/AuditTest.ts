/**
 * The audit lifecycle scenario, shared by the audit stores' tests (memory here, Postgres in
 * `@converge/store-postgres`): one message published, retried, dead-lettered, replayed and handled; its
 * events must come back from the store in that order, with their attempts and reasons. Runs on the live
 * clock (short delays) over the `Broker` and audit layers in context.
 *
 * @since 0.1.0
 */
import { assert } from "@effect/vitest"
import { Data, Effect, Schedule, Schema, type Scope } from "effect"
import * as Audit from "../Audit.ts"
import type * as Broker from "../Broker.ts"
import * as Consumer from "../Consumer.ts"
import * as DeadLetter from "../DeadLetter.ts"
import * as Publisher from "../Publisher.ts"
import * as Topic from "../Topic.ts"

class Unavailable extends Data.TaggedError("Unavailable")<{}> {}

/** The scenario's topic. */
export const topic = Topic.make("audit-test.orders", Schema.Struct({ id: Schema.String }))

/** The kinds, in order, of the message's trail. */
export const expected: ReadonlyArray<string> = [
  "published",
  "delivered:1",
  "retried:1",
  "retried:2",
  "dead-lettered:3:exhausted",
  "replayed",
  "delivered:1",
  "handled:1"
]

const poll = <A, E, R>(effect: Effect.Effect<A, E, R>, done: (a: A) => boolean, what: string) =>
  Effect.gen(function* () {
    for (let i = 0; i < 400; i++) {
      const value = yield* effect
      if (done(value)) return value
      yield* Effect.sleep(10)
    }
    return yield* Effect.die(new Error(`audit scenario: ${what}`))
  })

/**
 * Runs the lifecycle and checks the trail; returns the message id.
 *
 * @since 0.1.0
 */
export const lifecycle: Effect.Effect<
  string,
  unknown,
  Broker.Broker | Publisher.Publisher | Audit.AuditLog | Scope.Scope
> = Effect.gen(function* () {
  let broken = true
  yield* Consumer.make(topic, {
    group: "billing",
    errors: { Unavailable: "retry" },
    retry: Schedule.spaced("5 millis").pipe(Schedule.upTo({ times: 2 })),
    handle: () => (broken ? Effect.fail(new Unavailable()) : Effect.void)
  })
  const correlationId = `flow-${Math.random().toString(36).slice(2)}`
  const { id } = yield* Publisher.publish(topic, { id: "o-1" }, { correlationId })
  const [letter] = yield* poll(DeadLetter.list(topic.name), (l) => l.length === 1, "no dead letter")
  broken = false
  yield* DeadLetter.replay(topic.name, letter!.id)
  const trail = yield* poll(
    Audit.query({ messageId: id }),
    (events) => events.some((e) => e.kind === "handled"),
    "never handled"
  )
  assert.deepStrictEqual(
    trail.map((e) =>
      [e.kind, e.kind === "published" || e.kind === "replayed" ? undefined : e.attempt, e.reason]
        .filter((x) => x !== undefined)
        .join(":")
    ),
    expected
  )
  const dead = trail.find((e) => e.kind === "dead-lettered")!
  assert.include(dead.error!, "Unavailable")
  assert.strictEqual(trail.find((e) => e.kind === "retried")!.delayMs, 5)
  for (const e of trail) {
    assert.strictEqual(e.topic, topic.name)
    assert.strictEqual(e.correlationId, correlationId)
    if (e.kind !== "published" && e.kind !== "replayed") assert.strictEqual(e.group, "billing")
    assert.strictEqual(e.process, Audit.processName)
  }
  for (let i = 1; i < trail.length; i++) assert.isAtLeast(trail[i]!.at, trail[i - 1]!.at)
  // the timeline of the correlation id holds the same events
  assert.deepStrictEqual(
    (yield* Audit.timeline(correlationId)).map((e) => e.seq),
    trail.map((e) => e.seq)
  )
  return id
})
