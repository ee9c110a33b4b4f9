/**
 * `pnpm demo --dashboard`, as a newcomer runs it: the demo process (in-memory broker, embedded Postgres)
 * keeps running with the dashboard; its dead letters are listed, mallory's is replayed through the
 * dashboard's action, and her order's timeline then shows the replay and its handling.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { afterAll, assert, describe, it } from "@effect/vitest"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

describe("pnpm demo --dashboard", () => {
  let demo: ChildProcess | undefined
  afterAll(() => {
    demo?.kill("SIGINT")
  })

  it("keeps running with the dashboard: dead letters listed, one replayed and handled", async () => {
    const child = spawn(process.execPath, [main, "--dashboard", "--port", "0"], {
      env: { ...process.env, REDIS_URL: "", DATABASE_URL: "" },
      stdio: ["ignore", "pipe", "pipe"]
    })
    demo = child
    let output = ""
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no dashboard within 60 s:\n${output}`)), 60_000)
      child.stdout!.on("data", (chunk: Buffer) => {
        output += chunk.toString()
        const found = /Dashboard: (http:\/\/127\.0\.0\.1:\d+)/.exec(output)
        if (found !== null) {
          clearTimeout(timer)
          resolve(found[1]!)
        }
      })
      child.once("exit", (code) => reject(new Error(`the demo exited (${code}):\n${output}`)))
    })
    assert.include(output, "Example 03", "the examples ran first")

    const list = await (await fetch(`${url}/dlq?topic=orders`)).text()
    const entries = [...list.matchAll(/href="\/dlq\/orders\/([^"]+)"/g)].map((m) => m[1]!)
    assert.strictEqual(entries.length, 3, "mallory's order, and the undecodable one for each group")
    // find mallory's (reason permanent: her card was declined)
    let mallory: string | undefined
    for (const id of entries) {
      const page = await (await fetch(`${url}/dlq/orders/${id}`)).text()
      if (page.includes("mallory")) mallory = id
    }
    assert.isDefined(mallory)
    const replay = await fetch(`${url}/dlq/orders/${mallory}/replay`, { method: "POST", redirect: "manual" })
    assert.strictEqual(replay.status, 303)
    const timelineUrl = new URL(replay.headers.get("location")!, url).href
    assert.match(timelineUrl, /\/trace\//)
    const kindsOf = (html: string) => [...html.matchAll(/data-kind="([a-z-]+)"/g)].map((m) => m[1]!)
    const handledAfterReplay = (kinds: ReadonlyArray<string>) =>
      kinds.indexOf("replayed") >= 0 && kinds.slice(kinds.indexOf("replayed") + 1).includes("handled")
    let kinds: Array<string> = []
    for (let i = 0; i < 50 && !handledAfterReplay(kinds); i++) {
      await new Promise((r) => setTimeout(r, 100))
      kinds = kindsOf(await (await fetch(timelineUrl)).text())
    }
    const replayedAt = kinds.indexOf("replayed")
    assert.isAbove(replayedAt, 0, kinds.join(","))
    assert.include(kinds.slice(replayedAt + 1), "handled", "billing handles the replay (card issue fixed)")
    const after = await (await fetch(`${url}/dlq?topic=orders`)).text()
    assert.strictEqual([...after.matchAll(/href="\/dlq\/orders\//g)].length, 2, "mallory's left the queue")
  }, 90_000)
})
