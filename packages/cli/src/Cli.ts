/**
 * `Cli` — the `converge` command (`effect/cli`): dead letters, status,
 * traces, sagas, the outbox and the dashboard, over {@link Operations}.
 *
 * Settings come from flags or the environment: `--redis-url`/`REDIS_URL`
 * (with `--redis-cluster`/`CONVERGE_REDIS_CLUSTER`, or several URLs, a Redis
 * Cluster), `--nats-url`/`NATS_URL` (NATS JetStream instead of Redis),
 * `--database-url`/`DATABASE_URL`, `--prefix`/`CONVERGE_REDIS_PREFIX`,
 * `--schema`/`CONVERGE_SCHEMA`, `--saga-schema`/`CONVERGE_SAGA_SCHEMA`.
 * Human-readable tables by default, `--json` for scripts; exit codes in
 * `Operations.exitCodes`.
 *
 * @since 0.1.0
 */
import { Console, Effect, Option, Redacted, References } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import * as Dashboard from "./Dashboard.ts"
import * as Environment from "./Environment.ts"
import * as Format from "./Format.ts"
import * as Operations from "./Operations.ts"

/** The version the CLI reports. */
const version = "0.1.0"

const env = (name: string): string | undefined => {
  const v = globalThis.process?.env?.[name]
  return v === undefined || v === "" ? undefined : v
}

const root = Command.make("converge").pipe(
  Command.withSharedFlags({
    redisUrl: Flag.String("redis-url").pipe(
      Flag.withDescription("Redis URL of the Redis Streams broker (default: REDIS_URL)"),
      Flag.optional
    ),
    redisCluster: Flag.Boolean("redis-cluster").pipe(
      Flag.withDescription(
        "the Redis URLs (comma-separated) are Redis Cluster nodes (default: CONVERGE_REDIS_CLUSTER)"
      ),
      Flag.withDefault(false)
    ),
    natsUrl: Flag.String("nats-url").pipe(
      Flag.withDescription("NATS URL(s), comma-separated, of the NATS JetStream broker (default: NATS_URL)"),
      Flag.optional
    ),
    databaseUrl: Flag.String("database-url").pipe(
      Flag.withDescription("Postgres URL of the store (default: DATABASE_URL)"),
      Flag.optional
    ),
    prefix: Flag.String("prefix").pipe(
      Flag.withDescription(
        "the broker's key/stream prefix (default: CONVERGE_REDIS_PREFIX, CONVERGE_NATS_PREFIX or converge)"
      ),
      Flag.optional
    ),
    schema: Flag.String("schema").pipe(
      Flag.withDescription("the store's Postgres schema (default: CONVERGE_SCHEMA or converge)"),
      Flag.optional
    ),
    sagaSchema: Flag.String("saga-schema").pipe(
      Flag.withDescription("the saga store's schema (default: CONVERGE_SAGA_SCHEMA or --schema)"),
      Flag.optional
    ),
    json: Flag.Boolean("json").pipe(
      Flag.withDescription("print JSON (shapes: docs/operations.md)"),
      Flag.withDefault(false)
    )
  }),
  Command.withDescription("Operate a Converge system: dead letters, status, traces, sagas, the outbox, a dashboard.")
)

/** The operations over the settings of the command line, in the command's scope. */
const operations = Effect.gen(function* () {
  const flags = yield* root
  const pick = (flag: Option.Option<string>, name: string) => Option.getOrUndefined(flag) ?? env(name)
  // a flag for one broker overrides the environment's URL of the other
  const redisFlag = Option.getOrUndefined(flags.redisUrl)
  const natsFlag = Option.getOrUndefined(flags.natsUrl)
  const redis = redisFlag ?? (natsFlag === undefined ? env("REDIS_URL") : undefined)
  const nats = natsFlag ?? (redisFlag === undefined ? env("NATS_URL") : undefined)
  const database = pick(flags.databaseUrl, "DATABASE_URL")
  const schema = pick(flags.schema, "CONVERGE_SCHEMA")
  return yield* Environment.make({
    redisUrl: redis === undefined ? undefined : Redacted.make(redis),
    redisCluster: flags.redisCluster || env("CONVERGE_REDIS_CLUSTER") === "true",
    natsUrl: nats === undefined ? undefined : Redacted.make(nats),
    databaseUrl: database === undefined ? undefined : Redacted.make(database),
    prefix: pick(
      flags.prefix,
      redis === undefined && nats !== undefined ? "CONVERGE_NATS_PREFIX" : "CONVERGE_REDIS_PREFIX"
    ),
    schema,
    sagaSchema: pick(flags.sagaSchema, "CONVERGE_SAGA_SCHEMA") ?? schema
  })
})

