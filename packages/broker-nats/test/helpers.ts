/**
 * Test wiring for the NATS broker: a client per layer, a unique prefix per layer (so tests are isolated), and
 * the prefix's streams deleted when the layer is torn down. Also a test-owned `nats-server` with JetStream and
 * a file store on another loopback port, to kill and restart.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { mkdtempSync, rmSync } from "node:fs"
import { createConnection, createServer } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import type { Envelope } from "@converge/core"
import { headers as makeHeaders } from "@nats-io/transport-node"
import { Context, Effect, Layer } from "effect"
import { NatsBroker, NatsClient } from "../src/index.ts"

/** The prefix of the broker under test. */
export class Prefix extends Context.Service<Prefix, string>()("test/NatsPrefix") {}

/** The machine's NATS server (JetStream on). */
export const mainServer = process.env.NATS_URL ?? "127.0.0.1:4222"

/** Deletes every stream of `prefix`. */
const deleteStreams = (prefix: string) =>
  Effect.gen(function* () {
    const { manager } = yield* NatsClient.NatsClient
    yield* Effect.promise(async () => {
      const names: Array<string> = []
      for await (const s of manager.streams.list())
        if (s.config.name.startsWith(`${prefix}_`)) names.push(s.config.name)
      for (const name of names) await manager.streams.delete(name).catch(() => false)
    })
  })

/** Broker + client + a unique prefix, its streams deleted afterwards. */
export const brokerLayer = (server: string = mainServer, options?: NatsBroker.Options) =>
  Layer.unwrap(
    Effect.sync(() => {
      const prefix = `cvtest_${randomUUID().slice(0, 8)}`
      const cleanup = Layer.effectDiscard(Effect.addFinalizer(() => deleteStreams(prefix).pipe(Effect.ignore)))
      return Layer.mergeAll(NatsBroker.layer({ prefix, ...options }), Layer.succeed(Prefix, prefix), cleanup).pipe(
        Layer.provideMerge(NatsClient.layer({ servers: server }))
      )
    })
  )

/** Suite hooks that act on the streams directly. */
export const hooks = {
  deleteTopic: (topic: string) =>
    Effect.gen(function* () {
      const { manager } = yield* NatsClient.NatsClient
      const prefix = yield* Prefix
      yield* Effect.promise(() => manager.streams.delete(`${prefix}_${topic.replaceAll(".", "~")}`))
    }),
  appendRaw: (topic: string, fields: Envelope.Fields) =>
    Effect.gen(function* () {
      const { jetstream, manager } = yield* NatsClient.NatsClient
      const prefix = yield* Prefix
      // a foreign producer may write before any Converge publisher or consumer created the stream
      const name = `${prefix}_${topic.replaceAll(".", "~")}`
      yield* Effect.promise(() =>
        manager.streams
          .info(name)
          .catch(() => manager.streams.add({ name, subjects: [`${prefix}.t.${topic.replaceAll(".", "~")}`] }))
      )
      const headers = makeHeaders()
      for (const [k, v] of Object.entries(fields)) if (k !== "data") headers.set(k, v)
      yield* Effect.promise(() =>
        jetstream.publish(`${prefix}.t.${topic.replaceAll(".", "~")}`, fields.data ?? "", { headers })
      )
    })
}

/** Waits until the client is connected again and JetStream answers (after a server restart). */
export const whenBack = Effect.gen(function* () {
  const { manager } = yield* NatsClient.NatsClient
  yield* Effect.promise(async () => {
    for (let i = 0; i < 300; i++) {
      try {
        await manager.getAccountInfo()
        return
      } catch {
        await new Promise((r) => setTimeout(r, 100))
      }
    }
    throw new Error("JetStream did not answer within 30 s of the restart")
  })
})

/** True when something accepts TCP connections on `port` (127.0.0.1). */
const listening = (port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const socket = createConnection({ host: "127.0.0.1", port })
    socket.once("connect", () => {
      socket.destroy()
      resolve(true)
    })
    socket.once("error", () => resolve(false))
  })

/** A free loopback port (the OS picks it). */
const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      server.close(() => resolve(port))
    })
  })

/**
 * A `nats-server` owned by a test: JetStream with a file store in a directory of its own, on a port the OS
 * found free at the first start (a port derived from the pid once fell on epmd's 4369, which RabbitMQ's
 * machines run) and kept across restarts.
 */
export class OwnedNats {
  #port: number | undefined
  readonly dir: string
  proc: ChildProcess | undefined
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "converge-nats-"))
  }
  get port(): number {
    if (this.#port === undefined) throw new Error("the test-owned nats-server has not been started")
    return this.#port
  }
  get url(): string {
    return `127.0.0.1:${this.port}`
  }
  /** The broker layer on this server, built when a test needs it (after `start` chose the port). */
  brokerLayer(options?: NatsBroker.Options) {
    return Layer.suspend(() => brokerLayer(this.url, options))
  }
  async start(): Promise<void> {
    this.#port ??= await freePort()
    // never drive (kill) a server this test did not start: the port must be free
    if (this.proc === undefined && (await listening(this.port)))
      throw new Error(`port ${this.port} already accepts connections: not starting a test-owned NATS there`)
    const binary = process.env.NATS_SERVER ?? "nats-server"
    this.proc = spawn(binary, ["-a", "127.0.0.1", "-p", String(this.port), "-js", "-sd", this.dir], {
      stdio: "ignore"
    })
    for (let i = 0; i < 200; i++) {
      if (await listening(this.port)) return
      await new Promise((r) => setTimeout(r, 25))
    }
    throw new Error(`nats-server on port ${this.port} did not start`)
  }
  async kill(): Promise<void> {
    const proc = this.proc
    if (proc === undefined || proc.exitCode !== null) return
    await new Promise<void>((resolve) => {
      proc.once("exit", () => resolve())
      proc.kill("SIGKILL")
    })
  }
  async restart(): Promise<void> {
    await this.kill()
    await this.start()
  }
  async stop(): Promise<void> {
    await this.kill()
    rmSync(this.dir, { recursive: true, force: true })
  }
}
