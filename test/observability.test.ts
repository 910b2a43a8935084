// Observability: NODE_DEBUG=userfaultfd lines, and the diagnostics_channel channels (faults
// served aggregated per tick, errors, connections) of the FaultServer and the Firecracker
// handler.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as dc from 'node:diagnostics_channel'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { FirecrackerHandler, PAGE_SIZE, diagnosticsChannels } from '../src/index'
import { pages, touch } from '../src/testing'
import type { ConnectionMessage, ErrorMessage, FaultsMessage } from '../src/util/diagnostics'
import { writeSnapshot } from '../src/cli/demo/snapshot'
import { dist, killChildren, runGuest, runNode, timeScale } from './helpers/children'
import { closeAll, setup, until, within } from './helpers/fault-server'

let dir: string
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-obs-'))
})
afterEach((ctx) => {
  closeAll(ctx)
  killChildren()
})
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

/** Collects what `name` publishes until the returned stop() is called. */
function collect<T>(name: string): { messages: T[]; stop: () => void } {
  const messages: T[] = []
  const onMessage = (m: unknown): void => {
    messages.push(m as T)
  }
  dc.subscribe(name, onMessage)
  return { messages, stop: () => dc.unsubscribe(name, onMessage) }
}

describe('NODE_DEBUG=userfaultfd', () => {
  const script = `
const { Userfaultfd, Mapping } = require(${JSON.stringify(path.join(dist, 'index.js'))})
const uffd = Userfaultfd.open()
const m = Mapping.anonymous(4096)
uffd.register(m)
uffd.close()
m.unmap()`

  it('prints lifecycle lines on stderr (open, register, close), nothing per fault', {
    timeout: 15_000 * timeScale,
  }, async () => {
    const r = await runNode(['-e', script], 10_000, undefined, [], { ...process.env, NODE_DEBUG: 'userfaultfd' })
    expect(r.code).toBe(0)
    const lines = r.stderr.trimEnd().split('\n')
    expect(lines[0]).toMatch(/^USERFAULTFD \d+: open: fd (\d+) via (syscall|device), features none$/)
    expect(lines[1]).toMatch(/^USERFAULTFD \d+: register: fd \d+, 0x[0-9a-f]+ \+4096, mode 1$/)
    expect(lines[2]).toMatch(/^USERFAULTFD \d+: close: fd \d+$/)
    expect(lines).toHaveLength(3)
  })

  it('is silent without NODE_DEBUG', { timeout: 15_000 * timeScale }, async () => {
    const env = { ...process.env }
    delete env.NODE_DEBUG
    const r = await runNode(['-e', script], 10_000, undefined, [], env)
    expect(r).toMatchObject({ code: 0, stderr: '' })
  })
})

