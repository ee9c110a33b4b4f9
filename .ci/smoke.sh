#!/usr/bin/env bash
# Consumer smoke test (issue: installable packages). As a new user would: pack every publishable package,
# install the tarballs with plain npm into an empty project outside the workspace (effect at the latest 4.x,
# @effect/sql-pg and redis added as a user adds them), type-check two user programs under strict +
# NodeNext + verbatimModuleSyntax, and run them on the pinned Node: one publishes and consumes on the memory
# broker, one runs outbox -> relay -> inbox on the Postgres server. Also checks the tarballs' contents, that
# @converge/core depends on peers only, and that the project holds exactly one copy of effect.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PNPM="npx -y pnpm@10.34.9"
NODE="$ROOT/node_modules/.bin/node"
# npm itself runs on the pinned Node, so the packages' engines (>= 22.19) hold during the install
NPM_CLI="$(dirname "$(readlink -f "$(command -v npm)")")/npm-cli.js"
npm_() { "$NODE" "$NPM_CLI" --no-audit --no-fund --loglevel=warn "$@"; }
WORK="$(mktemp -d /tmp/converge-smoke.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PACKAGES="core broker-memory broker-redis-streams broker-nats store-postgres cli"

echo "-- build and pack"
rm -rf packages/*/dist
$PNPM build
mkdir -p "$WORK/packs"
for p in $PACKAGES; do (cd "packages/$p" && $PNPM pack --pack-destination "$WORK/packs" >/dev/null); done
ls "$WORK/packs"

echo "-- tarball contents"
for t in "$WORK"/packs/*.tgz; do
  listing="$(tar tzf "$t")"
  if grep -E '^package/test/|\.test\.(ts|js)$|tsbuildinfo' <<<"$listing"; then
    echo "FAIL: $(basename "$t") ships test or build-state files"
    exit 1
  fi
  for f in package/LICENSE package/README.md package/package.json package/dist/index.js package/dist/index.d.ts; do
    grep -qx "$f" <<<"$listing" || { echo "FAIL: $(basename "$t") lacks $f"; exit 1; }
  done
  if tar xzf "$t" -O --wildcards 'package/dist/*.d.ts' | grep -E "from \"\.{1,2}/[^\"]+\.ts\"" >/dev/null; then
    echo "FAIL: $(basename "$t") declarations import .ts files"
    exit 1
  fi
  tar xzf "$t" -O package/package.json | "$NODE" -e '
    const p = JSON.parse(require("fs").readFileSync(0, "utf8"))
    const bad = []
    if (p.peerDependencies?.effect !== "^4.1.0") bad.push("effect is not a ^4.1.0 peer")
    if (p.dependencies?.effect) bad.push("effect is a dependency")
    for (const [k, v] of Object.entries({ ...p.dependencies, ...p.peerDependencies })) if (String(v).startsWith("workspace:")) bad.push(`${k}: ${v}`)
    if (p.name === "@converge/core" && Object.keys(p.dependencies ?? {}).length > 0) bad.push("core has dependencies: " + Object.keys(p.dependencies))
    if (typeof p.exports?.["."]?.types !== "string" || Object.keys(p.exports["."])[0] !== "types") bad.push("exports[.] does not lead with types")
    if (bad.length > 0) { console.error(`FAIL: ${p.name}: ${bad.join("; ")}`); process.exit(1) }
    console.log(`${p.name}@${p.version}: peers ${Object.keys(p.peerDependencies ?? {}).join(", ")}; deps ${Object.keys(p.dependencies ?? {}).join(", ") || "none"}`)
  '
done

echo "-- a fresh project outside the workspace"
APP="$WORK/app"
mkdir -p "$APP"
cp .ci/smoke/memory.ts .ci/smoke/postgres.ts .ci/smoke/saga.ts "$APP/"
cat >"$APP/package.json" <<'JSON'
{ "name": "converge-smoke-app", "private": true, "type": "module" }
JSON
# skipLibCheck stays off, so the packages' own declarations are checked too; "DOM" because effect 4.1's
# crypto declarations name CryptoKey and JsonWebKey, which @types/node does not declare globally
cat >"$APP/tsconfig.json" <<'JSON'
{
  "compilerOptions": {
    "strict": true,
    "module": "NodeNext",
    "moduleResolution": "NodeNext",
    "target": "ES2022",
    "lib": ["ES2022", "DOM"],
    "types": ["node"],
    "verbatimModuleSyntax": true,
    "noEmit": true
  },
  "include": ["memory.ts", "postgres.ts", "saga.ts"]
}
JSON
TS_VERSION="$("$NODE" -p 'require("./node_modules/typescript/package.json").version')"
(cd "$APP" && npm_ install "$WORK"/packs/*.tgz effect@^4 @effect/sql-pg@^4 redis@^6 "typescript@$TS_VERSION" @types/node@^22)

echo "-- one copy of effect"
(cd "$APP" && npm_ ls effect --all)
copies="$(cd "$APP" && "$NODE" "$NPM_CLI" ls effect --all --parseable | sort -u | grep -c '/node_modules/effect$' || true)"
if [ "$copies" != "1" ]; then echo "FAIL: $copies copies of effect"; exit 1; fi
echo "effect $(cd "$APP" && "$NODE" -p 'require("effect/package.json").version'), one copy"

echo "-- type-check (strict, NodeNext, verbatimModuleSyntax, library types checked too)"
(cd "$APP" && "$NODE" node_modules/typescript/bin/tsc -p tsconfig.json)
# and the types are real: a consumer that leaves an error tag unmapped must not compile
cp .ci/smoke/must-not-compile.ts "$APP/"
echo '{ "extends": "./tsconfig.json", "include": ["must-not-compile.ts"] }' >"$APP/tsconfig.negative.json"
if out="$(cd "$APP" && "$NODE" node_modules/typescript/bin/tsc -p tsconfig.negative.json 2>&1)"; then
  echo "FAIL: a consumer with an unmapped error tag compiled"
  exit 1
fi
grep -q "Declined" <<<"$out" || { echo "FAIL: unexpected type errors: $out"; exit 1; }
echo "an unmapped error tag is a compile error: ok"

echo "-- run on Node $("$NODE" --version)"
(cd "$APP" && "$NODE" memory.ts)
(cd "$APP" && "$NODE" postgres.ts)
(cd "$APP" && "$NODE" saga.ts)

echo "-- the converge CLI as installed (npx converge)"
(cd "$APP" && PATH="$(dirname "$NODE"):$PATH" "$NODE" "$NPM_CLI" exec --no -- converge --help) | grep -q "dlq" ||
  { echo "FAIL: npx converge --help"; exit 1; }
set +e
out="$(cd "$APP" && PATH="$(dirname "$NODE"):$PATH" "$NODE" "$NPM_CLI" exec --no -- converge status --database-url postgres://127.0.0.1:1/none 2>&1)"
code=$?
set -e
if [ "$code" != "3" ] || ! grep -q "cannot reach Postgres" <<<"$out"; then
  echo "FAIL: converge with an unreachable server: exit $code: $out"
  exit 1
fi
echo "npx converge: help, and exit 3 on an unreachable server: ok"
echo "smoke: ok"
