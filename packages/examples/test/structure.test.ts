/**
 * The structure of imports: within every library package, relative imports form no cycle (type-only
 * imports included), and no module imports its package's `index.ts`; `@converge/core` imports nothing but
 * `effect` and Node built-ins. Checked over the sources as text, so a new upward arrow fails here.
 */
import { readdirSync, readFileSync } from "node:fs"
import { dirname, join, relative, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { assert, describe, it } from "@effect/vitest"

const packagesDir = resolve(dirname(fileURLToPath(import.meta.url)), "../..")
const libraries = ["core", "broker-memory", "broker-redis-streams", "store-postgres", "cli"]

const sourcesOf = (dir: string): Array<string> =>
  readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sourcesOf(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : []
  )

/** Every module specifier a file imports or re-exports (static forms). */
const specifiersOf = (file: string): Array<string> =>
  Array.from(readFileSync(file, "utf8").matchAll(/^(?:import|export)\b[^"']*?from\s+["']([^"']+)["']/gm), (m) => m[1]!)

const graphOf = (pkg: string) => {
  const src = join(packagesDir, pkg, "src")
  const graph = new Map<string, Array<string>>()
  const external = new Set<string>()
  for (const file of sourcesOf(src)) {
    const deps: Array<string> = []
    for (const spec of specifiersOf(file)) {
      if (spec.startsWith(".")) deps.push(relative(src, resolve(dirname(file), spec)))
      else external.add(spec)
    }
    graph.set(relative(src, file), deps)
  }
  return { graph, external }
}

const cycleIn = (graph: Map<string, Array<string>>): Array<string> | undefined => {
  const state = new Map<string, "open" | "done">()
  const path: Array<string> = []
  const visit = (node: string): Array<string> | undefined => {
    if (state.get(node) === "done") return undefined
    if (state.get(node) === "open") return [...path.slice(path.indexOf(node)), node]
    state.set(node, "open")
    path.push(node)
    for (const next of graph.get(node) ?? []) {
      const found = visit(next)
      if (found !== undefined) return found
    }
    path.pop()
    state.set(node, "done")
    return undefined
  }
  for (const node of graph.keys()) {
    const found = visit(node)
    if (found !== undefined) return found
  }
  return undefined
}

describe("the structure of imports", () => {
  for (const pkg of libraries) {
    it(`${pkg}: no import cycle, and only the barrels import index.ts`, () => {
      const { graph } = graphOf(pkg)
      assert.isAbove(graph.size, 1)
      const cycle = cycleIn(graph)
      assert.isUndefined(cycle, `import cycle: ${cycle?.join(" -> ")}`)
      for (const [file, deps] of graph) {
        if (file === "index.ts" || file.endsWith("/index.ts")) continue
        for (const dep of deps) assert.notMatch(dep, /(^|\/)index\.ts$/, `${file} imports the barrel ${dep}`)
      }
    })
  }

  it("core depends on effect alone (and Node built-ins)", () => {
    const { external } = graphOf("core")
    const others = [...external].filter(
      (s) => !(s === "effect" || s.startsWith("effect/") || s.startsWith("node:") || s === "@effect/vitest")
    )
    assert.deepStrictEqual(others, [])
  })

  it("finds a cycle when there is one (the check itself)", () => {
    const graph = new Map([
      ["a.ts", ["b.ts"]],
      ["b.ts", ["c.ts"]],
      ["c.ts", ["a.ts"]]
    ])
    assert.deepStrictEqual(cycleIn(graph), ["a.ts", "b.ts", "c.ts", "a.ts"])
  })
})
