/**
 * The key layout of the Redis Streams layer, and the fields Converge adds to
 * the entries it re-adds or dead-letters.
 *
 * With one partition every key of a topic shares the hash tag `{<topic>}`.
 * With several, each partition's keys (stream, retry stream, delayed set,
 * lease, dead-letter stream) share a tag of their own, `{<topic>:p<i>}`, so a
 * topic's partitions spread over a Redis Cluster's slots while every script
 * stays within one partition's slot; the topic-level keys (`:meta`,
 * `:members:<group>`, touched by plain commands only) keep `{<topic>}`.
 * `hashTag: "topic"` keeps the earlier layout (one tag per topic):
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
  /** The dead-letter stream this partition's entries go to (in the partition's hash slot). */
  readonly dlq: string
}

/** The keys of one topic. */
export interface Keys {
  /** Every dead-letter stream of the topic: one, or one per partition with `hashTag: "partition"`. */
  readonly dlqs: ReadonlyArray<string>
  /** The topic's settings (its partition count). */
  readonly meta: string
  readonly partition: (group: string, index: number) => Part
  readonly members: (group: string) => string
  /** The stream of partition 0 in the layout of one hash tag per topic (what a migration check looks for). */
  readonly topicTagStream0: string
}

/**
 * Where a topic's keys hash in a Redis Cluster: `partition` (the default) gives each partition a hash tag of
 * its own, `{<topic>:p<i>}`, so the partitions spread over the slots (and the nodes); `topic` keeps every key
 * of the topic under `{<topic>}` (one slot), the layout of earlier versions. One partition is `{<topic>}`
 * either way.
 */
export type HashTag = "partition" | "topic"

/** What a key prefix may be: 1–100 letters, digits, `.`, `_`, `-` or `:`. */
export const prefixPattern = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/

/** The key layout under `prefix` for topics of `partitions` partitions. */
export const make =
  (prefix: string, partitions: number, hashTag: HashTag = "partition") =>
  (topic: string): Keys => {
    const base = `${prefix}:{${topic}}`
    const one = partitions === 1
    const perPartition = !one && hashTag === "partition"
    const tagged = (index: number) => `${prefix}:{${topic}:p${index}}`
    const dlqOf = (index: number) => (perPartition ? `${tagged(index)}:dlq` : `${base}:dlq`)
    return {
      dlqs: perPartition ? Array.from({ length: partitions }, (_, i) => dlqOf(i)) : [`${base}:dlq`],
      meta: `${base}:meta`,
      members: (group) => `${base}:members:${group}`,
      topicTagStream0: `${base}:p0`,
      // one partition keeps the plain key names (compatible with a single-stream layout)
      partition: (group, index) =>
        perPartition
          ? {
              index,
              stream: tagged(index),
              retry: `${tagged(index)}:retry:${group}`,
              delayed: `${tagged(index)}:delayed:${group}`,
              lease: `${tagged(index)}:lease:${group}`,
              dlq: dlqOf(index)
            }
          : {
              index,
              stream: one ? base : `${base}:p${index}`,
              retry: one ? `${base}:retry:${group}` : `${base}:retry:${group}:p${index}`,
              delayed: one ? `${base}:delayed:${group}` : `${base}:delayed:${group}:p${index}`,
              lease: `${base}:lease:${group}:p${index}`,
              dlq: dlqOf(index)
            }
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
