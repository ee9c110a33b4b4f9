/**
 * `Partition` — which partition a message belongs to.
 *
 * Per-key order is kept by partitions: every message of one key lands in the
 * same partition, and a partition is worked by one worker at a time (an outbox
 * relay, an ordered broker consumer). Every component that partitions — the
 * Postgres outbox, the Redis Streams broker, a broker of your own — uses this
 * one function, so a message's partition is the same wherever it is computed.
 *
 * The hash is 32-bit FNV-1a over the UTF-16 code units of the key (of the
 * message id when the message has no key), modulo the partition count. It is
 * part of the wire contract: changing it would move keys between partitions
 * of data already written.
 *
 * @since 0.1.0
 */

/**
 * 32-bit FNV-1a of a string's UTF-16 code units, unsigned (0 to 2³² − 1).
 *
 * @since 0.1.0
 */
export const hash = (text: string): number => {
  let h = 0x811c9dc5
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  return h >>> 0
}

/**
 * The partition of a message: `hash(key) mod partitions` (0 when there is
 * one partition). Pass the message's key, or its id when it has none.
 *
 * @since 0.1.0
 */
export const of = (key: string, partitions: number): number => (partitions === 1 ? 0 : hash(key) % partitions)

/**
 * The partition of an encoded envelope: by its key, by its id when unkeyed.
 *
 * @since 0.1.0
 */
export const ofMessage = (message: { readonly key?: string | undefined; readonly id: string }, partitions: number) =>
  of(message.key ?? message.id, partitions)
