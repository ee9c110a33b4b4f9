/**
 * `Dashboard` — the web dashboard (`converge dashboard`, `effect/http`):
 * server-rendered pages over {@link Operations}, with a few lines of script
 * for live refresh and confirmations. No front-end framework, no bundle.
 *
 * | page | what |
 * | --- | --- |
 * | `/` | overview: activity of the last minute, outbox backlog, groups' lag and pending, dead-letter counts, sagas (refreshed every 2 s) |
 * | `/dlq` | dead letters, filtered by topic, group and reason |
 * | `/dlq/<topic>/<id>` | one dead letter: headers, payload, error, attempts; replay and purge |
 * | `/trace/<id>` | the audit timeline of a message or correlation id (refreshed every 2 s) |
 * | `/sagas`, `/sagas/<id>` | sagas by status; one saga's steps; resume and resolve when parked |
 * | `/api/status` | the overview as JSON |
 *
 * Actions are `POST`s behind a confirmation; `readOnly` hides them and
 * refuses them (403).
 *
 * @since 0.1.0
 */
import { createServer } from "node:http"
import type { Audit } from "@converge/core"
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Effect, Layer, type Scope } from "effect"
import { HttpRouter, HttpServer, type HttpServerRequest, HttpServerResponse } from "effect/http"
import * as Format from "./Format.ts"
import * as Operations from "./Operations.ts"

/**
 * Options of {@link serve}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** The port (default 4400; 0 picks a free one). */
  readonly port?: number | undefined
  /** The listen address (default `127.0.0.1`). */
  readonly host?: string | undefined
  /** Hide and refuse the actions (replay, purge, resume, resolve). */
  readonly readOnly?: boolean | undefined
}

const escapeHtml = (text: string): string =>
  text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;").replaceAll('"', "&quot;")

/** An HTML text node. */
const h = (text: string | number | undefined | null): string =>
  escapeHtml(text === undefined || text === null ? "" : String(text))

const style = `
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a:hover{color:#fff}header b{font-size:16px;margin-right:12px}
main{padding:20px 24px;max-width:1300px}h1{font-size:20px;margin:0 0 14px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0001}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e6e8ee;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:12px;text-transform:uppercase;color:#505a6e}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:14px;flex-wrap:wrap}.card{background:#fff;padding:12px 16px;min-width:150px;box-shadow:0 1px 2px #0001}
.card .v{font-size:26px;font-weight:600}.card .l{color:#5b6578;font-size:12px}
.bad{color:#b42318}.ok{color:#067647}pre{background:#fff;padding:10px;overflow:auto;box-shadow:0 1px 2px #0001;white-space:pre-wrap}
form.inline{display:inline}button{font:inherit;padding:5px 12px;border:1px solid #8893a8;background:#fff;cursor:pointer}
button.danger{border-color:#b42318;color:#b42318}.note{color:#5b6578}.flash{background:#ecfdf3;padding:8px 12px;margin-bottom:12px}
input,select{font:inherit;padding:4px 6px}dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{color:#5b6578}dd{margin:0}
`

