/**
 * A PostgreSQL cluster owned by one test: `initdb` in a temporary directory,
 * started on its own loopback port, restarted (or crashed) on demand, removed
 * afterwards. Runs the server binaries of the machine's Postgres installation
 * (as user `postgres` when the test runs as root, which Postgres refuses).
 */
import { execFileSync, spawnSync } from "node:child_process"
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs"
import { userInfo } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"

const binDir = (): string | undefined => {
  const root = "/usr/lib/postgresql"
  if (!existsSync(root)) return undefined
  const versions = readdirSync(root)
    .filter((v) => existsSync(join(root, v, "bin", "initdb")))
    .sort((a, b) => Number(b) - Number(a))
  return versions[0] === undefined ? undefined : join(root, versions[0], "bin")
}

/** Whether this machine can run an owned cluster (Postgres server binaries present). */
export const available = binDir() !== undefined

export class OwnedPostgres {
  readonly port: number
  readonly dir: string
  readonly bin: string
  readonly asRoot: boolean
  constructor(port: number) {
    const bin = binDir()
    if (bin === undefined) throw new Error("no Postgres server binaries under /usr/lib/postgresql")
    this.bin = bin
    this.port = port
    this.asRoot = userInfo().uid === 0
    this.dir = mkdtempSync("/tmp/converge-pg-")
    if (this.asRoot) {
      const uid = Number(execFileSync("id", ["-u", "postgres"]).toString().trim())
      const gid = Number(execFileSync("id", ["-g", "postgres"]).toString().trim())
      chownSync(this.dir, uid, gid)
    }
  }
  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`
  }
  private run(tool: string, args: ReadonlyArray<string>): void {
    const cmd = join(this.bin, tool)
    const result = this.asRoot
      ? spawnSync("runuser", ["-u", "postgres", "--", cmd, ...args], { encoding: "utf8" })
      : spawnSync(cmd, args, { encoding: "utf8" })
    if (result.status !== 0) throw new Error(`${tool} ${args.join(" ")} failed: ${result.stderr || result.stdout}`)
  }
  private ctl(...args: ReadonlyArray<string>): void {
    this.run("pg_ctl", ["-D", join(this.dir, "data"), "-w", "-t", "30", ...args])
  }
  init(): void {
    this.run("initdb", ["-D", join(this.dir, "data"), "-U", "postgres", "-A", "trust", "--no-sync"])
  }
  start(): void {
    this.ctl(
      "-o",
      `-p ${this.port} -k ${this.dir} -c listen_addresses=127.0.0.1 -c fsync=on`,
      "-l",
      join(this.dir, "log"),
      "start"
    )
  }
  /** Stops the server without a shutdown checkpoint (like a crash; recovery replays the WAL) and starts it again. */
  crashRestart(): void {
    this.ctl("-m", "immediate", "stop")
    this.start()
  }
  stop(): void {
    try {
      this.ctl("-m", "immediate", "stop")
    } catch {
      // already stopped
    }
    rmSync(this.dir, { recursive: true, force: true })
  }
}

/** An owned cluster for the scope: initialised, started, and removed at the end. */
export const ownedPostgres = (port: number) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const pg = new OwnedPostgres(port)
      pg.init()
      pg.start()
      return pg
    }),
    (pg) => Effect.sync(() => pg.stop())
  )
