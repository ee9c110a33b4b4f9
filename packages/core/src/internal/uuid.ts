/**
 * UUIDv7 (RFC 9562) generation: 48 bits of Unix milliseconds, then a 12-bit
 * sequence that keeps ids monotonic within one millisecond of this process,
 * then 62 random bits. The time is passed in (read from `Clock` by callers).
 *
 * @internal
 */
import { randomFillSync } from "node:crypto"

const pool = new Uint8Array(8 * 1024)
let poolOffset = pool.length
const hex: Array<string> = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"))

let lastMs = -1
let seq = 0

const random8 = (): number => {
  if (poolOffset + 8 > pool.length) {
    randomFillSync(pool)
    poolOffset = 0
  }
  const at = poolOffset
  poolOffset += 8
  return at
}

/** @internal */
export const uuidv7 = (nowMs: number): string => {
  let ms = Math.max(0, Math.floor(nowMs))
  if (ms <= lastMs) {
    // same (or an earlier, e.g. a TestClock) millisecond: continue the sequence
    ms = lastMs
    seq++
    if (seq > 0xfff) {
      // sequence exhausted: borrow the next millisecond, as RFC 9562 §6.2 allows
      ms = ++lastMs
      seq = 0
    }
  } else {
    lastMs = ms
    const at = random8()
    seq = ((pool[at]! << 4) | (pool[at + 1]! >> 4)) & 0x3ff // leave headroom above the start
  }
  const at = random8()
  const hi = Math.floor(ms / 0x1000000) // top 24 bits of 48
  const lo = ms % 0x1000000
  return (
    hex[(hi >> 16) & 0xff]! +
    hex[(hi >> 8) & 0xff]! +
    hex[hi & 0xff]! +
    hex[(lo >> 16) & 0xff]! +
    "-" +
    hex[(lo >> 8) & 0xff]! +
    hex[lo & 0xff]! +
    "-" +
    hex[0x70 | ((seq >> 8) & 0x0f)]! +
    hex[seq & 0xff]! +
    "-" +
    hex[0x80 | (pool[at]! & 0x3f)]! +
    hex[pool[at + 1]!]! +
    "-" +
    hex[pool[at + 2]!]! +
    hex[pool[at + 3]!]! +
    hex[pool[at + 4]!]! +
    hex[pool[at + 5]!]! +
    hex[pool[at + 6]!]! +
    hex[pool[at + 7]!]!
  )
}

/** @internal */
export const uuidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
