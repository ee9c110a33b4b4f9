/**
 * After `tsc -b`: rewrites the relative `.ts` specifiers that TypeScript keeps in emitted declaration files
 * (`rewriteRelativeImportExtensions` rewrites them in JavaScript only) to `.js`, the files that exist in a
 * published package. TypeScript 6 resolves either, but older compilers and other tools read the `.js` form.
 * Idempotent; run by `pnpm build`.
 */
import { readdirSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"

const specifier = /((?:from|import)\s*\(?\s*)(["'])(\.{1,2}\/[^"']+)\.ts\2/g

const walk = (dir: string): Array<string> =>
  readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(join(dir, e.name)) : e.name.endsWith(".d.ts") ? [join(dir, e.name)] : []
  )

let changed = 0
for (const pkg of ["core", "broker-memory", "broker-redis-streams", "broker-nats", "store-postgres", "cli"]) {
  for (const file of walk(join("packages", pkg, "dist"))) {
    const text = readFileSync(file, "utf8")
    const next = text.replace(
      specifier,
      (_, lead: string, quote: string, path: string) => `${lead}${quote}${path}.js${quote}`
    )
    if (next !== text) {
      writeFileSync(file, next)
      changed++
    }
  }
}
process.stdout.write(`declarations: ${changed} file(s) rewritten to .js specifiers\n`)
