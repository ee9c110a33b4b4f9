/**
 * UUIDv7 (RFC 9562) generation: 48 bits of Unix milliseconds, then a 12-bit
 * sequence that keeps ids monotonic within one millisecond of this process
 * (RFC 9562 §6.2, method 1), then 62 random bits. The time is passed in
 * (callers read it from `Clock`).
 *
 * Hot path: the time prefix is formatted once per millisecond, random bits
 * come from a pooled hex string refilled 32 KiB at a time.
 *
 * @internal
 */
import { randomFillSync } from "node:crypto"

const poolBytes = Buffer.alloc(32 * 1024)
let pool = ""
let poolOffset = Number.MAX_SAFE_INTEGER

/** Reserves `chars` hex characters of the pool; returns their offset in `pool`. */
const takeHex = (chars: number): number => {
  if (poolOffset + chars > pool.length) {
    randomFillSync(poolBytes)
    pool = poolBytes.toString("hex")
    poolOffset = 0
  }
  const at = poolOffset
  poolOffset += chars
  return at
}

const randomHex = (chars: number): string => {
  const at = takeHex(chars)
  return pool.slice(at, at + chars)
}

/** The variant character (10xx) for a random hex character, by its char code: its low two bits pick one of 8, 9, a, b. */
const variantOf: Array<string> = Array.from({ length: 128 }, (_, code) => {
  const n = Number.parseInt(String.fromCharCode(code), 16)
  return Number.isNaN(n) ? "8" : "89ab"[n & 3]!
})
const seqHex: Array<string> = Array.from({ length: 4096 }, (_, i) => `7${i.toString(16).padStart(3, "0")}`)

let lastMs = -1
let seq = 0
let prefix = ""

const setMillis = (ms: number): void => {
  lastMs = ms
  const hex = ms.toString(16).padStart(12, "0")
  prefix = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-`
}

/** @internal */
export const uuidv7 = (nowMs: number): string => {
  const ms = Math.max(0, Math.floor(nowMs))
  if (ms > lastMs) {
    setMillis(ms)
    // start the sequence at a random point in its lower half, leaving headroom
    seq = Number.parseInt(randomHex(3), 16) & 0x7ff
  } else if (++seq > 0xfff) {
    // same (or an earlier, e.g. a TestClock) millisecond and the sequence is exhausted: borrow the next one
    setMillis(lastMs + 1)
    seq = 0
  }
  const at = takeHex(16)
  return `${prefix}${seqHex[seq]}-${variantOf[pool.charCodeAt(at)]}${pool.slice(at + 1, at + 4)}-${pool.slice(at + 4, at + 16)}`
}
