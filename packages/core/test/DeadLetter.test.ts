import { MemoryBroker } from "@converge/broker-memory"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Stream } from "effect"
import { Audit, Broker, DeadLetter, Envelope } from "../src/index.ts"
import { BrokerTest } from "../src/testing/index.ts"

/** Dead-letters every message published to `topic` (n of them) through the broker's own API. */
const deadLetterAll = (topic: string, messages: ReadonlyArray<Envelope.Encoded>) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    yield* broker.publish(messages)
    yield* broker.subscribe({ topic, group: "g", consumer: "c", batchSize: 1000 }).pipe(
      Stream.take(messages.length),
      Stream.runForEach((d) => d.deadLetter({ reason: d.envelope.id.endsWith("7") ? "exhausted" : "permanent" }))
    )
  })

/** The broker, with every `deadLetters` call's options recorded. */
const Recorded = Layer.effect(
  Broker.Broker,
  Effect.gen(function* () {
    const inner = yield* Broker.Broker
    const calls: Array<Broker.DeadLettersOptions | undefined> = []
    ;(globalThis as { deadLetterCalls?: typeof calls }).deadLetterCalls = calls
    return Broker.Broker.of({
      ...inner,
      deadLetters: (topic, options) => {
        calls.push(options)
        return inner.deadLetters(topic, options)
      }
    })
  })
).pipe(Layer.provide(MemoryBroker.layer()))

const calls = () => (globalThis as { deadLetterCalls?: Array<Broker.DeadLettersOptions | undefined> }).deadLetterCalls!

describe("DeadLetter", () => {
  it.effect("list reads the queue page by page and filters; show reads one entry, not the queue", () =>
    Effect.gen(function* () {
      const messages = BrokerTest.messages("t", 1200)
      yield* deadLetterAll("t", messages)
      calls().length = 0
      const all = yield* DeadLetter.list("t")
      assert.strictEqual(all.length, 1200)
      assert.isTrue(
        calls().every((o) => o?.limit !== undefined && o.limit <= 500),
        "never more than a page per call"
      )
      assert.strictEqual(calls().length, 3)
      const exhausted = yield* DeadLetter.list("t", { reason: "exhausted", limit: 5 })
      assert.strictEqual(exhausted.length, 5)
      assert.isTrue(exhausted.every((d) => d.reason === "exhausted"))
      calls().length = 0
      const one = yield* DeadLetter.show("t", all[700]!.id)
      assert.strictEqual(one.id, all[700]!.id)
      assert.deepStrictEqual(calls(), [{ from: all[700]!.id, limit: 1 }])
      const missing = yield* Effect.flip(DeadLetter.show("t", "999999-0"))
      assert.strictEqual(missing._tag, "DeadLetterNotFound")
    }).pipe(Effect.provide(Recorded))
  )

  it.effect("replayMany: a page in one publish and one purge; an entry that is not an envelope fails alone", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const memory = yield* MemoryBroker.MemoryBroker
      const messages = BrokerTest.messages("rm", 250)
      yield* memory.faults.appendRaw("rm", { junk: "no envelope here" })
      yield* deadLetterAll("rm", messages)
      const letters = yield* DeadLetter.list("rm")
      assert.strictEqual(letters.length, 251, "250 dead-lettered, 1 malformed (by the broker itself)")
      const outcomes = yield* DeadLetter.replayMany("rm", letters)
      const failed = outcomes.filter((o) => o._tag === "Failed")
      assert.strictEqual(outcomes.filter((o) => o._tag === "Replayed").length, 250)
      assert.strictEqual(failed.length, 1)
      assert.isTrue(failed[0]!._tag === "Failed" && failed[0]!.error._tag === "NotReplayable")
      const left = yield* DeadLetter.list("rm")
      assert.deepStrictEqual(
        left.map((d) => d.reason),
        ["malformed"],
        "only the malformed entry stays"
      )
      const replayed = yield* broker.subscribe({ topic: "rm", group: "after", consumer: "c", batchSize: 1000 }).pipe(
        Stream.filter((d) => DeadLetter.isReplay(d.envelope.headers)),
        Stream.take(250),
        Stream.runCollect
      )
      assert.deepStrictEqual(
        replayed.map((d) => d.envelope.id),
        messages.map((m) => m.id),
        "the same message ids, in order"
      )
      assert.isTrue(replayed.every((d) => d.envelope.attempt === 1))
      const events = yield* Audit.query({ topic: "rm", kinds: ["replayed"] })
      assert.strictEqual(events.length, 250, "each replay audited")
    }).pipe(Effect.provide(Layer.merge(MemoryBroker.layer(), Audit.layerMemory())))
  )

  it.effect("replay republishes to the topic whose queue the entry came from", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const memory = yield* MemoryBroker.MemoryBroker
      // a foreign producer's entry on topic t whose envelope names another topic
      const [m] = BrokerTest.messages("t", 1)
      yield* memory.faults.appendRaw("t", Envelope.toFields({ ...m!, topic: "elsewhere" }))
      yield* broker.subscribe({ topic: "t", group: "g", consumer: "c" }).pipe(
        Stream.take(1),
        Stream.runForEach((d) => d.deadLetter({ reason: "permanent" }))
      )
      const [dead] = yield* DeadLetter.list("t")
      assert.strictEqual(dead!.envelope!.topic, "elsewhere")
      yield* DeadLetter.replay("t", dead!.id)
      // before: the replay went to "elsewhere", where no consumer of t would ever see it
      assert.strictEqual(yield* memory.length("elsewhere"), 0)
      const [again] = yield* broker.subscribe({ topic: "t", group: "g2", consumer: "c" }).pipe(
        Stream.filter((d) => DeadLetter.isReplay(d.envelope.headers)),
        Stream.take(1),
        Stream.runCollect
      )
      assert.strictEqual(again!.envelope.topic, "t")
      assert.strictEqual(again!.envelope.id, m!.id)
    }).pipe(Effect.provide(MemoryBroker.layer()))
  )
})