/** Prints `value` as JSON with `--json`, else the text `human` makes. */
const emit = <A>(value: A, human: (a: A) => string) =>
  Effect.flatMap(root, (flags) => Console.log(flags.json ? JSON.stringify(value, null, 2) : human(value)))

/** A time flag: RFC 3339, or an age like `30m`, `2h`, `7d` (that long ago). */
const parseTime = (text: string): Effect.Effect<number, Operations.OperationError> => {
  const ago = /^(\d+)\s*(s|m|h|d)$/.exec(text.trim())
  if (ago !== null) {
    const unit = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[ago[2] as "s" | "m" | "h" | "d"]
    return Effect.map(
      Effect.clockWith((c) => Effect.succeed(c.currentTimeMillisUnsafe())),
      (now) => now - Number(ago[1]) * unit
    )
  }
  const at = Date.parse(text)
  return Number.isNaN(at)
    ? Effect.fail(
        new Operations.OperationError({
          kind: "invalid",
          message: `${JSON.stringify(text)} is not a time: give RFC 3339 (2026-12-01T10:00:00Z) or an age (30m, 2h, 7d)`
        })
      )
    : Effect.succeed(at)
}

const optionalTime = (flag: Option.Option<string>) =>
  Option.isNone(flag) ? Effect.succeed(undefined) : parseTime(flag.value)

// --- dlq ---------------------------------------------------------------------

const filterFlags = {
  topic: Flag.String("topic").pipe(
    Flag.withAlias("t"),
    Flag.withDescription("the topic (default: every topic)"),
    Flag.optional
  ),
  group: Flag.String("group").pipe(Flag.withAlias("g"), Flag.withDescription("only this group's"), Flag.optional),
  reason: Flag.String("reason").pipe(
    Flag.withDescription("only this reason (decode, permanent, exhausted, ...)"),
    Flag.optional
  ),
  since: Flag.String("since").pipe(
    Flag.withDescription("dead-lettered at or after (RFC 3339, or 30m, 2h, 7d ago)"),
    Flag.optional
  ),
  until: Flag.String("until").pipe(Flag.withDescription("dead-lettered before (RFC 3339, or an age)"), Flag.optional)
}

const filterOf = (f: {
  readonly topic: Option.Option<string>
  readonly group: Option.Option<string>
  readonly reason: Option.Option<string>
  readonly since: Option.Option<string>
  readonly until: Option.Option<string>
}) =>
  Effect.gen(function* () {
    return {
      topic: Option.getOrUndefined(f.topic),
      group: Option.getOrUndefined(f.group),
      reason: Option.getOrUndefined(f.reason),
      since: yield* optionalTime(f.since),
      until: yield* optionalTime(f.until)
    }
  })

const dlqList = Command.make(
  "list",
  {
    ...filterFlags,
    limit: Flag.Int("limit").pipe(Flag.withDescription("at most this many (default 100)"), Flag.withDefault(100))
  },
  (f) =>
    Effect.gen(function* () {
      const ops = yield* operations
      const letters = yield* ops.deadLetters({ ...(yield* filterOf(f)), limit: f.limit })
      yield* emit(letters.map(Format.deadLetterSummary), () =>
        letters.length === 0
          ? "no dead letters"
          : `${Format.deadLetterTable(letters)}\n\n${letters.length} dead letter(s)`
      )
    })
).pipe(Command.withDescription("List dead letters, oldest first, filtered by topic, group, reason and time."))

const topicFlag = Flag.String("topic").pipe(Flag.withAlias("t"), Flag.withDescription("the topic"))

