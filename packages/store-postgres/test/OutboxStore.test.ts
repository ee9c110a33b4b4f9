import { InboxStoreTest, OutboxStoreTest } from "@converge/store-postgres/testing"
import { PgClient } from "@effect/sql-pg"
import { Redacted } from "effect"

const url = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const Pg = PgClient.layer({ url: Redacted.make(url), maxConnections: 8 })

OutboxStoreTest.suite("postgres", Pg, { concurrentTransactions: true, listen: true })
InboxStoreTest.suite("postgres", Pg, { concurrentTransactions: true, listen: true })

// Applications often map result columns to camelCase: the stores must not depend on column-name transforms.
const camel = (s: string) => s.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())
const PgCamel = PgClient.layer({ url: Redacted.make(url), maxConnections: 4, transformResultNames: camel })
OutboxStoreTest.suite("postgres, camelCase result names", PgCamel, {
  concurrentTransactions: true,
  listen: true,
  only: ["O02", "O07", "O08"]
})
InboxStoreTest.suite("postgres, camelCase result names", PgCamel, {
  concurrentTransactions: true,
  listen: true,
  only: ["I01", "I08"]
})
