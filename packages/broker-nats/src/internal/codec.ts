/**
 * Envelopes on NATS messages: the CloudEvents attributes as one JSON header `ce` and the payload as the
 * message body (`Envelope.toCompactFields`), so a header value never holds a raw line break; a message with
 * one header per attribute (`ce_id`, `ce_type`, ...: `Envelope.toFields`) from a foreign producer is read
 * too. Dead-letter entries add one header `cv_dlq`, the reason as JSON.
 *
 * @internal
 */
import { Envelope } from "@converge/core"
import { type MsgHdrs, headers as makeHeaders } from "@nats-io/transport-node"

const encoder = new TextEncoder()
const decoder = new TextDecoder()

/** The header and body of a message carrying `e`. */
export const toMessage = (e: Envelope.Encoded): { readonly headers: MsgHdrs; readonly data: Uint8Array } => {
  const fields = Envelope.toCompactFields(e)
  const headers = makeHeaders()
  for (const [k, v] of Object.entries(fields)) if (k !== "data") headers.set(k, v)
  return { headers, data: encoder.encode(fields.data ?? "") }
}

/** The fields of a message (its headers, and its body as `data`), minus NATS's own and Converge's `cv_*`. */
export const fieldsOf = (headers: MsgHdrs | undefined, data: Uint8Array): Record<string, string> => {
  const out: Record<string, string> = {}
  if (headers !== undefined) {
    for (const k of headers.keys()) {
      if (k.startsWith("Nats-") || k.startsWith("cv_")) continue
      out[k] = headers.get(k)
    }
  }
  out.data = decoder.decode(data)
  return out
}

/** Why a message was dead-lettered: the `cv_dlq` header of its dead-letter entry. */
export interface DeadLetterInfo {
  readonly reason: string
  readonly error?: string | undefined
  readonly group: string
  readonly entry: string
  readonly attempts: number
  readonly deliveries: number
  readonly time: string
}

/** The header name of {@link DeadLetterInfo}. */
export const dlqHeader = "cv_dlq"

/** A dead-letter entry: the message's fields plus the reason. */
export const toDeadLetterMessage = (
  fields: Readonly<Record<string, string>>,
  info: DeadLetterInfo
): { readonly headers: MsgHdrs; readonly data: Uint8Array } => {
  const headers = makeHeaders()
  for (const [k, v] of Object.entries(fields)) if (k !== "data") headers.set(k, v)
  headers.set(dlqHeader, JSON.stringify(info))
  return { headers, data: encoder.encode(fields.data ?? "") }
}

/** The reason of a dead-letter entry (defaults when the header is missing or unreadable). */
export const deadLetterInfoOf = (headers: MsgHdrs | undefined): DeadLetterInfo => {
  try {
    const raw = headers?.get(dlqHeader)
    if (raw !== undefined && raw !== "") return JSON.parse(raw) as DeadLetterInfo
  } catch {
    // fall through
  }
  return { reason: "unknown", group: "", entry: "", attempts: 0, deliveries: 0, time: "" }
}
