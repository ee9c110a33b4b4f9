/**
 * `SqlStore` — where the outbox and the inbox live: one Postgres schema, its
 * migrations, and the settings every process that shares it must agree on.
 *
 * ```ts
 * const Store = SqlStore.layer({ schema: "converge", partitions: 16 }) // needs SqlClient
 * const Live = Layer.mergeAll(Outbox.layer(), Inbox.layer(), OutboxRelay.layer()).pipe(
 *   Layer.provideMerge(Store),
 *   Layer.provide(PgClient.layer({ url: Redacted.make(process.env.DATABASE_URL!) }))
 * )
 * ```
 *
 * The layer runs the migrations (unless `migrate: false`), serialised across
 * processes by an advisory lock, and checks that the stored partition count
 * is the one configured: publishers and relays must hash keys the same way,
 * or two relays could reorder a key.
 *
 * Tables (all in the configured schema):
 *
 * | table | holds |
 * | --- | --- |
 * | `migrations` | applied migration versions |
 * | `settings` | `partitions` (fixed at the first migration) |
 * | `outbox` | messages written by `Outbox.publish`; `published_at` is set once the broker confirmed |
 * | `outbox_dead` | rows the relay could not publish (poison), with `reason` and `error` |
 * | `inbox` | `(consumer, message_id)` of every message whose effect committed |
 * | `sagas` | one row per saga: name, status, payload, error, where it is parked (`SagaPg.store`) |
 * | `saga_steps` | each saga step and compensation: status, result or error, attempts, timings |
 * | `audit` | the audit trail of every message's lifecycle steps, a row per batch of events (`AuditPg`) |
 *
 * @since 0.1.0
 */

import { Name, Partition } from "@converge/core"
import { Context, Effect, Latch, Layer, Schema } from "effect"
import { SqlClient } from "effect/sql"
import type { SqlError } from "effect/sql/SqlError"

/**
 * The store's settings disagree with the database, or the database is not
 * usable as a store. `message` says what to change.
 *
 * @since 0.1.0
 */
export class StoreMismatch extends Schema.TaggedError<StoreMismatch>("@converge/store-postgres/SqlStore/StoreMismatch")(
  "StoreMismatch",
  { message: Schema.String }
) {}

/**
 * Options of {@link layer}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** The Postgres schema of the tables (default `converge`); see `Name` for the rules. */
  readonly schema?: string | undefined
  /**
   * How many partitions the outbox hashes keys into (default 16). Each
   * partition is relayed by one relay at a time, so this bounds how many
   * relays work in parallel. Fixed when the schema is first migrated.
   */
  readonly partitions?: number | undefined
  /** Run the migrations when the layer is built (default `true`). */
  readonly migrate?: boolean | undefined
}

/**
 * The store service: the SQL client, the schema and the shared wake-up
 * signal between `Outbox` (which nudges after commit) and `OutboxRelay`.
 *
 * @since 0.1.0
 */
export class SqlStore extends Context.Service<
  SqlStore,
  {
    readonly sql: SqlClient.SqlClient
    readonly schema: string
    readonly partitions: number
    /** `<schema>.<name>`: a qualified table name (the schema is validated, never quoted). */
    readonly table: (name: string) => string
    /** The `LISTEN`/`NOTIFY` channel the outbox trigger signals on commit. */
    readonly channel: string
    /** Key of the advisory locks of this store (partitions use it as the first half). */
    readonly lockSpace: number
    /**
     * Wakes the relays of this process. `xid`: the id (decimal text) of the
     * committed transaction that wrote outbox rows, when known — a relay
     * then keeps trying until it has read past it, even while an older
     * transaction holds the rows back.
     */
    readonly nudge: (xid?: string) => void
    /** Completes at the next {@link nudge} (or at once if one came since the last {@link takeWakeups}). */
    readonly awaitNudge: Effect.Effect<void>
    /** The nudges since the last call, and resets them. */
    readonly takeWakeups: () => Wakeups
    /** The nudges since the last {@link takeWakeups}, without resetting them. */
    readonly peekWakeups: () => Wakeups
  }
