import { OutboxStoreTest } from "@converge/core/testing"
import { PgClient } from "@effect/sql-pg"
import { Redacted } from "effect"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

OutboxStoreTest.suite("postgres", PgClient.layer({ url: Redacted.make(url), maxConnections: 8 }), {
  concurrentTransactions: true,
  listen: true
})