const dlqShow = Command.make("show", { topic: topicFlag, id: Argument.String("id") }, ({ topic, id }) =>
  Effect.gen(function* () {
    const ops = yield* operations
    const d = yield* ops.deadLetter(topic, id)
    yield* emit(Format.deadLetterDetail(d), (j) =>
      [
        `dead letter ${j.id} of ${j.topic}`,
        `  group:          ${j.group || "(none: dead-lettered by the broker)"}`,
        `  reason:         ${j.reason}`,
        `  attempts:       ${j.attempts} (delivered ${j.deliveryCount} times)`,
        `  dead-lettered:  ${j.time}`,
        `  message id:     ${j.messageId ?? "(not an envelope)"}`,
        `  type:           ${j.type ?? "-"}`,
        `  key:            ${j.key ?? "-"}`,
        `  headers:        ${JSON.stringify(j.headers)}`,
        `  error:          ${(j.error ?? "").split("\n").join("\n                  ")}`,
        `  payload:        ${j.data ?? JSON.stringify(j.fields)}`
      ].join("\n")
    )
  })
).pipe(Command.withDescription("Show one dead letter: headers, payload, error, attempts."))

/** Progress of a many-message action on stderr: a bar on a terminal, a line per tenth otherwise. */
const progress = (verb: string, total: number) => {
  const tty = globalThis.process?.stderr?.isTTY === true
  let lastTenth = -1
  return (done: number) =>
    Effect.sync(() => {
      if (total === 0) return
      if (tty) {
        const width = 30
        const filled = Math.round((done / total) * width)
        globalThis.process.stderr.write(
          `\r${verb} [${"#".repeat(filled)}${"-".repeat(width - filled)}] ${done}/${total}${done === total ? "\n" : ""}`
        )
        return
      }
      const tenth = Math.floor((done / total) * 10)
      if (tenth !== lastTenth || done === total) {
        lastTenth = tenth
        globalThis.process?.stderr?.write(`${verb} ${done}/${total}\n`)
      }
    })
}

const selection = {
  topic: topicFlag,
  ids: Argument.String("id").pipe(Argument.withDescription("dead-letter entry ids"), Argument.variadic()),
  all: Flag.Boolean("all").pipe(
    Flag.withDescription("every dead letter that matches the filters"),
    Flag.withDefault(false)
  ),
  group: filterFlags.group,
  reason: filterFlags.reason,
  since: filterFlags.since,
  until: filterFlags.until,
  dryRun: Flag.Boolean("dry-run").pipe(
    Flag.withDescription("show what would be done, do nothing"),
    Flag.withDefault(false)
  )
}

type Selection = {
  readonly topic: string
  readonly ids: ReadonlyArray<string>
  readonly all: boolean
  readonly group: Option.Option<string>
  readonly reason: Option.Option<string>
  readonly since: Option.Option<string>
  readonly until: Option.Option<string>
}

/** The dead letters a replay or purge acts on: the ids given, or with `--all` those matching the filters. */
const selected = (ops: Operations.Operations, s: Selection) =>
  Effect.gen(function* () {
    const filtered =
      Option.isSome(s.group) || Option.isSome(s.reason) || Option.isSome(s.since) || Option.isSome(s.until)
    if (s.ids.length > 0 && (s.all || filtered)) {
      return yield* new Operations.OperationError({
        kind: "invalid",
        message: "give dead-letter ids, or --all with filters, not both"
      })
    }
    if (s.ids.length === 0 && !s.all) {
      return yield* new Operations.OperationError({
        kind: "invalid",
        message: "give dead-letter ids, or --all (with --group, --reason, --since, --until to narrow it)"
      })
    }
    if (s.ids.length > 0) return yield* Effect.forEach(s.ids, (id) => ops.deadLetter(s.topic, id))
    return yield* ops.deadLetters({ ...(yield* filterOf({ ...s, topic: Option.some(s.topic) })) })
  })

