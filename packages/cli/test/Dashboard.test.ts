/**
 * The dashboard in a real browser: headless Debian Chromium driven by `playwright-core`. An operator opens
 * the dead-letter page, opens a message, replays it (accepting the confirmation), and sees it handled on
 * its timeline; the overview's screenshot is saved for the README (`docs/images/dashboard-overview.png`).
 * A read-only dashboard shows no action and refuses one.
 */
import { mkdirSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { MemoryBroker } from "@converge/broker-memory"
import { Audit, Broker, Consumer, Publisher, SagaStore, Topic } from "@converge/core"
import { assert, describe, layer } from "@effect/vitest"
import { Context, Data, Effect, Layer, Schema } from "effect"
import { type Browser, chromium } from "playwright-core"
import * as Dashboard from "../src/Dashboard.ts"
import * as Operations from "../src/Operations.ts"

const chromiumPath = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium"
const screenshot = fileURLToPath(new URL("../../../docs/images/dashboard-overview.png", import.meta.url))

const Order = Schema.Struct({ orderId: Schema.String, customer: Schema.String })
const orders = Topic.make("shop.orders", Order, { key: (o) => o.orderId })
class CardDeclined extends Data.TaggedError("CardDeclined")<{}> {}

/** Mallory's card is declined until the operator "fixes" it. */
const billing = { declineMallory: true, handled: [] as Array<string> }

const Live = Layer.mergeAll(Publisher.layer(), SagaStore.layerMemory).pipe(
  Layer.provideMerge(Audit.layerMemory()),
  Layer.provideMerge(MemoryBroker.layer())
)

const launch = Effect.acquireRelease(
  Effect.promise(() =>
    chromium.launch({
      executablePath: chromiumPath,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run"
      ]
    })
  ),
  (browser: Browser) => Effect.promise(() => browser.close())
)

/** The operations over the test's services, as the demo builds them. */
const operations = Effect.gen(function* () {
  const sink = yield* Audit.AuditSink
  return yield* Operations.make({
    sources: { broker: "the in-memory broker" },
    broker: Context.make(Broker.Broker, yield* Broker.Broker),
    audit: Context.make(Audit.AuditLog, yield* Audit.AuditLog).pipe(Context.add(Audit.AuditSink, sink)),
    sagas: Context.make(SagaStore.SagaStore, yield* SagaStore.SagaStore)
  })
})

