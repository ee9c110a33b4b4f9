/**
 * `Name` — validation of the names that end up in broker keys: topics, consumer
 * groups, consumer names and header names.
 *
 * Names are checked once, at construction, so no user input can ever inject
 * into a broker key (a Redis key, a hash tag, a stream id separator). The
 * allowed alphabet is deliberately small:
 *
 * - topics, groups, consumers: ASCII letters, digits, `.`, `_`, `-`; they start
 *   with a letter or digit; 1 to 200 characters. No `:`, `{`, `}`, spaces or
 *   control characters (those are key separators or Redis Cluster hash tags).
 * - SQL schema names (where the outbox and inbox tables live): lowercase ASCII
 *   letters, digits and `_`, starting with a letter or `_`, 1 to 40 characters,
 *   so they never need quoting.
 * - header names: lowercase ASCII letters and digits, 1 to 20 characters (the
 *   CloudEvents extension-attribute rule, so every header maps losslessly to a
 *   CloudEvents attribute and to a broker field), and not one of the reserved
 *   attribute names.
 *
 * @since 0.1.0
 */
import { Effect, Result, Schema } from "effect"

/**
 * What a name names; part of the error message.
 *
 * @since 0.1.0
 */
export type NameKind = "topic" | "group" | "consumer" | "header" | "schema"

/**
 * A name was rejected. `message` says which rule it broke.
 *
 * @since 0.1.0
 */
export class InvalidName extends Schema.TaggedError<InvalidName>("@converge/core/Name/InvalidName")("InvalidName", {
  kind: Schema.Literals(["topic", "group", "consumer", "header", "schema"]),
  name: Schema.String,
  rule: Schema.String
}) {
  /** A sentence naming the kind, the offending name and the rule. */
  override get message(): string {
    return `Invalid ${this.kind} name ${JSON.stringify(this.name)}: ${this.rule}`
  }
}

/**
 * The longest topic, group or consumer name accepted.
 *
 * @since 0.1.0
 */
export const maxLength = 200

/**
 * The longest header name accepted (the CloudEvents recommendation).
 *
 * @since 0.1.0
 */
export const maxHeaderLength = 20

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]*$/
const headerPattern = /^[a-z0-9]+$/
const schemaPattern = /^[a-z_][a-z0-9_]*$/

/**
 * PostgreSQL's reserved key words (reserved, and reserved that can be a function or type name): none of them
 * can name a schema without quoting, so a schema name that is one fails as a raw SQL syntax error later.
 *
 * @since 0.1.0
 */
export const reservedSqlWords: ReadonlySet<string> = new Set(
  (
    "all analyse analyze and any array as asc asymmetric authorization binary both case cast check collate " +
    "collation column concurrently constraint create cross current_catalog current_date current_role " +
    "current_schema current_time current_timestamp current_user default deferrable desc distinct do else end " +
    "except false fetch for foreign freeze from full grant group having ilike in initially inner intersect into " +
    "is isnull join lateral leading left like limit localtime localtimestamp natural not notnull null offset on " +
    "only or order outer overlaps placing primary references returning right select session_user similar some " +
    "symmetric system_user table tablesample then to trailing true union unique user using variadic verbose " +
    "when where window with"
  ).split(" ")
)

/**
 * The longest SQL schema name accepted (it also names the relay's
 * `LISTEN` channel, which Postgres limits to 63 bytes).
 *
 * @since 0.1.0
 */
export const maxSchemaLength = 40

/**
 * Attribute names that a header may not take: the CloudEvents context
 * attributes and the ones Converge uses itself.
 *
 * @since 0.1.0
 */
export const reservedHeaderNames: ReadonlySet<string> = new Set([
  "id",
  "source",
  "specversion",
  "type",
  "datacontenttype",
  "dataschema",
  "subject",
  "time",
  "data",
  "topic",
  "attempt",
  "key"
])

/**
 * Checks a name without failing: `Result.succeed(name)` or
 * `Result.fail(InvalidName)`.
 *
 * @since 0.1.0
 */
export const check = (kind: NameKind, name: string): Result.Result<string, InvalidName> => {
  const fail = (rule: string) => Result.fail(new InvalidName({ kind, name: String(name), rule }))
  if (typeof name !== "string" || name.length === 0) return fail("must be a non-empty string")
  if (kind === "header") {
    if (name.length > maxHeaderLength) return fail(`must be at most ${maxHeaderLength} characters`)
    if (!headerPattern.test(name)) return fail("may contain only lowercase ASCII letters and digits (a-z, 0-9)")
    if (reservedHeaderNames.has(name)) return fail("is a reserved attribute name")
    return Result.succeed(name)
  }
  if (kind === "schema") {
    if (name.length > maxSchemaLength) return fail(`must be at most ${maxSchemaLength} characters`)
    if (!schemaPattern.test(name)) {
      return fail("must start with a lowercase letter or '_' and contain only lowercase ASCII letters, digits and '_'")
    }
    if (reservedSqlWords.has(name)) return fail("is a reserved word of SQL (PostgreSQL); pick another name")
    if (name.startsWith("pg_")) return fail("must not start with pg_ (reserved for PostgreSQL's system schemas)")
    return Result.succeed(name)
  }
  if (name.length > maxLength) return fail(`must be at most ${maxLength} characters`)
  if (!namePattern.test(name)) {
    return fail("must start with a letter or digit and contain only ASCII letters, digits, '.', '_' and '-'")
  }
  return Result.succeed(name)
}

/**
 * Validates a name in the error channel.
 *
 * @since 0.1.0
 */
export const validate = (kind: NameKind, name: string): Effect.Effect<string, InvalidName> =>
  Effect.fromResult(check(kind, name))

/**
 * Validates a name, throwing {@link InvalidName} when it is invalid. For
 * module-level constants (a topic defined at import time), where a bad name is
 * a programming error that must stop the program at once.
 *
 * @since 0.1.0
 */
export const validateSync = (kind: NameKind, name: string): string => {
  const result = check(kind, name)
  if (Result.isFailure(result)) throw result.failure
  return result.success
}
