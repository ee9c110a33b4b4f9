/**
 * `@converge/cli` — the operator tools: the `converge` command, the web
 * dashboard, and the operations both run on.
 *
 * @since 0.1.0
 */

/** The `converge` command. @since 0.1.0 */
export * as Cli from "./Cli.ts"
/** The web dashboard. @since 0.1.0 */
export * as Dashboard from "./Dashboard.ts"
/** Operations over real servers, from settings. @since 0.1.0 */
export * as Environment from "./Environment.ts"
/** How the tools show things to people. @since 0.1.0 */
export * as Format from "./Format.ts"
/** What an operator does, over the library's API. @since 0.1.0 */
export * as Operations from "./Operations.ts"
