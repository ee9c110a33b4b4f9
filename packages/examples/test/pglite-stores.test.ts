import { InboxStoreTest, OutboxStoreTest } from "@converge/store-postgres/testing"
import { pgliteLayer } from "../src/embedded.ts"

// The embedded default runs the same store suites. PGlite serves one connection at a time and has no
// LISTEN/NOTIFY through the socket: the cases that need two open transactions or NOTIFY are skipped, named.
const features = { concurrentTransactions: false, listen: false }
OutboxStoreTest.suite("pglite", pgliteLayer, features)
InboxStoreTest.suite("pglite", pgliteLayer, features)