describe('diagnostics_channel', () => {
  it('documents its channel names', () => {
    expect(diagnosticsChannels).toEqual({
      faults: 'userfaultfd:faults',
      error: 'userfaultfd:error',
      connection: 'userfaultfd:connection',
    })
  })

  it('FaultServer: faults served, a few messages per progress tick (not one per fault), summing to the stats', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const faults = collect<FaultsMessage>(diagnosticsChannels.faults)
    try {
      const n = 2048
      // The tick grows with the time scale: under emulation the faults take that much longer.
      const { m, server } = setup(n, { faultAround: PAGE_SIZE, progressIntervalMs: 10 * timeScale })
      server.serve(m, { buffer: new Uint8Array(n * PAGE_SIZE).fill(3) })
      await within(touch(pages(m), { threads: 2 }), 15_000 * timeScale, 'touch')
      await within(server.drained(), 5000 * timeScale, 'drained')
      await until(() => faults.messages.reduce((s, f) => s + f.pages, 0) === n, 5000 * timeScale, 'all pages published')
      const mine = faults.messages.filter((f) => f.server === server)
      expect(mine.length).toBe(faults.messages.length)
      expect(mine.length).toBeGreaterThan(0)
      expect(mine.length).toBeLessThan(n / 8)
      for (const f of mine) {
        expect(f).toMatchObject({ source: 'FaultServer', intervalMs: expect.any(Number) })
        expect(f.bytes).toBe(f.pages * PAGE_SIZE)
      }
      const last = mine.at(-1)!
      expect(last.total).toMatchObject({ pages: n, bytes: n * PAGE_SIZE, zeroPages: 0 })
      expect(last.total.faults).toBe(server.stats().faults)
      expect(mine.reduce((s, f) => s + f.faults, 0)).toBe(last.total.faults)
    } finally {
      faults.stop()
    }
  })

  it('FaultServer: errors, whether or not an error listener exists', { timeout: 20_000 * timeScale }, async () => {
    const errors = collect<ErrorMessage>(diagnosticsChannels.error)
    try {
      const { m, server } = setup(4)
      let calls = 0
      server.serve(m, {
        handler: () => {
          if (calls++ === 0) throw new Error('the source is down')
          return new Uint8Array(PAGE_SIZE)
        },
      })
      await within(touch(pages(m, 1), { threads: 1 }), 15_000, 'touch')
      expect(errors.messages).toHaveLength(1)
      expect(errors.messages[0]).toMatchObject({
        source: 'FaultServer',
        server,
        // a source failure: a UffdError with the handler's error as its cause (onSourceError)
        error: { name: 'UffdError', action: 'retry', cause: { message: 'the source is down' } },
      })
    } finally {
      errors.stop()
    }
  })

  it('FirecrackerHandler: connection open, ready, end; faults per connection; a failed connection is an error', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const memFile = path.join(dir, 'fc.mem')
    writeSnapshot(memFile, 8 << 20)
    const connections = collect<ConnectionMessage>(diagnosticsChannels.connection)
    const faults = collect<FaultsMessage>(diagnosticsChannels.faults)
    const errors = collect<ErrorMessage>(diagnosticsChannels.error)
    const handler = await FirecrackerHandler.listen({ socketPath: path.join(dir, 'fc.sock'), memFile })
    try {
      const ended = new Promise((resolve) => handler.once('end', resolve))
      const g = await runGuest({ socket: handler.socketPath, memFile, dontneed: 65536 })
      expect(g.code).toBe(0)
      await ended
      const pid = g.result!.pid
      expect(connections.messages.map((c) => c.event)).toEqual(['open', 'ready', 'end'])
      for (const c of connections.messages)
        expect(c).toMatchObject({ source: 'FirecrackerHandler', server: handler, connection: 1 })
      expect(connections.messages[1]).toMatchObject({ peer: { pid }, regions: 1 })
      expect(connections.messages[2].error).toBeUndefined()
      // Counted per connection, and the last message carries the connection's totals.
      expect(faults.messages.length).toBeGreaterThan(0)
      for (const f of faults.messages) expect(f).toMatchObject({ source: 'FirecrackerHandler', connection: 1 })
      expect(faults.messages.reduce((s, f) => s + f.pages, 0)).toBe(2048 + 16)
      expect(faults.messages.at(-1)!.total).toMatchObject({ pages: 2048 + 16, zeroPages: 16 })
      expect(errors.messages).toEqual([])

      // A peer that sends garbage: its connection ends with an error, published on both channels.
      const bad = await runNode([
        '-e',
        `const s = require('net').connect(${JSON.stringify(handler.socketPath)}, () => s.end('not json'))`,
      ])
      expect(bad.code).toBe(0)
      await until(() => errors.messages.length === 1, 5000, 'error published')
      expect(errors.messages[0]).toMatchObject({ source: 'FirecrackerHandler', server: handler, connection: 2 })
      expect(connections.messages.at(-1)).toMatchObject({ event: 'end', connection: 2, error: expect.any(Error) })
    } finally {
      connections.stop()
      faults.stop()
      errors.stop()
      await handler.close()
    }
  })
})
