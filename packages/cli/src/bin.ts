#!/usr/bin/env node
/**
 * The `converge` executable: runs {@link Cli.run} on the process's arguments
 * and exits with its code (see `Operations.exitCodes`).
 *
 * @since 0.1.0
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import * as Cli from "./Cli.ts"

NodeRuntime.runMain(
  Cli.run(process.argv.slice(2)).pipe(
    Effect.tap((code) =>
      Effect.sync(() => {
        process.exitCode = code
      })
    ),
    Effect.provide(NodeServices.layer)
  ),
  { disableErrorReporting: false }
)
