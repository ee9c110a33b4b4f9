/**
 * The audit lifecycle (`AuditTest.lifecycle`: publish → retry with a new attempt → dead-letter → replay →
 * handled, in order, with attempts and reasons) and the group gauges (`GaugeTest.groupGauges`) on NATS
 * JetStream: the same bodies as on the memory broker and Redis. The lifecycle exercises the attempts stream
 * (a nack's new attempt read back on redelivery) and the replay's own message id (not taken for a duplicate).
 */
import { Audit, Publisher } from "@converge/core"
import { AuditTest, GaugeTest } from "@converge/core/testing"
import { describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { brokerLayer } from "./helpers.ts"

describe("audit and gauges on NATS JetStream", () => {
  it.live("one message's publish → retry → dead-letter → replay → handled, in order, with attempts and reasons", () =>
    Effect.scoped(AuditTest.lifecycle).pipe(
      Effect.provide(
        Publisher.layer().pipe(
          Layer.provideMerge(brokerLayer()),
          Layer.provideMerge(Audit.layerMemory({ deliveries: true }))
        )
      )
    )
  )

  it.live("sampleGroups reports a group's pending and lag (consumer info)", () =>
    GaugeTest.groupGauges.pipe(Effect.scoped, Effect.provide(Publisher.layer().pipe(Layer.provideMerge(brokerLayer()))))
  )
})