describe("dashboard in headless Chromium", () => {
  layer(Live, { timeout: 120_000, excludeTestServices: true })((it) => {
    it.effect("dead letters → a message → replay (confirmed) → handled on its timeline; overview screenshot", () =>
      Effect.gen(function* () {
        yield* Consumer.make(orders, {
          group: "billing",
          errors: { CardDeclined: "dead-letter" },
          handle: (order) =>
            order.customer === "mallory" && billing.declineMallory
              ? Effect.fail(new CardDeclined())
              : Effect.sync(() => {
                  billing.handled.push(order.orderId)
                })
        })
        yield* Consumer.make(orders, { group: "shipping", handle: () => Effect.void })
        // a saga of each status, for the overview
        const store = yield* SagaStore.SagaStore
        for (const [i, status] of SagaStore.statuses.entries()) {
          yield* store.started({ executionId: `saga-${i}`, name: "checkout", payload: "{}", at: 1_700_000_000_000 + i })
          yield* store.status(`saga-${i}`, status, 1_700_000_000_000 + i)
        }
        const [, mallory] = yield* Publisher.publishAll(
          orders,
          [
            { orderId: "o-1", customer: "ada" },
            { orderId: "o-2", customer: "mallory" },
            { orderId: "o-3", customer: "grace" }
          ],
          { correlationId: "checkout-7" }
        )
        for (let i = 0; i < 200 && billing.handled.length < 2; i++) yield* Effect.sleep(10)

        const ops = yield* operations
        const url = yield* Dashboard.serve(ops, { port: 0 })
        const browser = yield* launch
        const page = yield* Effect.promise(() => browser.newPage({ viewport: { width: 1280, height: 800 } }))
        const go = (path: string) => Effect.promise(() => page.goto(`${url}${path}`))
        // biome-ignore lint/performance/useDomNodeTextContent: Playwright's innerText is the text a user sees
        const text = (selector: string) => Effect.promise(() => page.locator(selector).innerText())

        // the overview, saved for the README
        yield* go("/")
        assert.include(yield* text("main"), "dead letters")
        assert.match(yield* text("main"), /shop\.orders\s+billing\s+0\s+0\s+1/)
        mkdirSync(fileURLToPath(new URL("../../../docs/images/", import.meta.url)), { recursive: true })
        yield* Effect.promise(() => page.screenshot({ path: screenshot, fullPage: true }))

        // the dead-letter page, filtered by topic; open the message
        yield* go("/dlq")
        yield* Effect.promise(() => page.selectOption("select[name=topic]", orders.name))
        yield* Effect.promise(() => Promise.all([page.waitForURL(/\/dlq\?topic=/), page.click("text=Filter")]))
        assert.strictEqual(yield* Effect.promise(() => page.locator("#dead-letters a.dl").count()), 1)
        yield* Effect.promise(() =>
          Promise.all([page.waitForURL(/\/dlq\/shop\.orders\//), page.click("#dead-letters a.dl")])
        )
        const detail = yield* text("main")
        assert.include(detail, mallory!.id)
        assert.include(detail, "CardDeclined")
        assert.include(yield* text("#payload"), '"customer":"mallory"')

        // the card is fixed; replay, accepting the confirmation
        billing.declineMallory = false
        const dialogs: Array<string> = []
        page.on("dialog", (dialog) => {
          dialogs.push(dialog.message())
          void dialog.accept()
        })
        yield* Effect.promise(() =>
          Promise.all([page.waitForURL(/\/trace\//), page.click("button:has-text('Replay')")])
        )
        assert.deepStrictEqual(dialogs.length, 1)
        assert.match(dialogs[0]!, /^Replay dead letter .+ to shop\.orders\?$/)
        assert.include(yield* text(".flash"), "Replayed dead letter")
        // the timeline refreshes itself until the handling shows
        yield* Effect.promise(() => page.waitForSelector("#timeline tr.event[data-kind=handled]", { timeout: 10_000 }))
        const kinds = yield* Effect.promise(() =>
          page.locator("#timeline tr.event").evaluateAll((rows) => rows.map((r) => r.getAttribute("data-kind")))
        )
        // shipping handled the original; billing dead-lettered it, and handles the replay
        assert.deepStrictEqual(kinds.slice(0, 2), ["published", "dead-lettered"])
        const replayedAt = kinds.indexOf("replayed")
        assert.isAbove(replayedAt, 1, JSON.stringify(kinds))
        assert.include(kinds.slice(replayedAt + 1), "handled", "the replay's handling follows it")
        assert.include(billing.handled, "o-2")
        assert.strictEqual((yield* ops.deadLetters({ topic: orders.name })).length, 0, "the queue is empty")

        // the correlation id's timeline shows all three orders
        yield* go("/")
        yield* Effect.promise(() => page.fill("input[name=id]", "checkout-7"))
        yield* Effect.promise(() =>
          Promise.all([page.waitForURL(/\/trace\/checkout-7/), page.press("input[name=id]", "Enter")])
        )
        const flow = yield* Effect.promise(() => page.locator("#timeline tr.event[data-kind=published]").count())
        assert.strictEqual(flow, 3)
      })
    )

    it.effect("a read-only dashboard shows no actions and refuses them (403)", () =>
      Effect.gen(function* () {
        billing.declineMallory = true
        yield* Consumer.make(orders, {
          group: "billing",
          errors: { CardDeclined: "dead-letter" },
          handle: (order) => (order.customer === "mallory" ? Effect.fail(new CardDeclined()) : Effect.void)
        })
        yield* Publisher.publish(orders, { orderId: "o-9", customer: "mallory" })
        const ops = yield* operations
        let letters: ReadonlyArray<Broker.DeadLetter> = []
        for (let i = 0; i < 200 && letters.length === 0; i++) {
          yield* Effect.sleep(10)
          letters = yield* ops.deadLetters({ topic: orders.name })
        }
        assert.strictEqual(letters.length, 1)
        const url = yield* Dashboard.serve(ops, { port: 0, readOnly: true })
        const browser = yield* launch
        const page = yield* Effect.promise(() => browser.newPage())
        yield* Effect.promise(() => page.goto(`${url}/dlq/${orders.name}/${letters[0]!.id}`))
        assert.strictEqual(yield* Effect.promise(() => page.locator("button").count()), 1, "only the trace search")
        // biome-ignore lint/performance/useDomNodeTextContent: Playwright's innerText is the text a user sees
        assert.include(yield* Effect.promise(() => page.locator("main").innerText()), "Read-only dashboard")
        const refused = yield* Effect.promise(() =>
          fetch(`${url}/dlq/${orders.name}/${letters[0]!.id}/replay`, { method: "POST" })
        )
        assert.strictEqual(refused.status, 403)
        assert.strictEqual((yield* ops.deadLetters({ topic: orders.name })).length, 1, "nothing replayed")
      })
    )
  })
})
