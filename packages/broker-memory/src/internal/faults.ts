/**
 * The memory broker's fault knobs: what real brokers do to you, on demand.
 * Their contract is `MemoryBroker.Faults`.
 *
 * @internal
 */
import { Envelope } from "@converge/core"
import { Clock, Duration, Effect } from "effect"
import type { Core } from "./engine.ts"
import type { Entry } from "./state.ts"

/** The fault knobs over one broker's engine. */
export const make = (core: Core) => ({
  duplicateNext: (topic: string, times = 1) =>
    Effect.sync(() => {
      core.topic(topic).duplicate += times
    }),
  dropNextAck: (topic: string, times = 1) =>
    Effect.sync(() => {
      core.topic(topic).dropAck += times
    }),
  reorder: (topic: string, window: number) =>
    Effect.sync(() => {
      core.topic(topic).reorderWindow = Math.max(1, Math.floor(window))
    }),
  delay: (topic: string, delay: Duration.Input) =>
    Effect.sync(() => {
      core.topic(topic).delayMs = Duration.toMillis(delay)
    }),
  fsync: Effect.sync(() => {
    for (const t of core.topics.values()) for (const e of t.entries) e.durable = true
  }),
  restart: Effect.sync(() => {
    let lost = 0
    for (const t of core.topics.values()) {
      const keep: Array<Entry> = []
      for (const e of t.entries) {
        if (e.durable) keep.push(e)
        else {
          lost++
          e.deleted = true
          // its pending state was never durable either
          for (const g of t.groups.values()) {
            if (g.pending.delete(e.seq) && e.key !== undefined) g.lockedKeys.delete(e.key)
          }
        }
      }
      t.entries.length = 0
      t.entries.push(...keep)
      core.wake(t.name)
    }
    return lost
  }),
  deleteTopic: (topic: string) =>
    Effect.sync(() => {
      const t = core.topics.get(topic)
      if (t === undefined) return
      for (const e of t.entries) e.deleted = true
      t.deleted = true
      core.topics.delete(topic)
      core.wake(topic)
    }),
  trim: (topic: string, maxLen: number) =>
    Effect.sync(() => {
      const t = core.topics.get(topic)
      if (t === undefined || t.entries.length <= maxLen) return []
      const removed = t.entries.splice(0, t.entries.length - Math.max(0, maxLen))
      for (const e of removed) {
        e.deleted = true
      }
      for (const g of t.groups.values()) {
        for (const e of removed) {
          if (g.pending.delete(e.seq)) {
            g.lost.push(e.id)
            core.release(t, g, e)
          }
        }
        const gone = new Set(removed)
        const ready = g.ready.filter((e) => !gone.has(e))
        g.ready.length = 0
        g.ready.push(...ready)
      }
      core.wake(topic)
      return removed.map((e) => e.id)
    }),
  killConsumer: (topic: string, group: string, consumer: string) =>
    Effect.sync(() => {
      let n = 0
      for (const s of core.subs) {
        if (s.topic === topic && s.group === group && s.consumer === consumer && !s.killed) {
          s.killed = true
          n++
          s.wake()
        }
      }
      return n
    }),
  appendRaw: (topic: string, fields: Envelope.Fields) =>
    Effect.flatMap(Clock.currentTimeMillis, (now) =>
      Effect.sync(() => {
        const entry = core.append(core.topic(topic), undefined, { ...fields }, fields[Envelope.FieldNames.subject], now)
        core.wakeOne(topic)
        return entry.id
      })
    )
})