const layout = (title: string, body: string, script = ""): string => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${h(title)} · converge</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>${style}</style></head>
<body><header><b>converge</b><a href="/">Overview</a><a href="/dlq">Dead letters</a><a href="/sagas">Sagas</a>
<form action="/trace" method="get" class="inline"><input name="id" placeholder="message or correlation id" size="38"> <button>Trace</button></form></header>
<main>${body}</main>${script === "" ? "" : `<script>${script}</script>`}</body></html>`

/** Reloads the part of the page with id `live` every 2 s (what the server renders there now). */
const liveScript = `setInterval(async()=>{try{const r=await fetch(location.href,{headers:{"x-live":"1"}});
if(!r.ok)return;const d=new DOMParser().parseFromString(await r.text(),"text/html");
const n=d.getElementById("live"),o=document.getElementById("live");if(n&&o)o.replaceWith(n)}catch{}},2000)`

const errorPanel = (e: Operations.OperationError) => `<p class="bad">${h(e.message)}</p>`

const overview = (ops: Operations.Operations) =>
  Effect.gen(function* () {
    const status = yield* Effect.exit(ops.status)
    const activity = yield* Effect.exit(ops.activity(60_000))
    const parts: Array<string> = []
    const cards: Array<string> = []
    const card = (label: string, value: string | number, bad = false) =>
      cards.push(
        `<div class="card"><div class="v${bad ? " bad" : ""}">${h(value)}</div><div class="l">${h(label)}</div></div>`
      )
    if (activity._tag === "Success") {
      const a = activity.value
      card("handled / min", a.handled ?? 0)
      card("published / min", (a.published ?? 0) + (a.relayed ?? 0))
      card("retried / min", a.retried ?? 0, (a.retried ?? 0) > 0)
    }
    if (status._tag === "Failure") {
      const error = status.cause.reasons.find((r) => r._tag === "Fail")
      parts.push(error?._tag === "Fail" ? errorPanel(error.error) : `<p class="bad">status failed</p>`)
    } else {
      const s = status.value
      const dead = (s.topics ?? []).reduce((n, t) => n + t.deadLetters, 0)
      card("dead letters", dead, dead > 0)
      if (s.outbox !== undefined) {
        card("outbox waiting", s.outbox.unpublished, s.outbox.unpublished > 0)
        card("oldest outbox row", s.outbox.unpublished === 0 ? "-" : Format.age(s.outbox.oldestMillis))
        card("outbox_dead rows", s.outbox.dead, s.outbox.dead > 0)
      }
      if (s.sagas !== undefined)
        card("sagas needing attention", s.sagas["needs-attention"], s.sagas["needs-attention"] > 0)
      if (s.topics !== undefined) {
        const rows = s.topics.flatMap((t) =>
          (t.groups.length === 0 ? [{ group: "-", pending: Number.NaN, lag: Number.NaN }] : t.groups).map(
            (
              g,
              i
            ) => `<tr><td>${i === 0 ? `<a href="/dlq?topic=${encodeURIComponent(t.topic)}">${h(t.topic)}</a>` : ""}</td>
<td>${h(g.group)}</td><td class="num">${Number.isNaN(g.pending) ? "-" : g.pending}</td><td class="num">${Number.isNaN(g.lag) ? "-" : g.lag}</td>
<td class="num${i === 0 && t.deadLetters > 0 ? " bad" : ""}">${i === 0 ? t.deadLetters : ""}</td></tr>`
          )
        )
        parts.push(
          `<h2>Topics and groups</h2><table><tr><th>Topic</th><th>Group</th><th>Pending</th><th>Lag</th><th>Dead letters</th></tr>${rows.join("") || `<tr><td colspan="5" class="note">no topics</td></tr>`}</table>`
        )
      } else parts.push(`<p class="note">No broker configured (--redis-url).</p>`)
      if (s.sagas !== undefined) {
        parts.push(
          `<h2>Sagas</h2><table><tr>${Object.keys(s.sagas)
            .map((k) => `<th>${h(k)}</th>`)
            .join("")}</tr><tr>${Object.entries(s.sagas)
            .map(([k, v]) => `<td class="num"><a href="/sagas?status=${k}">${v}</a></td>`)
            .join("")}</tr></table>`
        )
      }
    }
    return `<div id="live"><div class="cards">${cards.join("")}</div>${parts.join("")}
