/**
 * A topic's dead-letter stream, read and purged: each entry keeps the
 * message's fields plus the `cv_dlq_*` fields the dead-letter script added.
 *
 * @internal
 */
import { type Broker, BrokerError, Envelope } from "@converge/core"
import { Effect, Result } from "effect"
import { type BrokerContext, checkName, keysOf } from "./context.ts"
import { fail, fromRedis } from "./errors.ts"
import { internalFields, isInternal } from "./keys.ts"
import * as Replies from "./replies.ts"

/** A dead-letter entry as the broker reports it. */
const toDeadLetter = (topic: string, id: string, all: Record<string, string>): Broker.DeadLetter => {
  const fields: Record<string, string> = {}
  for (const [k, v] of Object.entries(all)) if (!isInternal(k)) fields[k] = v
  const read = Envelope.fromFields(fields)
  return {
    id,
    topic,
    group: all[internalFields.dlqGroup] ?? "",
    originalEntryId: all[internalFields.dlqEntry] ?? "",
    reason: all[internalFields.dlqReason] ?? "unknown",
    error: all[internalFields.dlqError],
    attempts: Number(all[internalFields.dlqAttempts] ?? 0),
    deliveryCount: Number(all[internalFields.dlqDeliveries] ?? 0),
    time: all[internalFields.dlqTime] ?? "",
    fields,
    envelope: Result.isSuccess(read) ? read.success : undefined
  }
}

/** A stream entry id's two numbers, for ordering entries of several streams. */
const idParts = (id: string): readonly [number, number] => {
  const dash = id.indexOf("-")
  return [Number(id.slice(0, dash)), Number(id.slice(dash + 1))]
}

const compareIds = (a: string, b: string): number => {
  const [am, as] = idParts(a)
  const [bm, bs] = idParts(b)
  return am - bm || as - bs
}

/**
 * The id of an entry of a partition's dead-letter stream, when a topic has one per partition: `p<i>:<id>`
 * (the queue is ordered by entry id, then partition).
 */
const partitionId = /^p(\d+):(\d+-\d+)$/

const readRange = (ctx: BrokerContext, stream: string, start: string, count: number | undefined) =>
  ctx.redis.send<unknown>("XRANGE", stream, start, "+", ...(count === undefined ? [] : ["COUNT", String(count)])).pipe(
    Effect.mapError(fromRedis("XRANGE")),
    Effect.map((raw) => Replies.entriesOf(raw))
  )

/**
 * Reads a page of a topic's dead-letter queue, oldest first (XRANGE from a cursor, COUNT limit). A topic with
 * a dead-letter stream per partition (`hashTag: "partition"`) is read from each and merged by entry id; its
 * entries' ids name their partition.
 */
export const list =
  (ctx: BrokerContext): Broker.Broker["Service"]["deadLetters"] =>
  (topic, opts) =>
    Effect.gen(function* () {
      yield* checkName("topic", topic)
      const { dlqs } = yield* keysOf(ctx, topic)
      if (dlqs.length === 1) {
        const start = opts?.after !== undefined ? `(${opts.after}` : (opts?.from ?? "-")
        const entries = yield* readRange(ctx, dlqs[0]!, start, opts?.limit)
        return entries.map((entry) => toDeadLetter(topic, entry.id, entry.fields ?? {}))
      }
      const cursorText = opts?.after ?? opts?.from
      const cursor = cursorText === undefined ? undefined : partitionId.exec(cursorText)
      if (cursorText !== undefined && (cursor === null || cursor === undefined)) {
        return yield* fail(
          new BrokerError.InvalidArgument({
            argument: "id",
            message: `${JSON.stringify(cursorText)} is not a dead-letter id of partitioned topic ${topic} (p<partition>:<entry id>)`
          })
        )
      }
      const at = cursor === undefined || cursor === null ? undefined : { part: Number(cursor[1]), id: cursor[2]! }
      const merged: Array<{ readonly part: number; readonly id: string; readonly fields: Record<string, string> }> = []
      for (let part = 0; part < dlqs.length; part++) {
        // ordered by (entry id, partition): from the cursor's entry id on, inclusive where the partition
        // comes after the cursor's (or is it, with `from`), exclusive otherwise
        const inclusive = at === undefined || part > at.part || (part === at.part && opts?.after === undefined)
        const start = at === undefined ? "-" : inclusive ? at.id : `(${at.id}`
        for (const entry of yield* readRange(ctx, dlqs[part]!, start, opts?.limit)) {
          merged.push({ part, id: entry.id, fields: entry.fields ?? {} })
        }
      }
      merged.sort((a, b) => compareIds(a.id, b.id) || a.part - b.part)
      const page = opts?.limit === undefined ? merged : merged.slice(0, opts.limit)
      return page.map((e) => toDeadLetter(topic, `p${e.part}:${e.id}`, e.fields))
    })

/** Deletes dead-letter entries by id (all of the topic's when `ids` is omitted); returns how many. */
export const purge =
  (ctx: BrokerContext): Broker.Broker["Service"]["purgeDeadLetters"] =>
  (topic, ids) =>
    Effect.gen(function* () {
      yield* checkName("topic", topic)
      const { dlqs } = yield* keysOf(ctx, topic)
      if (ids !== undefined) {
        if (ids.length === 0) return 0
        if (dlqs.length === 1) {
          return yield* ctx.redis.send<number>("XDEL", dlqs[0]!, ...ids).pipe(Effect.mapError(fromRedis("XDEL")))
        }
        // per partition; an id that names no partition matches no entry
        const byPart = new Map<number, Array<string>>()
        for (const id of ids) {
          const m = partitionId.exec(id)
          if (m === null || Number(m[1]) >= dlqs.length) continue
          const list = byPart.get(Number(m[1]))
          if (list === undefined) byPart.set(Number(m[1]), [m[2]!])
          else list.push(m[2]!)
        }
        let n = 0
        for (const [part, entryIds] of byPart) {
          n += Number(
            yield* ctx.redis.send<number>("XDEL", dlqs[part]!, ...entryIds).pipe(Effect.mapError(fromRedis("XDEL")))
          )
        }
        return n
      }
      let n = 0
      for (const dlq of dlqs) {
        n += Number(yield* ctx.redis.send<number>("XLEN", dlq).pipe(Effect.mapError(fromRedis("XLEN"))))
        yield* ctx.redis.send("DEL", dlq).pipe(Effect.mapError(fromRedis("DEL")))
      }
      return n
    })
