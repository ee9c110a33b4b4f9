import { assert, it } from "@effect/vitest"

it("runs on the pinned modern Node (>= 22), not the system Node 20", () => {
  const major = Number(process.versions.node.split(".")[0])
  assert.isAtLeast(major, 22, `tests run on Node ${process.versions.node}`)
})