<p class="note">Sources: ${h(ops.sources.broker ?? "no broker")} · ${h(ops.sources.database ?? "no database")}${ops.sources.schema === undefined ? "" : ` (schema ${h(ops.sources.schema)})`}. Refreshed every 2 s.</p></div>`
  })

const deadLetterList = (ops: Operations.Operations, params: URLSearchParams) =>
  Effect.gen(function* () {
    const topic = params.get("topic") || undefined
    const group = params.get("group") || undefined
    const reason = params.get("reason") || undefined
    const topics = yield* Effect.exit(ops.topics)
    const names = topics._tag === "Success" ? topics.value.map((t) => t.name) : []
    const letters = yield* Effect.exit(ops.deadLetters({ topic, group, reason, limit: 500 }))
    const select = `<select name="topic"><option value="">every topic</option>${names
      .map((n) => `<option${n === topic ? " selected" : ""}>${h(n)}</option>`)
      .join("")}</select>`
    const form = `<form method="get" action="/dlq">${select} <input name="group" placeholder="group" value="${h(group)}">
<input name="reason" placeholder="reason" value="${h(reason)}"> <button>Filter</button></form>`
    if (letters._tag === "Failure") {
      const e = letters.cause.reasons.find((r) => r._tag === "Fail")
      return `<h1>Dead letters</h1>${form}${e?._tag === "Fail" ? errorPanel(e.error) : ""}`
    }
    const rows = letters.value
      .map(
        (
          d
        ) => `<tr><td><a class="dl" href="/dlq/${encodeURIComponent(d.topic)}/${encodeURIComponent(d.id)}">${h(d.id)}</a></td>
<td>${h(d.topic)}</td><td>${h(d.group)}</td><td>${h(d.reason)}</td><td class="num">${d.attempts}</td><td>${h(d.time)}</td>
<td>${h(Format.firstLine(d.error).slice(0, 120))}</td></tr>`
      )
      .join("")
    return `<h1>Dead letters</h1>${form}<p class="note">${letters.value.length} dead letter(s)${letters.value.length === 500 ? " (the first 500)" : ""}</p>
<table id="dead-letters"><tr><th>Entry</th><th>Topic</th><th>Group</th><th>Reason</th><th>Attempts</th><th>Dead-lettered</th><th>Error</th></tr>${rows}</table>`
  })

const confirmForm = (action: string, label: string, question: string, danger = false) =>
  `<form class="inline" method="post" action="${h(action)}" onsubmit="return confirm(${h(JSON.stringify(question))})"><button${danger ? ' class="danger"' : ""}>${h(label)}</button></form>`

const deadLetterPage = (ops: Operations.Operations, topic: string, id: string, readOnly: boolean, flash?: string) =>
  Effect.gen(function* () {
    const found = yield* Effect.exit(ops.deadLetter(topic, id))
    if (found._tag === "Failure") {
      const e = found.cause.reasons.find((r) => r._tag === "Fail")
      return `<h1>Dead letter ${h(id)}</h1>${flash === undefined ? "" : `<p class="flash">${h(flash)}</p>`}${e?._tag === "Fail" ? errorPanel(e.error) : ""}`
    }
    const d = Format.deadLetterDetail(found.value)
    const base = `/dlq/${encodeURIComponent(topic)}/${encodeURIComponent(id)}`
    const actions = readOnly
      ? `<p class="note">Read-only dashboard: no actions.</p>`
      : `<p>${d.messageId === null ? "" : confirmForm(`${base}/replay`, "Replay", `Replay dead letter ${id} to ${topic}?`)} ${confirmForm(`${base}/purge`, "Purge", `Delete dead letter ${id} for good?`, true)}</p>`
    return `<h1>Dead letter ${h(d.id)}</h1>${actions}<dl>