>()("@converge/store-postgres/SqlStore") {}

/**
 * Nudges received by a store since they were last taken.
 *
 * @since 0.1.0
 */
export interface Wakeups {
  /** How many. */
  readonly count: number
  /** The highest transaction id named (-1 when none was). */
  readonly highestXid: bigint
  /** Whether one named no transaction (a poll-like request: drain once). */
  readonly anonymous: boolean
}

const noWakeups: Wakeups = { count: 0, highestXid: -1n, anonymous: false }

/**
 * A transaction id from its decimal text (as `pg_current_xact_id()::text`
 * prints it), or undefined.
 *
 * @internal
 */
export const parseXid = (text: string | undefined): bigint | undefined =>
  text !== undefined && /^[0-9]{1,20}$/.test(text) ? BigInt(text) : undefined

/**
 * The default schema name.
 *
 * @since 0.1.0
 */
export const defaultSchema = "converge"

/**
 * The default partition count.
 *
 * @since 0.1.0
 */
export const defaultPartitions = 16

/** 32-bit FNV-1a as a signed int (an advisory lock key half): `Partition.hash`, the one hash of the project. */
const fnv1a32 = (text: string): number => Partition.hash(text) | 0

const migrations = (
  s: string,
  channel: string
): ReadonlyArray<{ readonly name: string; readonly statements: ReadonlyArray<string> }> => [
  {
    name: "outbox, outbox_dead, inbox",
    statements: [
      `CREATE TABLE ${s}.settings (
  name text PRIMARY KEY,
  value text NOT NULL
)`,
      `CREATE TABLE ${s}.outbox (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
  partition int NOT NULL,
  message_id text NOT NULL,
  topic text NOT NULL,
  type text NOT NULL,
  source text NOT NULL,
  key text,
  time timestamptz NOT NULL,
  attempt int NOT NULL DEFAULT 1,
  headers jsonb NOT NULL DEFAULT '{}'::jsonb,
  data text NOT NULL,
  created_at timestamptz NOT NULL,
  published_at timestamptz
)`,
      `CREATE INDEX outbox_unpublished ON ${s}.outbox (tx, seq) WHERE published_at IS NULL`,
      `CREATE INDEX outbox_published_at ON ${s}.outbox (published_at) WHERE published_at IS NOT NULL`,
      // the outbox's columns (no identity, no defaults), plus why and when the row was moved
      `CREATE TABLE ${s}.outbox_dead (
  LIKE ${s}.outbox,
  reason text NOT NULL,
  error text NOT NULL,
  moved_at timestamptz NOT NULL,
  PRIMARY KEY (seq)
)`,
      // ids are opaque: byte-wise collation; the message id leads the key (the consumer is the same on
      // most rows, so leading with it only lengthens every comparison)
      `CREATE TABLE ${s}.inbox (
  consumer text COLLATE "C" NOT NULL,
  message_id text COLLATE "C" NOT NULL,
  processed_at timestamptz NOT NULL,
  PRIMARY KEY (message_id, consumer)
)`,
      // BRIN: rows arrive in processed_at order; a tiny index that costs inserts almost nothing
      `CREATE INDEX inbox_processed_at ON ${s}.inbox USING brin (processed_at)`,
      `CREATE FUNCTION ${s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('${channel}', '');
  RETURN NULL;
END
$$`,
      `CREATE TRIGGER outbox_notify AFTER INSERT ON ${s}.outbox
  FOR EACH STATEMENT EXECUTE FUNCTION ${s}.outbox_notify()`
    ]
  },
  {
    // the payload names the committing transaction: a relay skips the wake-up when a drain already read past
    // it (Postgres still folds the notifications of one transaction into one)
    name: "outbox NOTIFY carries the transaction id",
    statements: [
      `CREATE OR REPLACE FUNCTION ${s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('${channel}', pg_current_xact_id()::text);
  RETURN NULL;
END
$$`
    ]
  },
  {
    // message ids are unique per producer, not across topics: the topic joins the inbox key. Rows already
    // there get topic '' and keep deduping (the inbox also looks for them) until the retention removes them
    name: "inbox keyed by (message id, group, topic)",
    statements: [
      `ALTER TABLE ${s}.inbox ADD COLUMN topic text COLLATE "C" NOT NULL DEFAULT ''`,
      `ALTER TABLE ${s}.inbox DROP CONSTRAINT inbox_pkey`,
      `ALTER TABLE ${s}.inbox ADD PRIMARY KEY (message_id, consumer, topic)`,
      `INSERT INTO ${s}.settings (name, value) SELECT 'inbox_legacy_rows', 'yes' WHERE EXISTS (SELECT 1 FROM ${s}.inbox)`
    ]
  },
  {
    // what saga coordinators record for people (the workflow engine keeps its own journal in cluster_*)
    name: "sagas and saga_steps",
    statements: [
      `CREATE TABLE ${s}.sagas (
  execution_id text COLLATE "C" PRIMARY KEY,
  name text NOT NULL,
  status text NOT NULL,
  payload text NOT NULL,
  error text,
  parked_step text,
  parked_token text,
  created_at timestamptz NOT NULL,
  updated_at timestamptz NOT NULL
)`,
      `CREATE INDEX sagas_status ON ${s}.sagas (status, created_at DESC)`,
      `CREATE INDEX sagas_name ON ${s}.sagas (name, created_at DESC)`,
      `CREATE TABLE ${s}.saga_steps (
  execution_id text COLLATE "C" NOT NULL,
  step text NOT NULL,
  phase text NOT NULL,
  seq bigint GENERATED ALWAYS AS IDENTITY,
  status text NOT NULL,
  result text,
  error text,
  attempts int NOT NULL,
  started_at timestamptz NOT NULL,
  finished_at timestamptz,
  PRIMARY KEY (execution_id, step, phase)
)`
    ]
  },
  {
    // the audit trail (`AuditPg`): written in the transaction of a transactional step, batched otherwise
    name: "audit",
    statements: [
      // one row per batch of events of one kind, topic and group written at one moment (a relay cycle, a
      // consumer's read): the per-message fields are parallel arrays, the ids GIN-indexed. A row per event
      // tripled the rows the drain writes and cost 59% of its throughput
      `CREATE TABLE ${s}.audit (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at timestamptz NOT NULL,
  kind text NOT NULL,
  topic text NOT NULL,
  group_name text,
  process text NOT NULL,
  message_ids text[] NOT NULL,
  correlation_ids text[],
  causation_ids text[],
  attempts int[],
  reasons text[],
  errors text[],
  delays_ms bigint[],
  details text[]
)`,
      // ids barely compress: skip the attempt (pglz would try on every row)
      `ALTER TABLE ${s}.audit ALTER COLUMN message_ids SET STORAGE EXTERNAL`,
      `CREATE INDEX audit_message_ids ON ${s}.audit USING gin (message_ids)`,
      `CREATE INDEX audit_correlation_ids ON ${s}.audit USING gin (correlation_ids)`,
      `CREATE INDEX audit_topic ON ${s}.audit (topic, at)`,
      `CREATE INDEX audit_at ON ${s}.audit USING brin (at)`
    ]
  },
  {
    // ids compared byte for byte: the GIN insert of a batch's ids compares them, and under a database's
    // linguistic collation (en_US.UTF-8, or even C.UTF-8) that cost 30-45% more than "C" (40 000 ids: 24 ms
    // against 34-44 ms on C.UTF-8). Equality, all the trail asks of an id, is the same either way
    name: "audit ids in the C collation",
    statements: [
      `ALTER TABLE ${s}.audit ALTER COLUMN message_ids TYPE text[] COLLATE "C",
         ALTER COLUMN correlation_ids TYPE text[] COLLATE "C", ALTER COLUMN causation_ids TYPE text[] COLLATE "C"`
    ]
  }
]