const dlqReplay = Command.make("replay", selection, (s) =>
  Effect.gen(function* () {
    const ops = yield* operations
    const letters = yield* selected(ops, s)
    if (s.dryRun) {
      yield* emit(
        { topic: s.topic, dryRun: true, matched: letters.length, deadLetters: letters.map(Format.deadLetterSummary) },
        () =>
          `${letters.length === 0 ? "" : `${Format.deadLetterTable(letters)}\n\n`}dry run: would replay ${letters.length} dead letter(s) of ${s.topic}`
      )
      return
    }
    const report = progress("replaying", letters.length)
    const replayed: Array<{ readonly id: string; readonly messageId: string | null; readonly entryId: string }> = []
    const failed: Array<{ readonly id: string; readonly error: string }> = []
    // a page at a time: one publish and one purge per 100 (DeadLetter.replayMany); a message refused fails
    // alone, an unreachable broker stops the run
    for (let i = 0; i < letters.length; i += 100) {
      const page = letters.slice(i, i + 100)
      const outcomes = yield* ops.replayMany(s.topic, page)
      outcomes.forEach((o, k) => {
        if (o._tag === "Replayed") {
          replayed.push({ id: o.id, messageId: page[k]!.envelope?.id ?? null, entryId: o.entryId })
        } else failed.push({ id: o.id, error: o.error.message })
      })
      yield* report(replayed.length + failed.length)
    }
    yield* emit({ topic: s.topic, dryRun: false, matched: letters.length, replayed, failed }, () =>
      [
        `replayed ${replayed.length} of ${letters.length} dead letter(s) of ${s.topic}${failed.length === 0 ? "" : `; ${failed.length} failed:`}`,
        ...failed.map((f) => `  ${f.id}: ${f.error}`)
      ].join("\n")
    )
    if (failed.length > 0) {
      return yield* new Operations.OperationError({
        kind: "failed",
        message: `${failed.length} of ${letters.length} replays failed`
      })
    }
  })
).pipe(Command.withDescription("Replay dead letters (same message id, attempt 1) to their topic; --dry-run first."))

const dlqPurge = Command.make("purge", selection, (s) =>
  Effect.gen(function* () {
    const ops = yield* operations
    const letters = yield* selected(ops, s)
    const ids = letters.map((d) => d.id)
    if (s.dryRun) {
      yield* emit(
        { topic: s.topic, dryRun: true, matched: ids.length, ids },
        () =>
          `${letters.length === 0 ? "" : `${Format.deadLetterTable(letters)}\n\n`}dry run: would purge ${ids.length} dead letter(s) of ${s.topic}`
      )
      return
    }
    const purged = ids.length === 0 ? 0 : yield* ops.purge(s.topic, ids)
    yield* emit(
      { topic: s.topic, dryRun: false, matched: ids.length, purged, ids },
      () => `purged ${purged} dead letter(s) of ${s.topic}`
    )
  })
).pipe(Command.withDescription("Delete dead letters for good; --dry-run first."))

const dlq = Command.make("dlq").pipe(
  Command.withDescription("Dead-letter queues: list, show, replay, purge."),
  Command.withSubcommands([dlqList, dlqShow, dlqReplay, dlqPurge])
)

// --- status, trace -------------------------------------------------------------

const statusText = (ops: Operations.Operations, st: Operations.Status): string => {
  const out: Array<string> = []
  if (st.outbox !== undefined) {
    out.push(
      `outbox (${ops.sources.database}, schema ${st.outbox.schema}): ${st.outbox.unpublished} waiting${st.outbox.unpublished > 0 ? `, oldest ${Format.age(st.outbox.oldestMillis)}` : ""}; ${st.outbox.dead} in outbox_dead`
    )
  } else out.push("outbox: no database (--database-url or DATABASE_URL)")
  if (st.topics !== undefined) {
    out.push("", `broker (${ops.sources.broker}):`)
    const rows: Array<Array<string>> = []
    for (const t of st.topics) {
      if (t.groups.length === 0) rows.push([t.topic, "-", "-", "-", String(t.deadLetters)])
      t.groups.forEach((g, i) => {
        rows.push([
          i === 0 ? t.topic : "",
          g.group,
          String(g.pending),
          String(g.lag),
          i === 0 ? String(t.deadLetters) : ""
        ])
      })
    }
    out.push(
      rows.length === 0 ? "  no topics" : Format.table(["TOPIC", "GROUP", "PENDING", "LAG", "DEAD LETTERS"], rows)
    )
  } else out.push("", "broker: none (--redis-url or REDIS_URL, --nats-url or NATS_URL)")
  if (st.sagas !== undefined) {
    const s = st.sagas
    out.push(
      "",
      `sagas (schema ${ops.sources.sagaSchema}): ${s["needs-attention"]} need attention, ${s.running} running, ${s.compensating} compensating, ${s.completed} completed, ${s.compensated} compensated`
    )
  }
  return out.join("\n")
}