<dt>Topic</dt><dd>${h(d.topic)}</dd><dt>Group</dt><dd>${h(d.group || "(the broker)")}</dd><dt>Reason</dt><dd>${h(d.reason)}</dd>
<dt>Attempts</dt><dd>${d.attempts} (delivered ${d.deliveryCount} times)</dd><dt>Dead-lettered</dt><dd>${h(d.time)}</dd>
<dt>Message id</dt><dd>${d.messageId === null ? "(not an envelope)" : `<a href="/trace/${encodeURIComponent(d.messageId)}">${h(d.messageId)}</a>`}</dd>
<dt>Type</dt><dd>${h(d.type)}</dd><dt>Key</dt><dd>${h(d.key)}</dd></dl>
<h2>Error</h2><pre id="error">${h(d.error)}</pre><h2>Headers</h2><pre>${h(JSON.stringify(d.headers, null, 2))}</pre>
<h2>Payload</h2><pre id="payload">${h(d.data ?? JSON.stringify(d.fields, null, 2))}</pre>`
  })

const timelinePage = (ops: Operations.Operations, id: string, flash?: string) =>
  Effect.gen(function* () {
    const events = yield* Effect.exit(ops.trace(id))
    const rows = (list: ReadonlyArray<Audit.Stored>) =>
      list
        .map(
          (
            e
          ) => `<tr class="event" data-kind="${h(e.kind)}"><td>${h(Format.time(e.at))}</td><td><b>${h(e.kind)}</b></td><td>${h(e.topic)}</td>
<td>${h(e.group)}</td><td class="num">${h(e.attempt)}</td><td>${h(e.messageId)}</td>
<td>${h([e.reason, e.delayMs === undefined ? undefined : `in ${Format.age(e.delayMs)}`, Format.firstLine(e.error), e.detail].filter((x) => x !== undefined && x !== "").join("; "))}</td><td>${h(e.process)}</td></tr>`
        )
        .join("")
    const body =
      events._tag === "Failure"
        ? (() => {
            const e = events.cause.reasons.find((r) => r._tag === "Fail")
            return e?._tag === "Fail" ? errorPanel(e.error) : ""
          })()
        : events.value.length === 0
          ? `<p class="note">No audit events for this id yet.</p>`
          : `<table id="timeline"><tr><th>Time</th><th>Step</th><th>Topic</th><th>Group</th><th>Attempt</th><th>Message</th><th>Detail</th><th>Process</th></tr>${rows(events.value)}</table>`
    return `<h1>Timeline of ${h(id)}</h1>${flash === undefined ? "" : `<p class="flash">${h(flash)}</p>`}<div id="live">${body}<p class="note">Refreshed every 2 s.</p></div>`
  })

const sagaList = (ops: Operations.Operations, params: URLSearchParams) =>
  Effect.gen(function* () {
    const status = params.get("status") || undefined
    const sagas = yield* Effect.exit(ops.sagas({ status: status as never, limit: 200 }))
    if (sagas._tag === "Failure") {
      const e = sagas.cause.reasons.find((r) => r._tag === "Fail")
      return `<h1>Sagas</h1>${e?._tag === "Fail" ? errorPanel(e.error) : ""}`
    }
    const rows = sagas.value
      .map(
        (
          s
        ) => `<tr><td><a href="/sagas/${encodeURIComponent(s.executionId)}">${h(s.executionId)}</a></td><td>${h(s.name)}</td>
<td class="${s.status === "needs-attention" ? "bad" : ""}">${h(s.status)}</td><td>${h(Format.time(s.updatedAt))}</td><td>${h(Format.firstLine(s.error))}</td></tr>`
      )
      .join("")
    const filters = ["", "running", "compensating", "completed", "compensated", "needs-attention"]
      .map((f) => `<a href="/sagas${f === "" ? "" : `?status=${f}`}">${f === "" ? "all" : f}</a>`)
      .join(" · ")
    return `<h1>Sagas${status === undefined ? "" : `: ${h(status)}`}</h1><p>${filters}</p>