/**
 * The outbox columns a publish writes (the others have defaults), in the
 * order `Outbox` binds them.
 *
 * @internal
 */
export const outboxColumns = [
  "partition",
  "message_id",
  "topic",
  "type",
  "source",
  "key",
  "time",
  "attempt",
  "headers",
  "data",
  "created_at"
] as const

/**
 * Deletes the rows of `table` matching `condition` (over `$1`, the cutoff
 * time), at most 10 000 per statement so no single transaction grows large;
 * returns how many. Used by the retention cleanups.
 *
 * @internal
 */
export const deleteExpired = (
  sql: SqlClient.SqlClient,
  table: string,
  condition: string,
  cutoffMillis: number
): Effect.Effect<number, SqlError> =>
  Effect.gen(function* () {
    const cutoff = new Date(cutoffMillis).toISOString()
    let total = 0
    while (true) {
      const rows = yield* sql.unsafe<{ readonly n: number }>(
        `WITH gone AS (DELETE FROM ${table} WHERE ctid IN (SELECT ctid FROM ${table} WHERE ${condition} LIMIT 10000) RETURNING 1)
         SELECT count(*)::int AS n FROM gone`,
        [cutoff]
      ).withoutTransform
      const n = Number(rows[0]?.n ?? 0)
      total += n
      if (n < 10000) return total
    }
  })

