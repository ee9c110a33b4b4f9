/**
 * Where Converge keeps a topic on JetStream: stream, subjects and consumer names.
 *
 * Names (topic, group) are `[A-Za-z0-9][A-Za-z0-9._-]*` (`Name`); `.` separates subject tokens and is not
 * allowed in stream or consumer names, so it is written as `~`, which no name contains (the mapping is
 * one-to-one):
 *
 * | what | name |
 * | --- | --- |
 * | a topic's stream | `<prefix>_<topic~>`, subject `<prefix>.t.<topic~>` (ordered: `<prefix>.t.<topic~>.p<i>` per partition) |
 * | a group | the durable pull consumer `<group~>` on the topic's stream (ordered: `<group~>=p<i>` per partition) |
 * | the dead-letter queue | stream `<prefix>_dlq`, subject `<prefix>.dlq.<topic~>` per topic |
 * | attempt numbers of nacked messages | stream `<prefix>_attempts` (one message per subject kept), subject `<prefix>.attempt.<topic~>.<group~>.<stream seq>` |
 *
 * @internal
 */

/** What a prefix may be: letters, digits, `_`, `-` (it starts stream names and subjects). */
export const prefixPattern = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/

/** A name as one subject token / part of a stream or consumer name. */
export const token = (name: string): string => name.replaceAll(".", "~")

/** The name a token stands for. */
export const untoken = (t: string): string => t.replaceAll("~", ".")

/** The names of one broker's JetStream resources. */
export interface Names {
  readonly stream: (topic: string) => string
  readonly subject: (topic: string) => string
  readonly durable: (group: string) => string
  /** The subject of partition `index` of an ordered topic. */
  readonly partitionSubject: (topic: string, index: number) => string
  /** The durable consumer of a group on partition `index` of an ordered topic. */
  readonly partitionDurable: (group: string, index: number) => string
  /** The group a durable consumer name stands for (either form). */
  readonly groupOf: (durable: string) => string
  readonly dlqStream: string
  readonly dlqSubject: (topic: string) => string
  readonly attemptsStream: string
  readonly attemptSubject: (topic: string, group: string, seq: number) => string
  /** The topic a stream name stands for, if it is one of this prefix's topic streams. */
  readonly topicOf: (stream: string) => string | undefined
}

/** The names under `prefix`. */
export const make = (prefix: string): Names => {
  const head = `${prefix}_`
  const dlqStream = `${prefix}_dlq`
  const attemptsStream = `${prefix}_attempts`
  return {
    stream: (topic) => `${head}${token(topic)}`,
    subject: (topic) => `${prefix}.t.${token(topic)}`,
    durable: token,
    partitionSubject: (topic, index) => `${prefix}.t.${token(topic)}.p${index}`,
    partitionDurable: (group, index) => `${token(group)}=p${index}`,
    groupOf: (durable) => untoken(durable.replace(/=p\d+$/, "")),
    dlqStream,
    dlqSubject: (topic) => `${prefix}.dlq.${token(topic)}`,
    attemptsStream,
    attemptSubject: (topic, group, seq) => `${prefix}.attempt.${token(topic)}.${token(group)}.${seq}`,
    topicOf: (stream) =>
      stream.startsWith(head) && stream !== dlqStream && stream !== attemptsStream
        ? untoken(stream.slice(head.length))
        : undefined
  }
}