<table id="sagas"><tr><th>Execution id</th><th>Saga</th><th>Status</th><th>Updated</th><th>Error</th></tr>${rows || `<tr><td colspan="5" class="note">none</td></tr>`}</table>`
  })

const sagaPage = (ops: Operations.Operations, id: string, readOnly: boolean, flash?: string) =>
  Effect.gen(function* () {
    const found = yield* Effect.exit(ops.saga(id))
    const head = `<h1>Saga ${h(id)}</h1>${flash === undefined ? "" : `<p class="flash">${h(flash)}</p>`}`
    if (found._tag === "Failure") {
      const e = found.cause.reasons.find((r) => r._tag === "Fail")
      return `${head}${e?._tag === "Fail" ? errorPanel(e.error) : ""}`
    }
    const s = found.value
    const base = `/sagas/${encodeURIComponent(id)}`
    const actions =
      s.parked === undefined || readOnly
        ? ""
        : `<p>Parked at the compensation of <b>${h(s.parked.step)}</b>. ${confirmForm(`${base}/resume`, "Resume", "Run the failed compensation again?")} ${confirmForm(`${base}/resolve`, "Resolve", "Mark the failed compensation as done by hand?", true)}</p>`
    const steps = s.steps
      .map(
        (
          st
        ) => `<tr><td>${h(st.step)}</td><td>${h(st.phase)}</td><td>${h(st.status)}</td><td class="num">${st.attempts}</td>
<td>${h(Format.time(st.startedAt))}</td><td>${st.finishedAt === undefined ? "" : h(Format.age(st.finishedAt - st.startedAt))}</td><td>${h(Format.firstLine(st.error ?? st.result))}</td></tr>`
      )
      .join("")
    return `${head}<dl><dt>Saga</dt><dd>${h(s.name)}</dd><dt>Status</dt><dd class="${s.status === "needs-attention" ? "bad" : ""}">${h(s.status)}</dd>
