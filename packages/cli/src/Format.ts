/**
 * `Format` — how the tools show things to people: aligned tables, ages and
 * times, one line per audit event. `--json` output does not go through
 * here (see the operations guide for its shapes).
 *
 * @since 0.1.0
 */
import type { Audit, Broker, SagaStore } from "@converge/core"

/**
 * An aligned text table; cells are cut at `max` characters (newlines shown as `⏎`).
 *
 * @since 0.1.0
 */
export const table = (headers: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>, max = 60): string => {
  const cell = (s: string) => {
    const flat = s.replaceAll("\n", "⏎")
    return flat.length > max ? `${flat.slice(0, max - 1)}…` : flat
  }
  const cells = rows.map((r) => r.map(cell))
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? "").length)))
  const line = (r: ReadonlyArray<string>) =>
    r
      .map((c, i) => c.padEnd(widths[i]!))
      .join("  ")
      .trimEnd()
  return [line(headers), ...cells.map(line)].join("\n")
}

/**
 * A duration in milliseconds as people read it: `850 ms`, `12 s`, `3 min 4 s`, `2 h 5 min`, `3 d 4 h`.
 *
 * @since 0.1.0
 */
export const age = (ms: number): string => {
  if (!Number.isFinite(ms)) return "?"
  if (ms < 1000) return `${Math.round(ms)} ms`
  const s = Math.floor(ms / 1000)
  if (s < 60) return `${s} s`
  const m = Math.floor(s / 60)
  if (m < 60) return `${m} min${s % 60 === 0 ? "" : ` ${s % 60} s`}`
  const h = Math.floor(m / 60)
  if (h < 24) return `${h} h${m % 60 === 0 ? "" : ` ${m % 60} min`}`
  const d = Math.floor(h / 24)
  return `${d} d${h % 24 === 0 ? "" : ` ${h % 24} h`}`
}

/**
 * Epoch milliseconds as RFC 3339 (UTC).
 *
 * @since 0.1.0
 */
export const time = (ms: number): string => new Date(ms).toISOString()

/**
 * The one-line error of a dead letter (its first line).
 *
 * @since 0.1.0
 */
export const firstLine = (text: string | undefined): string => (text ?? "").split("\n")[0] ?? ""

/**
 * A dead letter as `--json` shows it in lists (no payload; `dlq show` has it).
 *
 * @since 0.1.0
 */
export const deadLetterSummary = (d: Broker.DeadLetter) => ({
  id: d.id,
  topic: d.topic,
  group: d.group,
  reason: d.reason,
  error: d.error ?? null,
  attempts: d.attempts,
  deliveryCount: d.deliveryCount,
  time: d.time,
  messageId: d.envelope?.id ?? null,
  type: d.envelope?.type ?? null,
  key: d.envelope?.key ?? null
})

/**
 * A dead letter in full as `--json` shows it.
 *
 * @since 0.1.0
 */
export const deadLetterDetail = (d: Broker.DeadLetter) => ({
  ...deadLetterSummary(d),
  originalEntryId: d.originalEntryId,
  headers: d.envelope?.headers ?? {},
  data: d.envelope?.data ?? null,
  fields: d.fields
})

/**
 * The rows of a dead-letter table.
 *
 * @since 0.1.0
 */
export const deadLetterTable = (letters: ReadonlyArray<Broker.DeadLetter>): string =>
  table(
    ["ID", "TOPIC", "GROUP", "REASON", "ATTEMPTS", "TIME", "MESSAGE ID", "ERROR"],
    letters.map((d) => [
      d.id,
      d.topic,
      d.group,
      d.reason,
      String(d.attempts),
      d.time,
      d.envelope?.id ?? "-",
      firstLine(d.error)
    ])
  )

/**
 * One audit event per line: time, kind, topic/group, attempt, and what it says.
 *
 * @since 0.1.0
 */
export const timeline = (events: ReadonlyArray<Audit.Stored>): string =>
  table(
    ["TIME", "STEP", "TOPIC", "GROUP", "ATTEMPT", "MESSAGE ID", "DETAIL", "PROCESS"],
    events.map((e) => [
      time(e.at),
      e.kind,
      e.topic,
      e.group ?? "",
      e.attempt === undefined ? "" : String(e.attempt),
      e.messageId,
      [e.reason, e.delayMs === undefined ? undefined : `in ${age(e.delayMs)}`, firstLine(e.error), e.detail]
        .filter((x) => x !== undefined && x !== "")
        .join("; "),
      e.process
    ]),
    80
  )

/**
 * The sagas table.
 *
 * @since 0.1.0
 */
export const sagaTable = (sagas: ReadonlyArray<SagaStore.Summary>): string =>
  table(
    ["EXECUTION ID", "NAME", "STATUS", "UPDATED", "ERROR"],
    sagas.map((s) => [s.executionId, s.name, s.status, time(s.updatedAt), firstLine(s.error)])
  )

/**
 * One saga with its steps.
 *
 * @since 0.1.0
 */
export const sagaDetail = (s: SagaStore.Detail): string =>
  [
    `saga ${s.executionId} (${s.name}): ${s.status}`,
    `  created ${time(s.createdAt)}, updated ${time(s.updatedAt)}`,
    ...(s.error === undefined ? [] : [`  error: ${firstLine(s.error)}`]),
    ...(s.parked === undefined ? [] : [`  parked at compensation of ${s.parked.step}: resume or resolve it`]),
    `  payload: ${s.payload}`,
    "",
    table(
      ["STEP", "PHASE", "STATUS", "ATTEMPTS", "STARTED", "TOOK", "RESULT / ERROR"],
      s.steps.map((step) => [
        step.step,
        step.phase,
        step.status,
        String(step.attempts),
        time(step.startedAt),
        step.finishedAt === undefined ? "" : age(step.finishedAt - step.startedAt),
        firstLine(step.error ?? step.result)
      ])
    )
  ].join("\n")