const status = Command.make("status", {}, () =>
  Effect.gen(function* () {
    const ops = yield* operations
    const st = yield* ops.status
    yield* emit(st, (s) => statusText(ops, s))
  })
).pipe(
  Command.withDescription("Outbox backlog and oldest age, per group lag and pending, dead-letter counts, parked sagas.")
)

const trace = Command.make(
  "trace",
  { id: Argument.String("id").pipe(Argument.withDescription("a message id or a correlation id")) },
  ({ id }) =>
    Effect.gen(function* () {
      const ops = yield* operations
      const events = yield* ops.trace(id)
      if (events.length === 0) {
        return yield* new Operations.OperationError({
          kind: "not-found",
          message: `no audit events for ${id} (is the audit on for its topic? see docs/observability.md)`
        })
      }
      yield* emit(events, (e) => `${Format.timeline(e)}\n\n${e.length} event(s)`)
    })
).pipe(Command.withDescription("The audit timeline of a message id or a correlation id, across services."))

// --- saga --------------------------------------------------------------------------

const sagaStatuses = ["running", "compensating", "completed", "compensated", "needs-attention"] as const

const sagaList = Command.make(
  "list",
  {
    status: Flag.Literals("status", sagaStatuses).pipe(
      Flag.withAlias("s"),
      Flag.withDescription("only this status"),
      Flag.optional
    ),
    name: Flag.String("name").pipe(Flag.withDescription("only this saga"), Flag.optional),
    limit: Flag.Int("limit").pipe(Flag.withDefault(100))
  },
  (f) =>
    Effect.gen(function* () {
      const ops = yield* operations
      const sagas = yield* ops.sagas({
        status: Option.getOrUndefined(f.status),
        name: Option.getOrUndefined(f.name),
        limit: f.limit
      })
      yield* emit(sagas, (s) => (s.length === 0 ? "no sagas" : `${Format.sagaTable(s)}\n\n${s.length} saga(s)`))
    })
).pipe(Command.withDescription("Sagas, newest first, by status and name."))

const executionId = Argument.String("execution-id")

const sagaShow = Command.make("show", { executionId }, ({ executionId }) =>
  Effect.gen(function* () {
    const ops = yield* operations
    yield* emit(yield* ops.saga(executionId), Format.sagaDetail)
  })
).pipe(Command.withDescription("One saga with its steps, results, errors and timings."))

const decision = (name: "resume" | "resolve", description: string) =>
  Command.make(name, { executionId }, ({ executionId }) =>
    Effect.gen(function* () {
      const ops = yield* operations
      yield* name === "resume" ? ops.resumeSaga(executionId) : ops.resolveSaga(executionId)
      yield* emit({ executionId, action: name }, () =>
        name === "resume"
          ? `saga ${executionId} resumed: its failed compensation runs again on its coordinator`
          : `saga ${executionId} resolved: its coordinator goes on compensating the other steps`
      )
    })
  ).pipe(Command.withDescription(description))

const saga = Command.make("saga").pipe(
  Command.withDescription("Sagas: list, show, resume, resolve."),
  Command.withSubcommands([
    sagaList,
    sagaShow,
    decision("resume", "Run a parked saga's failed compensation again (after fixing its cause)."),
    decision("resolve", "Mark a parked saga's failed compensation as done by hand; the saga goes on.")
  ])
)

// --- outbox ------------------------------------------------------------------------