<dt>Created</dt><dd>${h(Format.time(s.createdAt))}</dd><dt>Updated</dt><dd>${h(Format.time(s.updatedAt))}</dd>
<dt>Error</dt><dd>${h(s.error ?? "-")}</dd><dt>Timeline</dt><dd><a href="/trace/${encodeURIComponent(id)}">audit trail</a></dd></dl>${actions}
<h2>Payload</h2><pre>${h(s.payload)}</pre><h2>Steps</h2><table><tr><th>Step</th><th>Phase</th><th>Status</th><th>Attempts</th><th>Started</th><th>Took</th><th>Result / error</th></tr>${steps}</table>`
  })

const htmlResponse = (body: string, status = 200) =>
  HttpServerResponse.text(body, { status, contentType: "text/html; charset=utf-8" })

const page = (title: string, body: string, live = false) => htmlResponse(layout(title, body, live ? liveScript : ""))

const see = (location: string) => HttpServerResponse.redirect(location, { status: 303 })

/**
 * The dashboard's request handler over `ops` (routes in the module comment).
 *
 * @since 0.1.0
 */
export const handler =
  (ops: Operations.Operations, options?: Options) =>
  (request: HttpServerRequest.HttpServerRequest): Effect.Effect<HttpServerResponse.HttpServerResponse> =>
    Effect.gen(function* () {
      const readOnly = options?.readOnly === true
      const url = new URL(request.url, "http://dashboard")
      const parts = url.pathname
        .split("/")
        .filter((p) => p !== "")
        .map(decodeURIComponent)
      const flash = url.searchParams.get("flash") ?? undefined
      if (request.method === "POST") {
        if (readOnly) return HttpServerResponse.text("read-only dashboard: actions are off", { status: 403 })
        if (parts[0] === "dlq" && parts.length === 4) {
          const [, topic, id, action] = parts as [string, string, string, string]
          if (action === "replay") {
            const letter = yield* Effect.exit(ops.deadLetter(topic, id))
            const replayed = yield* Effect.exit(ops.replay(topic, id))
            if (replayed._tag === "Failure" || letter._tag === "Failure" || letter.value.envelope === undefined) {
              const e = replayed._tag === "Failure" ? replayed.cause.reasons.find((r) => r._tag === "Fail") : undefined
              return see(
                `/dlq/${encodeURIComponent(topic)}/${encodeURIComponent(id)}?flash=${encodeURIComponent(e?._tag === "Fail" ? e.error.message : "replay failed")}`
              )
            }
            return see(
              `/trace/${encodeURIComponent(letter.value.envelope.id)}?flash=${encodeURIComponent(`Replayed dead letter ${id} as entry ${replayed.value}`)}`
            )
          }
          if (action === "purge") {
            const purged = yield* Effect.exit(ops.purge(topic, [id]))
            return see(
              `/dlq?topic=${encodeURIComponent(topic)}&flash=${encodeURIComponent(purged._tag === "Success" ? `Purged ${id}` : "purge failed")}`
            )
          }
        }
        if (parts[0] === "sagas" && parts.length === 3 && (parts[2] === "resume" || parts[2] === "resolve")) {
          const id = parts[1]!
          const done = yield* Effect.exit(parts[2] === "resume" ? ops.resumeSaga(id) : ops.resolveSaga(id))
          const e = done._tag === "Failure" ? done.cause.reasons.find((r) => r._tag === "Fail") : undefined
          const message =
            done._tag === "Success"
              ? `${parts[2] === "resume" ? "Resumed" : "Resolved"}`
              : e?._tag === "Fail"
                ? e.error.message
                : "failed"
          return see(`/sagas/${encodeURIComponent(id)}?flash=${encodeURIComponent(message)}`)
        }
        return HttpServerResponse.text("not found", { status: 404 })
      }
      if (parts.length === 0) return page("Overview", `<h1>Overview</h1>${yield* overview(ops)}`, true)
      if (parts[0] === "api" && parts[1] === "status") {
        const status = yield* Effect.exit(ops.status)
        return status._tag === "Success"
          ? yield* HttpServerResponse.json(status.value).pipe(Effect.orDie)
          : HttpServerResponse.text("status failed", { status: 503 })
      }
      if (parts[0] === "dlq" && parts.length === 1) {
        const body = yield* deadLetterList(ops, url.searchParams)
        return page("Dead letters", `${flash === undefined ? "" : `<p class="flash">${h(flash)}</p>`}${body}`)
      }
      if (parts[0] === "dlq" && parts.length === 3) {
        return page(`Dead letter ${parts[2]}`, yield* deadLetterPage(ops, parts[1]!, parts[2]!, readOnly, flash))
      }
      if (parts[0] === "trace") {
        const id = parts[1] ?? url.searchParams.get("id") ?? ""
        if (id === "") return see("/")
        if (parts[1] === undefined) return see(`/trace/${encodeURIComponent(id)}`)
        return page(`Timeline of ${id}`, yield* timelinePage(ops, id, flash), true)
      }
      if (parts[0] === "sagas" && parts.length === 1) return page("Sagas", yield* sagaList(ops, url.searchParams))
      if (parts[0] === "sagas" && parts.length === 2) {
        return page(`Saga ${parts[1]}`, yield* sagaPage(ops, parts[1]!, readOnly, flash))
      }
      return htmlResponse(layout("Not found", `<h1>Not found</h1><p><a href="/">Overview</a></p>`), 404)
    })

/**
 * Serves the dashboard until the scope closes; returns its URL (`http://127.0.0.1:4400`).
 *
 * @since 0.1.0
 */
export const serve = (
  ops: Operations.Operations,
  options?: Options
): Effect.Effect<string, Operations.OperationError, Scope.Scope> =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const host = options?.host ?? "127.0.0.1"
    const server = yield* Layer.buildWithScope(
      NodeHttpServer.layer(() => createServer(), { port: options?.port ?? 4400, host }),
      scope
    ).pipe(
      Effect.mapError(
        (e) =>
          new Operations.OperationError({
            kind: "unavailable",
            message: `cannot listen on ${host}:${options?.port ?? 4400}: ${e instanceof Error ? e.message : String((e as { cause?: unknown }).cause ?? e)}`
          })
      )
    )
    const app = HttpRouter.add("*", "/*", handler(ops, options))
    yield* Layer.buildWithScope(
      HttpRouter.serve(app, { disableLogger: true, disableListenLog: true }).pipe(
        Layer.provide(Layer.succeedContext(server))
      ),
      scope
    )
    return HttpServer.formatAddress(Context.get(server, HttpServer.HttpServer).address)
  })
