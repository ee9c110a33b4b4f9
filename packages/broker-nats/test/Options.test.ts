/**
 * The NATS layer's refusals and names: options it cannot honour refused when the layer is built, a topic's
 * layout (ordered or not, its partitions) fixed by its first user and a broker configured otherwise refused
 * at its first publish or subscribe, naming the option; a dotted topic name kept one subject token.
 */
import { Broker, BrokerError } from "@converge/core"
import { BrokerTest } from "@converge/core/testing"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Stream } from "effect"
import { NatsBroker, NatsClient } from "../src/index.ts"
import { brokerLayer, mainServer, Prefix } from "./helpers.ts"

const reasonOf = (exit: Exit.Exit<unknown, unknown>) => {
  assert.isTrue(Exit.isFailure(exit))
  const error = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail")?.error : undefined
  assert.instanceOf(error, BrokerError.BrokerError)
  return (error as BrokerError.BrokerError).reason
}

describe("NATS layer options", () => {
  it.live("bad options are refused when the layer is built, naming the option", () =>
    Effect.gen(function* () {
      for (const [options, argument] of [
        [{ prefix: "has.dot" }, "prefix"],
        [{ replicas: 9 }, "replicas"],
        [{ partitions: 4 }, "partitions"],
        [{ orderedPerKey: true, partitions: 0 }, "partitions"]
      ] as const) {
        const exit = yield* Effect.exit(
          Effect.scoped(NatsBroker.make(options).pipe(Effect.provide(NatsClient.layer({ servers: mainServer }))))
        )
        const reason = reasonOf(exit)
        assert.strictEqual(reason._tag, "InvalidArgument")
        assert.strictEqual((reason as BrokerError.InvalidArgument).argument, argument)
      }
    })
  )

  it.live("a topic's layout is fixed by its first user: an ordered broker refuses an unordered topic", () =>
    Effect.gen(function* () {
      const broker = yield* Broker.Broker
      const prefix = yield* Prefix
      yield* broker.publish(BrokerTest.messages("orders.eu", 3, { keyOf: (n) => `k${n}` }))
      const { manager } = yield* NatsClient.NatsClient
      const info = yield* Effect.promise(() => manager.streams.info(`${prefix}_orders~eu`))
      assert.deepStrictEqual(info.config.subjects, [`${prefix}.t.orders~eu`], "a dotted name is one subject token")
      const ordered = yield* NatsBroker.make({ prefix, orderedPerKey: true, partitions: 4 })
      const exit = yield* Effect.exit(
        ordered.subscribe({ topic: "orders.eu", group: "g", consumer: "c" }).pipe(Stream.take(1), Stream.runDrain)
      )
      const reason = reasonOf(exit)
      assert.strictEqual(reason._tag, "InvalidArgument")
      assert.include(reason.message, "unordered")
      assert.include(reason.message, "ordered with partitions: 4")
      const publishExit = yield* Effect.exit(ordered.publish(BrokerTest.messages("orders.eu", 1)))
      assert.strictEqual(reasonOf(publishExit)._tag, "InvalidArgument")
    }).pipe(Effect.scoped, Effect.provide(brokerLayer()))
  )
})
