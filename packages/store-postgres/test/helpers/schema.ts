/** A schema of the test's own: dropped before the layer builds (a previous run's leftovers) and when it closes. */
import { Effect, Layer } from "effect"
import { SqlClient } from "effect/sql"

export const freshSchemaLayer = (schema: string): Layer.Layer<never, never, SqlClient.SqlClient> =>
  Layer.effectDiscard(
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const drop = Effect.ignore(sql.unsafe(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).raw)
      yield* drop
      yield* Effect.addFinalizer(() => drop)
    })
  )
