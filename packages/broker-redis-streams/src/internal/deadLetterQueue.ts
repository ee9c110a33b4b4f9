/**
 * A topic's dead-letter stream, read and purged: each entry keeps the
 * message's fields plus the `cv_dlq_*` fields the dead-letter script added.
 *
 * @internal
 */
import { type Broker, Envelope } from "@converge/core"
import { Effect, Result } from "effect"
import { type BrokerContext, checkName } from "./context.ts"
import { fromRedis } from "./errors.ts"
import { internalFields, isInternal } from "./keys.ts"
import * as Replies from "./replies.ts"

/** Reads a page of a topic's dead-letter queue, oldest first (XRANGE from a cursor, COUNT limit). */
export const list =
  (ctx: BrokerContext): Broker.Broker["Service"]["deadLetters"] =>
  (topic, opts) =>
    Effect.gen(function* () {
      yield* checkName("topic", topic)
      const args = opts?.limit === undefined ? [] : ["COUNT", String(opts.limit)]
      const start = opts?.after !== undefined ? `(${opts.after}` : (opts?.from ?? "-")
      const entries = Replies.entriesOf(
        yield* ctx.redis
          .send<unknown>("XRANGE", ctx.keys(topic).dlq, start, "+", ...args)
          .pipe(Effect.mapError(fromRedis("XRANGE")))
      )
      return entries.map((entry): Broker.DeadLetter => {
        const all = entry.fields ?? {}
        const fields: Record<string, string> = {}
        for (const [k, v] of Object.entries(all)) if (!isInternal(k)) fields[k] = v
        const read = Envelope.fromFields(fields)
        return {
          id: entry.id,
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
      })
    })

/** Deletes dead-letter entries by id (all of the topic's when `ids` is omitted); returns how many. */
export const purge =
  (ctx: BrokerContext): Broker.Broker["Service"]["purgeDeadLetters"] =>
  (topic, ids) =>
    Effect.gen(function* () {
      yield* checkName("topic", topic)
      const dlq = ctx.keys(topic).dlq
      if (ids !== undefined) {
        if (ids.length === 0) return 0
        return yield* ctx.redis.send<number>("XDEL", dlq, ...ids).pipe(Effect.mapError(fromRedis("XDEL")))
      }
      const n = yield* ctx.redis.send<number>("XLEN", dlq).pipe(Effect.mapError(fromRedis("XLEN")))
      yield* ctx.redis.send("DEL", dlq).pipe(Effect.mapError(fromRedis("DEL")))
      return Number(n)
    })