/**
 * Creates the schema and applies the migrations it lacks, in one
 * transaction, serialised across processes by an advisory lock. Safe to run
 * from every process at start-up. Returns the versions it applied.
 *
 * @since 0.1.0
 */
export const migrate = (
  schema: string = defaultSchema
): Effect.Effect<ReadonlyArray<number>, SqlError | Name.InvalidName, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const s = yield* Name.validate("schema", schema)
    const sql = yield* SqlClient.SqlClient
    return yield* sql.withTransaction(
      Effect.gen(function* () {
        yield* sql.unsafe(`SELECT pg_advisory_xact_lock($1::int, 0)`, [fnv1a32(`converge-migrate:${s}`)])
        yield* sql.unsafe(`CREATE SCHEMA IF NOT EXISTS ${s}`)
        yield* sql.unsafe(
          `CREATE TABLE IF NOT EXISTS ${s}.migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`
        )
        const rows = yield* sql.unsafe<{ readonly version: number }>(`SELECT version FROM ${s}.migrations`)
        const done = new Set(rows.map((r) => Number(r.version)))
        const applied: Array<number> = []
        const all = migrations(s, channelOf(s))
        for (let i = 0; i < all.length; i++) {
          const version = i + 1
          if (done.has(version)) continue
          const m = all[i]!
          for (const statement of m.statements) yield* sql.unsafe(statement).raw
          yield* sql.unsafe(`INSERT INTO ${s}.migrations (version, name) VALUES ($1, $2)`, [version, m.name])
          applied.push(version)
        }
        if (applied.length > 0) yield* Effect.logInfo(`converge: migrated schema ${s} to version ${all.length}`)
        return applied
      })
    )
  })

const channelOf = (schema: string) => `converge_outbox_${schema}`

/**
 * Builds the store over the `SqlClient` in context: validates the options,
 * migrates (by default) and checks the partition count.
 *
 * @since 0.1.0
 */
