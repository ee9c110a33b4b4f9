/**
 * The benchmark harness: a registry of named benchmarks, each compared with
 * a hand-written baseline measured in the same run. `pnpm bench` prints a
 * table; `--json` prints one JSON object per line; `--only <name>` runs the
 * benchmarks whose name equals or starts with `<name>`.
 */

import { Broker, type Envelope } from "@converge/core"
import { Effect, Stream } from "effect"
import { createClient } from "redis"

/** One measured row. */
export interface Row {
  readonly bench: string
  readonly msgs_per_s: number
  readonly baseline: string
  readonly baseline_msgs_per_s: number
  readonly ratio: number
  readonly p50_ms?: number
  readonly p99_ms?: number
  readonly baseline_p50_ms?: number
  readonly baseline_p99_ms?: number
}

/** A named benchmark. */
export interface Bench {
  readonly name: string
  readonly run: () => Promise<ReadonlyArray<Row>>
}

/** Rounds for display and JSON. */
export const round = (n: number, digits = 0): number => {
  const f = 10 ** digits
  return Math.round(n * f) / f
}

/** Messages per second from a count and elapsed milliseconds. */
export const rate = (count: number, ms: number): number => (count / ms) * 1000

/** The median of several runs (fewer outliers on a shared 2-core machine). */
export const median = (xs: ReadonlyArray<number>): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]!
}

/** A percentile of latencies in milliseconds. */
export const percentile = (xs: ReadonlyArray<number>, p: number): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!
}

const pad = (s: string, n: number, right = false) => (right ? s.padStart(n) : s.padEnd(n))

/** Runs the benchmarks selected by the command line. */
export const main = async (benches: ReadonlyArray<Bench>, argv: ReadonlyArray<string>): Promise<void> => {
  const json = argv.includes("--json")
  const onlyAt = argv.indexOf("--only")
  const only = onlyAt >= 0 ? argv[onlyAt + 1] : undefined
  if (onlyAt >= 0 && only === undefined) throw new Error("--only needs a benchmark name")
  // a name, or a group of names: `memory/batch=1` and `memory/batch=1/` select `memory/batch=1/consumers=...`
  const prefix = only?.endsWith("/") ? only : `${only}/`
  const selected = benches.filter((b) => only === undefined || b.name === only || b.name.startsWith(prefix))
  if (selected.length === 0) {
    throw new Error(`no benchmark named ${JSON.stringify(only)}; known: ${benches.map((b) => b.name).join(", ")}`)
  }
  const rows: Array<Row> = []
  for (const b of selected) {
    for (const row of await b.run()) {
      rows.push(row)
      if (json) process.stdout.write(`${JSON.stringify(row)}\n`)
    }
  }
  if (json) return
  const header = ["bench", "msgs/s", "baseline", "baseline msgs/s", "ratio", "p50 ms", "p99 ms", "base p50", "base p99"]
  const body = rows.map((r) => [
    r.bench,
    r.msgs_per_s.toLocaleString("en-US"),
    r.baseline,
    r.baseline_msgs_per_s.toLocaleString("en-US"),
    `${r.ratio.toFixed(2)}x`,
    r.p50_ms === undefined ? "" : r.p50_ms.toFixed(2),
    r.p99_ms === undefined ? "" : r.p99_ms.toFixed(2),
    r.baseline_p50_ms === undefined ? "" : r.baseline_p50_ms.toFixed(2),
    r.baseline_p99_ms === undefined ? "" : r.baseline_p99_ms.toFixed(2)
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)))
  const line = (cells: ReadonlyArray<string>) =>
    `| ${cells.map((c, i) => pad(c, widths[i]!, i === 1 || i === 3 || i === 4 || i >= 5)).join(" | ")} |`
  process.stdout.write(`${line(header)}\n`)
  process.stdout.write(
    `|${widths.map((w, i) => (i === 0 || i === 2 ? `:${"-".repeat(w + 1)}` : `${"-".repeat(w + 1)}:`)).join("|")}|\n`
  )
  for (const row of body) process.stdout.write(`${line(row)}\n`)
  process.stdout.write(`\nnode ${process.versions.node}, ${rows.length} rows\n`)
}

/** Deletes the keys of a Redis matching `pattern` (a benchmark's prefix): runs must not pile up data. */
export const deleteRedisKeys = async (pattern: string, url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379") => {
  const client = createClient({ url })
  client.on("error", () => {})
  await client.connect()
  for await (const keys of client.scanIterator({ MATCH: pattern, COUNT: 1000 })) {
    if (keys.length > 0) await client.del(keys)
  }
  await client.close()
}

/**
 * Alternating runs of a benchmark and its baseline, after warm-up runs of each: `BENCH_PAIRS`, default 7 (one
 * run's ratio swings ±10% on a shared 2-core machine; the median of 7 is steadier than of 5).
 */
const runs = Number(process.env.BENCH_PAIRS ?? 7)

/**
 * Warm-up runs of each side before the measured pairs (`BENCH_WARMUP`, default 3): the JIT needs about three
 * 20 000-message runs of the Redis consume path before its rate settles (65k, 92k, 102k, then 105–120k
 * msgs/s, measured), so with one warm-up a median of 7 still held two cold runs of the side with more code.
 */
const warmups = Number(process.env.BENCH_WARMUP ?? 3)

/** Medians of `runs` alternating runs: our rate, the baseline's, and the median ratio. */
export const pairs = async (
  ours: () => Promise<number>,
  theirs: () => Promise<number>,
  count: number,
  theirCount = count
): Promise<{ msgs: number; base: number; ratio: number }> => {
  for (let i = 0; i < warmups; i++) {
    await ours()
    await theirs()
  }
  const a: Array<number> = []
  const b: Array<number> = []
  const r: Array<number> = []
  for (let i = 0; i < runs; i++) {
    const x = rate(count, await ours())
    const y = rate(theirCount, await theirs())
    a.push(x)
    b.push(y)
    r.push(x / y)
  }
  return { msgs: median(a), base: median(b), ratio: median(r) }
}

/** A table row of a compared pair. */
export const row = (bench: string, baseline: string, m: { msgs: number; base: number; ratio: number }): Row => ({
  bench,
  msgs_per_s: round(m.msgs),
  baseline,
  baseline_msgs_per_s: round(m.base),
  ratio: round(m.ratio, 3)
})

/**
 * The Broker-level consume measurement shared by the broker benches: publish `messages` to `topic` (1 000
 * per call), then time one subscription that `JSON.parse`s every body and settles each read with one
 * `ackAll`, until all are consumed; returns the milliseconds.
 */
export const consumeThroughBroker = (topic: string, messages: ReadonlyArray<Envelope.Encoded>, batchSize: number) =>
  Effect.gen(function* () {
    const broker = yield* Broker.Broker
    for (let b = 0; b < messages.length; b += 1000) yield* broker.publish(messages.slice(b, b + 1000))
    let consumed = 0
    const done = Promise.withResolvers<void>()
    const start = performance.now()
    yield* broker.subscribe({ topic, group: "g", consumer: "c", batchSize }).pipe(
      Stream.runForEachArray((ds) =>
        Effect.suspend(() => {
          for (const d of ds) JSON.parse(d.envelope.data)
          consumed += ds.length
          if (consumed >= messages.length) done.resolve()
          return broker.ackAll(ds)
        })
      ),
      Effect.forkScoped
    )
    yield* Effect.promise(() => done.promise)
    return performance.now() - start
  })
