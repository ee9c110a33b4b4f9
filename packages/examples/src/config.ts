/**
 * The demo's and the examples' settings, read through `effect/Config`: a bad
 * value is a `ConfigError` that names the variable, and connection URLs stay
 * `Redacted` (a log line shows where a URL points, never its credentials).
 *
 * - `REDIS_URL` (`redis://` or `rediss://`): run on the Redis Streams broker.
 * - `DATABASE_URL` (`postgres://` or `postgresql://`): run on a Postgres
 *   server instead of the embedded PGlite.
 *
 * Unset or empty: the embedded default.
 */
import { Config, Option, Redacted, Schema } from "effect"

/** A URL setting with one of `schemes`, kept redacted; unset or empty is `None`. */
const urlSetting = (name: string, schemes: ReadonlyArray<string>, example: string) =>
  Config.schema(
    Schema.String.check(
      Schema.makeFilter((text: string) => {
        if (text === "") return undefined
        let url: URL
        try {
          url = new URL(text)
        } catch {
          return `is not a URL; expected one like ${example}`
        }
        return schemes.includes(url.protocol)
          ? undefined
          : `has scheme ${url.protocol.replace(/:$/, "")}; expected ${schemes.map((s) => s.replace(/:$/, "")).join(" or ")}, like ${example}`
      })
    ),
    name
  ).pipe(
    Config.option,
    Config.map((value) =>
      Option.isSome(value) && value.value !== "" ? Option.some(Redacted.make(value.value)) : Option.none()
    )
  )

/** The demo's settings. */
export const settings = Config.all({
  redisUrl: urlSetting("REDIS_URL", ["redis:", "rediss:"], "redis://127.0.0.1:6379"),
  databaseUrl: urlSetting("DATABASE_URL", ["postgres:", "postgresql:"], "postgres://127.0.0.1:5432/test")
})

/** Where a URL points, for a log line: scheme, host, port and path — never user or password. */
export const describeUrl = (url: Redacted.Redacted<string>): string => {
  const u = new URL(Redacted.value(url))
  return `${u.protocol}//${u.host}${u.pathname === "/" ? "" : u.pathname}`
}