export const make = (
  options?: Options
): Effect.Effect<SqlStore["Service"], SqlError | Name.InvalidName | StoreMismatch, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const schema = yield* Name.validate("schema", options?.schema ?? defaultSchema)
    const partitions = options?.partitions ?? defaultPartitions
    if (!Number.isInteger(partitions) || partitions < 1 || partitions > 4096) {
      return yield* new StoreMismatch({ message: `partitions must be an integer from 1 to 4096, got ${partitions}` })
    }
    const sql = yield* SqlClient.SqlClient
    if (options?.migrate !== false) yield* migrate(schema)
    const settings = yield* sql
      .unsafe<{ readonly value: string }>(
        `INSERT INTO ${schema}.settings (name, value) VALUES ('partitions', $1)
         ON CONFLICT (name) DO UPDATE SET value = ${schema}.settings.value RETURNING value`,
        [String(partitions)]
      )
      .pipe(
        Effect.catchReason("SqlError", "SqlSyntaxError", () =>
          Effect.fail(
            new StoreMismatch({
              message: `schema ${schema} has no Converge tables: run SqlStore.migrate or build the layer with migrate: true`
            })
          )
        )
      )
    const stored = Number(settings[0]?.value)
    if (stored !== partitions) {
      return yield* new StoreMismatch({
        message: `schema ${schema} was created with ${stored} outbox partitions, but this process is configured with ${partitions}; every publisher and relay must use the same count`
      })
    }
    const latch = Latch.makeUnsafe(false)
    let wakeups = noWakeups
    return SqlStore.of({
      sql,
      schema,
      partitions,
      table: (name) => `${schema}.${name}`,
      channel: channelOf(schema),
      lockSpace: fnv1a32(`converge-outbox:${schema}`),
      nudge: (xid) => {
        const id = parseXid(xid)
        wakeups = {
          count: wakeups.count + 1,
          highestXid: id !== undefined && id > wakeups.highestXid ? id : wakeups.highestXid,
          anonymous: wakeups.anonymous || id === undefined
        }
        latch.openUnsafe()
      },
      awaitNudge: latch.await,
      takeWakeups: () => {
        const taken = wakeups
        wakeups = noWakeups
        latch.closeUnsafe()
        return taken
      },
      peekWakeups: () => wakeups
    })
  })

/**
 * The store as a Layer over `SqlClient` (from `@effect/sql-pg`'s `PgClient.layer`).
 *
 * @since 0.1.0
 */
export const layer = (
  options?: Options
): Layer.Layer<SqlStore, SqlError | Name.InvalidName | StoreMismatch, SqlClient.SqlClient> =>
  Layer.effect(SqlStore, make(options))

/**
 * Attaches to an existing store without changing it: no migration, and the
 * partition count read from the schema (what operator tools use, which must
 * not create a schema a typo named). A schema without Converge tables fails
 * with `StoreMismatch` naming it.
 *
 * @since 0.1.0
 */
export const attach = (
  schema: string = defaultSchema
): Effect.Effect<SqlStore["Service"], SqlError | Name.InvalidName | StoreMismatch, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const valid = yield* Name.validate("schema", schema)
    const sql = yield* SqlClient.SqlClient
    const rows = yield* sql
      .unsafe<{ readonly value: string }>(`SELECT value FROM ${valid}.settings WHERE name = 'partitions'`)
      .pipe(
        Effect.catchReason("SqlError", "SqlSyntaxError", () =>
          Effect.fail(
            new StoreMismatch({ message: `schema ${valid} has no Converge store (no ${valid}.settings table)` })
          )
        )
      )
    const partitions = Number(rows[0]?.value)
    if (!Number.isInteger(partitions)) {
      return yield* new StoreMismatch({ message: `schema ${valid} has no outbox partition count in ${valid}.settings` })
    }
    return yield* make({ schema: valid, partitions, migrate: false })
  })

/**
 * {@link attach} as a layer.
 *
 * @since 0.1.0
 */
export const layerAttach = (
  schema?: string
): Layer.Layer<SqlStore, SqlError | Name.InvalidName | StoreMismatch, SqlClient.SqlClient> =>
  Layer.effect(SqlStore, attach(schema))
