import { InboxStoreTest, OutboxStoreTest } from "@converge/core/testing"
import { PgClient } from "@effect/sql-pg"
import { Redacted } from "effect"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const Pg = PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })

OutboxStoreTest.suite("postgres", Pg, { concurrentTransactions: true, listen: true })
InboxStoreTest.suite("postgres", Pg, { concurrentTransactions: true, listen: true })