const outboxDead = Command.make("dead", { limit: Flag.Int("limit").pipe(Flag.withDefault(100)) }, ({ limit }) =>
  Effect.gen(function* () {
    const ops = yield* operations
    const rows = yield* ops.outboxDead(limit)
    yield* emit(rows, (r) =>
      r.length === 0
        ? "outbox_dead is empty"
        : `${Format.table(
            ["SEQ", "MESSAGE ID", "TOPIC", "REASON", "MOVED", "ERROR"],
            r.map((x) => [x.seq, x.messageId, x.topic, x.reason, x.movedAt, Format.firstLine(x.error)])
          )}\n\n${r.length} row(s)`
    )
  })
).pipe(Command.withDescription("Rows the relay moved aside (malformed, or refused by the broker for good)."))

const outboxRequeue = Command.make(
  "requeue",
  {
    seqs: Argument.String("seq").pipe(Argument.variadic()),
    all: Flag.Boolean("all").pipe(Flag.withDescription("every row of outbox_dead"), Flag.withDefault(false))
  },
  ({ seqs, all }) =>
    Effect.gen(function* () {
      if (seqs.length === 0 && !all) {
        return yield* new Operations.OperationError({ kind: "invalid", message: "give row seqs, or --all" })
      }
      if (seqs.length > 0 && all) {
        return yield* new Operations.OperationError({ kind: "invalid", message: "give row seqs or --all, not both" })
      }
      if (seqs.some((s) => !/^[0-9]{1,19}$/.test(s))) {
        return yield* new Operations.OperationError({
          kind: "invalid",
          message: "a seq is a number (see converge outbox dead)"
        })
      }
      const ops = yield* operations
      const requeued = yield* ops.requeue(all ? undefined : seqs)
      yield* emit({ requeued }, () => `requeued ${requeued} row(s) into the outbox`)
    })
).pipe(Command.withDescription("Move outbox_dead rows back into the outbox once their cause is fixed."))

const outbox = Command.make("outbox").pipe(
  Command.withDescription("The outbox's dead rows: list, requeue."),
  Command.withSubcommands([outboxDead, outboxRequeue])
)

// --- dashboard ---------------------------------------------------------------------

const dashboard = Command.make(
  "dashboard",
  {
    port: Flag.Int("port").pipe(Flag.withAlias("p"), Flag.withDefault(4400)),
    host: Flag.String("host").pipe(
      Flag.withDescription("listen address (default 127.0.0.1)"),
      Flag.withDefault("127.0.0.1")
    ),
    readOnly: Flag.Boolean("read-only").pipe(
      Flag.withDescription("no replay, purge, resume or resolve"),
      Flag.withDefault(false)
    )
  },
  ({ port, host, readOnly }) =>
    Effect.gen(function* () {
      const ops = yield* operations
      const url = yield* Dashboard.serve(ops, { port, host, readOnly })
      yield* Console.log(`converge dashboard on ${url}${readOnly ? " (read-only)" : ""}; Ctrl-C stops it`)
      return yield* Effect.never
    })
).pipe(Command.withDescription("A web dashboard: overview, dead letters, timelines, sagas."))

/**
 * The `converge` command tree.
 *
 * @since 0.1.0
 */
export const command = root.pipe(Command.withSubcommands([status, dlq, trace, saga, outbox, dashboard]))

/**
 * Runs the command line `args` (without `node` and the script); resolves to the exit code. Errors are
 * printed on stderr as `converge: <message>`.
 *
 * @since 0.1.0
 */
export const run = (args: ReadonlyArray<string>) =>
  Command.runWith(command, { version })(args).pipe(
    Effect.scoped,
    // a tool reports its outcome itself: the libraries' warnings (a client's reconnect attempts) stay out of
    // its output unless `--log-level` asks for them
    Effect.provideService(References.MinimumLogLevel, "Error"),
    Effect.as(Operations.exitCodes.ok),
    Effect.catch((error: unknown) => {
      if (error instanceof Operations.OperationError) {
        return Effect.as(Console.error(`converge: ${error.message}`), Operations.exitCodes[error.kind])
      }
      // effect/cli's own errors (an unknown flag, a missing argument): already shown with the help
      return Effect.succeed(Operations.exitCodes.invalid)
    })
  )
