/**
 * Parsing of raw Redis stream replies. node-redis 6 speaks RESP3 by default:
 * maps arrive as plain objects (or `Map`s with a type mapping), arrays as
 * arrays, nil as null. These functions accept both RESP2 and RESP3 shapes.
 *
 * @internal
 */

/** A stream entry: its id and its fields (`undefined` when the entry was deleted). */
export interface StreamEntry {
  readonly id: string
  readonly fields: Record<string, string> | undefined
}

const toText = (u: unknown): string => (typeof u === "string" ? u : Buffer.isBuffer(u) ? u.toString("utf8") : String(u))

/** `[f1, v1, f2, v2, ...]` (or a RESP3 map) to a record. */
export const fieldsOf = (raw: unknown): Record<string, string> | undefined => {
  if (raw === null || raw === undefined) return undefined
  const out: Record<string, string> = {}
  if (Array.isArray(raw)) {
    for (let i = 0; i + 1 < raw.length; i += 2) out[toText(raw[i])] = toText(raw[i + 1])
    return out
  }
  if (raw instanceof Map) {
    for (const [k, v] of raw) out[toText(k)] = toText(v)
    return out
  }
  if (typeof raw === "object") {
    for (const [k, v] of Object.entries(raw as Record<string, unknown>)) out[k] = toText(v)
    return out
  }
  return undefined
}

/** `[[id, fields], ...]` to entries. */
export const entriesOf = (raw: unknown): Array<StreamEntry> => {
  if (!Array.isArray(raw)) return []
  const out: Array<StreamEntry> = []
  for (const item of raw) {
    if (!Array.isArray(item) || item.length < 1) continue
    out.push({ id: toText(item[0]), fields: fieldsOf(item[1]) })
  }
  return out
}

/** An `XREAD`/`XREADGROUP` reply to entries per stream key. */
export const streamsOf = (raw: unknown): Map<string, Array<StreamEntry>> => {
  const out = new Map<string, Array<StreamEntry>>()
  if (raw === null || raw === undefined) return out
  if (raw instanceof Map) {
    for (const [k, v] of raw) out.set(toText(k), entriesOf(v))
  } else if (Array.isArray(raw)) {
    // RESP2: [[key, entries], ...]
    for (const item of raw) if (Array.isArray(item)) out.set(toText(item[0]), entriesOf(item[1]))
  } else if (typeof raw === "object") {
    for (const [k, v] of Object.entries(raw as Record<string, unknown>)) out.set(k, entriesOf(v))
  }
  return out
}

/** An `XAUTOCLAIM` reply: the claimed entries and the ids of deleted entries (Redis >= 7). */
export const autoclaimOf = (
  raw: unknown
): { readonly next: string; readonly claimed: Array<StreamEntry>; readonly deleted: Array<string> } => {
  if (!Array.isArray(raw)) return { next: "0-0", claimed: [], deleted: [] }
  return {
    next: toText(raw[0]),
    claimed: entriesOf(raw[1]),
    deleted: Array.isArray(raw[2]) ? raw[2].map(toText) : []
  }
}

/** An extended `XPENDING` reply to delivery counts per entry id. */
export const pendingCountsOf = (raw: unknown): Map<string, number> => {
  const out = new Map<string, number>()
  if (!Array.isArray(raw)) return out
  for (const item of raw) {
    if (Array.isArray(item) && item.length >= 4) out.set(toText(item[0]), Number(item[3]))
  }
  return out
}

/** A `CONFIG GET` reply to a record. */
export const configOf = (raw: unknown): Record<string, string> => fieldsOf(raw) ?? {}
