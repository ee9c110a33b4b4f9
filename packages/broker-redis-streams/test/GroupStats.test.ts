/** `groupStats` on real Redis (XINFO GROUPS lag and pending over the partitions), through `Metrics.sampleGroups`. */
import { Publisher } from "@converge/core"
import { GaugeTest } from "@converge/core/testing"
import { describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { brokerLayer } from "./helpers.ts"

describe("group gauges on Redis", () => {
  it.live("sampleGroups reports a group's pending and lag (XINFO GROUPS)", () =>
    GaugeTest.groupGauges.pipe(
      Effect.scoped,
      Effect.provide(Publisher.layer().pipe(Layer.provideMerge(brokerLayer(undefined, { partitions: 2 }))))
    )
  )
})
