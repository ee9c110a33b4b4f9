import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "core",
          root: "packages/core",
          include: ["test/**/*.test.ts"],
          testTimeout: 30_000
        }
      },
      {
        test: {
          name: "broker-memory",
          root: "packages/broker-memory",
          include: ["test/**/*.test.ts"],
          testTimeout: 30_000
        }
      },
      {
        test: {
          name: "broker-redis-streams",
          root: "packages/broker-redis-streams",
          include: ["test/**/*.test.ts"],
          testTimeout: 60_000
        }
      },
      {
        test: {
          name: "broker-nats",
          root: "packages/broker-nats",
          include: ["test/**/*.test.ts"],
          testTimeout: 60_000
        }
      },
      {
        test: {
          name: "store-postgres",
          root: "packages/store-postgres",
          include: ["test/**/*.test.ts"],
          testTimeout: 60_000
        }
      },
      {
        test: {
          name: "cli",
          root: "packages/cli",
          include: ["test/**/*.test.ts"],
          testTimeout: 120_000
        }
      },
      {
        test: {
          name: "examples",
          root: "packages/examples",
          include: ["test/**/*.test.ts"],
          testTimeout: 30_000
        }
      }
    ]
  }
})
