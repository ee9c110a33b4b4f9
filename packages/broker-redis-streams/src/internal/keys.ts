/**
 * The key layout of the Redis Streams layer, and the fields Converge adds to
 * the entries it re-adds or dead-letters.
 *
 * Every key of a topic shares the hash tag `{<topic>}`, so a topic lives in
 * one Redis Cluster slot and its scripts stay single-slot:
 *
 * | key | type | what |
 * | --- | --- | --- |
 * | `<prefix>:{<topic>}` (`:p<n>` per partition) | stream | the topic; every group reads it |
 * | `<prefix>:{<topic>}:retry:<group>` (`:p<n>`) | stream | delayed redeliveries of one group |
 * | `<prefix>:{<topic>}:delayed:<group>` (`:p<n>`) | sorted set | nacked messages waiting for their time |
 * | `<prefix>:{<topic>}:lease:<group>:p<n>` | string | the owner of a partition (ordered mode) |
 * | `<prefix>:{<topic>}:members:<group>` | sorted set | live consumers of a group (ordered mode) |
 * | `<prefix>:{<topic>}:dlq` | stream | the dead-letter queue |
 * | `<prefix>:{<topic>}:meta` | hash | the topic's partition count, fixed by its first publisher or consumer |
 *
 * @internal
 */

/** The keys of one partition of a topic, for one group. */
export interface Part {
  readonly index: number
  readonly stream: string
  readonly retry: string
  readonly delayed: string
  readonly lease: string
}

/** The keys of one topic. */
export interface Keys {
  readonly dlq: string
  /** The topic's settings (its partition count). */
  readonly meta: string
  readonly partition: (group: string, index: number) => Part
  readonly members: (group: string) => string
}

/** What a key prefix may be: 1–100 letters, digits, `.`, `_`, `-` or `:`. */
export const prefixPattern = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/

/** The key layout under `prefix` for topics of `partitions` partitions. */
export const make =
  (prefix: string, partitions: number) =>
  (topic: string): Keys => {
    const base = `${prefix}:{${topic}}`
    const one = partitions === 1
    return {
      dlq: `${base}:dlq`,
      meta: `${base}:meta`,
      members: (group) => `${base}:members:${group}`,
      // one partition keeps the plain key names (compatible with a single-stream layout)
      partition: (group, index) => ({
        index,
        stream: one ? base : `${base}:p${index}`,
        retry: one ? `${base}:retry:${group}` : `${base}:retry:${group}:p${index}`,
        delayed: one ? `${base}:delayed:${group}` : `${base}:delayed:${group}:p${index}`,
        lease: `${base}:lease:${group}:p${index}`
      })
    }
  }

/** Fields Converge adds to entries it re-adds or dead-letters. */
export const internalFields = {
  deliveries: "cv_deliveries",
  origin: "cv_origin",
  dlqReason: "cv_dlq_reason",
  dlqError: "cv_dlq_error",
  dlqGroup: "cv_dlq_group",
  dlqEntry: "cv_dlq_entry",
  dlqAttempts: "cv_dlq_attempts",
  dlqDeliveries: "cv_dlq_deliveries",
  dlqTime: "cv_dlq_time"
} as const

/** A field Converge added (`cv_*`), not part of the message. */
export const isInternal = (field: string) => field.startsWith("cv_")
