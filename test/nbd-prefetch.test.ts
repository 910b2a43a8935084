// Working sets replayed from NBD in native code (native/engine/nbd_prefetch.h): the engine's
// thread pipelines the reads over connections of its own and provides the bytes; at its first
// failure it stops and JavaScript reads the rest (retrying, reporting). Real servers (nbdkit)
// for the normal path, a fake one (test/helpers/fake-nbd.ts) for what real servers never do.
// Faults come from native toucher threads.
import * as fs from 'node:fs'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { native } from '../src/addon/native'
import { type FaultServer, PAGE_SIZE, RemoteSource, Userfaultfd, type WorkingSet } from '../src/index'
import type { NbdStore } from '../src/sources/nbd'
import { touch } from '../src/testing'
import { type FakeAnswer, type FakeRead, startFakeNbd } from './helpers/fake-nbd'
import { closeAll, ENGINE_DEFAULTS, setup, track, until, within } from './helpers/fault-server'
import { missing, startNbdkit, stopServers } from './helpers/servers'
import { snapshot } from './helpers/snapshots'

afterEach((ctx) => closeAll(ctx))
afterAll(stopServers)

const MiB = 1024 * 1024

/** Every `step`-th page of `pages`, shuffled (a fixed order). */
function scattered(pages: number, step: number, seed = 11): number[] {
  const all = Array.from({ length: Math.floor(pages / step) }, (_, i) => i * step)
  let x = seed
  for (let i = all.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) & 0x7fffffff
    const j = x % (i + 1)
    ;[all[i], all[j]] = [all[j], all[i]]
  }
  return all
}

function addresses(base: bigint, list: number[]): BigUint64Array {
  return BigUint64Array.from(list.map((p) => base + BigInt(p * PAGE_SIZE)))
}

async function record(url: string, pages: number, order: number[]): Promise<WorkingSet> {
  const rec = setup(pages)
  rec.server.serve(rec.m, { nbd: url }, { recordWorkingSet: true })
  await within(touch(addresses(rec.m.address, order), { threads: 1 }), 20_000, 'record')
  const ws = await rec.server.workingSet()
  rec.server.close()
  expect([...ws.pages]).toEqual(order)
  return ws
}

/** Until the whole working set is delivered and installed. */
async function installed(server: FaultServer, pages: number, ms = 20_000): Promise<void> {
  await until(
    () => {
      const s = server.stats()
      return s.fed.workingSetDelivered === pages && s.providedQueued === 0
    },
    ms,
    'working set installed',
  )
}

/** Touches every page of `order` and checks each first u64 against the snapshot's bytes. */
async function expectBytes(base: bigint, order: number[], bytes: Buffer): Promise<void> {
  const { values } = await within(touch(addresses(base, order), { threads: 1 }), 20_000, 'touch')
  order.forEach((p, k) => {
    expect(values[k]).toBe(bytes.readBigUInt64LE(p * PAGE_SIZE))
  })
}

type Play = ReturnType<typeof setup>

/** Every page right, not one fault more (it was all installed), no error; then both closed. */
async function expectServedAndClose(play: Play, remote: RemoteSource, order: number[], bytes: Buffer): Promise<void> {
  const faults = play.server.stats().faults
  await expectBytes(play.m.address, order, bytes)
  expect(play.server.stats().faults).toBe(faults)
  expect(play.errors).toEqual([])
  play.server.close()
  await remote.close()
}

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length
}

describe('native NBD replay against a fake server', () => {
  const size = 16 * MiB
  const pages = size / PAGE_SIZE

  it('reads every recorded page once, over the idle bulk connections, in recorded order on each', async () => {
    const { bytes } = snapshot(size)
    const srv = await startFakeNbd(bytes)
    try {
      const order = scattered(pages, 3)
      const ws = await record(srv.url, pages, order)
      const remote = await RemoteSource.open(srv.url)
      await (remote.store as NbdStore).connected()
      const play = setup(pages)
      const before = srv.reads.length
      const conns = srv.connections
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await installed(play.server, order.length)
      const fed = play.server.stats().fed
      const mine = srv.reads.slice(before)
      const nativeReads = mine.filter((r) => r.native)
      // no two recorded pages adjacent: one read each, every one native
      expect(fed.nativeReads).toBe(order.length)
      expect(nativeReads.length).toBe(order.length)
      // besides: only the identity check's few reads, on the demand connection
      expect(new Set(mine.filter((r) => !r.native).map((r) => r.conn)).size).toBeLessThanOrEqual(1)
      expect(srv.connections).toBe(conns) // borrowed, none made
      const sorted = (list: number[]): number[] => [...list].sort((a, b) => a - b)
      expect(sorted(nativeReads.map((r) => r.offset / PAGE_SIZE))).toEqual(sorted(order))
      expect(new Set(nativeReads.map((r) => r.conn)).size).toBe(2) // the bulk connection count
      const rank = new Map(order.map((p, k) => [p, k]))
      for (const conn of new Set(nativeReads.map((r) => r.conn))) {
        const ranks = nativeReads.filter((r) => r.conn === conn).map((r) => rank.get(r.offset / PAGE_SIZE)!)
        expect(ranks).toEqual([...ranks].sort((a, b) => a - b))
      }
      // the source's counters count them as its own reads
      expect(remote.counters.fetchedPages).toBeGreaterThanOrEqual(order.length)
      await expectServedAndClose(play, remote, order, bytes)
    } finally {
      await srv.close()
    }
  })

  it('while its own connections are made (none idle), JavaScript reads the first pages', async () => {
    const { bytes } = snapshot(size)
    const srv = await startFakeNbd(bytes, () => 'data', { greetLaterMs: 300 })
    try {
      const order = scattered(pages, 3)
      const ws = await record(srv.url, pages, order)
      const remote = await RemoteSource.open(srv.url) // its bulk connections: still being made
      const play = setup(pages)
      const before = srv.reads.length
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await installed(play.server, order.length)
      const fed = play.server.stats().fed
      const mine = srv.reads.slice(before)
      const native = new Set(mine.filter((r) => r.native).map((r) => r.offset / PAGE_SIZE))
      expect(fed.nativeReads).toBe(native.size)
      const byJs = new Set<number>()
      for (const r of mine.filter((x) => !x.native))
        for (let p = r.offset / PAGE_SIZE; p < (r.offset + r.length) / PAGE_SIZE; p++) byJs.add(p)
      for (const p of order) expect(native.has(p) || byJs.has(p)).toBe(true)
      // the first pages by JavaScript (through gaps), most natively
      expect(byJs.has(order[0])).toBe(true)
      expect(native.has(order[0])).toBe(false)
      expect(native.size).toBeGreaterThan(order.length / 2)
      await expectBytes(play.m.address, order, bytes)
      expect(play.errors).toEqual([])
      play.server.close()
      await remote.close()
    } finally {
      await srv.close()
    }
  })

  it('takes structured replies too: data in chunks, holes as zeros', async () => {
    const { bytes } = snapshot(size)
    // every 4th page zero (a hole), and runs of two adjacent pages (two-chunk replies)
    for (let p = 0; p < pages; p += 4) bytes.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
    const srv = await startFakeNbd(bytes, () => 'data', { structured: true })
    try {
      const order = scattered(pages, 6).flatMap((p) => [p, p + 1])
      const ws = await record(srv.url, pages, order)
      const remote = await RemoteSource.open(srv.url)
      await (remote.store as NbdStore).connected() // so that the replay borrows them (structured)
      const play = setup(pages)
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await installed(play.server, order.length)
      expect(play.server.stats().fed.nativeReads).toBe(order.length / 2)
      await expectServedAndClose(play, remote, order, bytes)
    } finally {
      await srv.close()
    }
  })

  const failures: Array<[string, FakeAnswer, string]> = [
    ['an error reply (EIO)', { error: 5 }, 'EIO'],
    ['a reply with a bad magic', 'bad-magic', 'EPROTO'],
    ['a reply for a read never sent', 'unknown-cookie', 'EPROTO'],
    ['a structured reply that brings no data', 'structured', 'EPROTO'],
    ['the connection dropped', 'close', 'ECONNRESET'],
    ['no reply within the timeout', 'silence', 'ETIMEDOUT'],
  ]
  it.each(failures)(
    'stops at %s, reports it, and JavaScript reads the rest: every page right',
    async (_what, answer, code) => {
      const { bytes } = snapshot(size)
      // the 20th native read on each connection fails
      const srv = await startFakeNbd(bytes, (r: FakeRead) => (r.nativeIndex === 20 ? answer : 'data'))
      try {
        const order = scattered(pages, 3)
        const ws = await record(srv.url, pages, order)
        const remote = await RemoteSource.open(srv.url, { timeout: 500 })
        const play = setup(pages)
        play.server.serve(play.m, { remote }, { workingSet: ws })
        await installed(play.server, order.length)
        const fed = play.server.stats().fed
        expect(fed.nativeReads).toBeGreaterThan(0) // partial progress before the failure
        expect(fed.nativeReads).toBeLessThan(order.length)
        const err = play.errors.find((e) => (e as { code?: string }).code === code) as
          | (Error & { syscall?: string })
          | undefined
        expect(err, play.errors.map((e) => e.message).join('; ')).toBeDefined()
        expect(err!.syscall).toBe('NBD_CMD_READ')
        expect(err!.message).toMatch(/^NBD /)
        await expectBytes(play.m.address, order, bytes)
        play.server.close()
        await remote.close()
      } finally {
        await srv.close()
      }
    },
    30_000,
  )

  it('close() while native reads wait ends them at once and leaks no fd', async () => {
    const { bytes } = snapshot(size)
    const srv = await startFakeNbd(bytes, (r) => (r.native ? 'silence' : 'data'))
    try {
      const order = scattered(pages, 5)
      const ws = await record(srv.url, pages, order)
      const fds = openFds()
      const remote = await RemoteSource.open(srv.url)
      const play = setup(pages)
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await until(() => srv.reads.some((r) => r.native), 10_000, 'native reads sent')
      play.server.close()
      play.server.close() // idempotent
      play.uffd.close()
      play.m.unmap()
      expect(play.errors).toEqual([])
      await remote.close()
      // (the fake server's own ends of the connections close once it sees them closed)
      await until(() => openFds() <= fds, 5000, 'fds back')
    } finally {
      await srv.close()
    }
  })

  it('nativeReads: false reads the working set through JavaScript', async () => {
    const { bytes } = snapshot(size)
    const srv = await startFakeNbd(bytes)
    try {
      const order = scattered(pages, 3)
      const ws = await record(srv.url, pages, order)
      await expect(RemoteSource.open(srv.url, { nativeReads: 1 as unknown as boolean })).rejects.toThrow(TypeError)
      const remote = await RemoteSource.open(srv.url, { nativeReads: false })
      const play = setup(pages)
      const before = srv.reads.length
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await installed(play.server, order.length)
      expect(play.server.stats().fed.nativeReads).toBe(0)
      expect(srv.reads.slice(before).some((r) => r.native)).toBe(false)
      await expectBytes(play.m.address, order, bytes)
      play.server.close()
      await remote.close()
    } finally {
      await srv.close()
    }
  })
})

describe.skipIf(missing('nbdkit'))('native NBD replay against nbdkit', () => {
  it('at a 2 ms round trip: every page right, no fault once installed', async () => {
    const size = 32 * MiB
    const pages = size / PAGE_SIZE
    const { file, bytes } = snapshot(size)
    // recorded from a server without the delay (the same snapshot: a set is tied to its bytes)
    const plain = await startNbdkit(file)
    const order = scattered(pages, 4)
    const ws = await record(plain.url, pages, order)
    const srv = await startNbdkit(file, { filters: ['delay'], params: ['delay-read=2ms'], threads: 64 })
    const remote = await RemoteSource.open(srv.url)
    const play = setup(pages)
    play.server.serve(play.m, { remote }, { workingSet: ws })
    await installed(play.server, order.length)
    expect(play.server.stats().fed.nativeReads).toBeGreaterThan(order.length / 2)
    await expectServedAndClose(play, remote, order, bytes)
  })
})

describe('the engine binding', () => {
  it('ends a prefetch whose fd is no socket with its errno, nothing provided, its fds closed', async () => {
    const uffd = track(Userfaultfd.open())
    const notices: Array<{ type: string; id?: number }> = []
    const engine = new native.FaultEngine(uffd.fd, { ...ENGINE_DEFAULTS, hugePageSize: 2 << 20 }, (n) =>
      notices.push(...n),
    )
    const fd = fs.openSync('/dev/null', 'r+')
    try {
      const fds = openFds()
      const id = engine.prefetchNbd(1, [fd], new Float64Array([0, 4096, 4096, 4096]), { exportSize: 8192 })
      await until(() => notices.some((n) => n.type === 'prefetched' && n.id === id), 5000, 'prefetched')
      const r = engine.prefetchResult(id)
      expect(r?.error).toMatchObject({ code: 'ENOTSOCK' })
      expect([...(r?.provided ?? [])]).toEqual([0, 0])
      expect(engine.prefetchResult(id)).toBeNull() // forgotten
      expect(openFds()).toBe(fds) // its dup closed
    } finally {
      fs.closeSync(fd)
      engine.close()
    }
  })
})

describe('the engine binding refuses bad prefetch input', () => {
  it('TypeError, RangeError, or a UffdError with code', () => {
    const uffd = track(Userfaultfd.open())
    const engine = new native.FaultEngine(uffd.fd, { ...ENGINE_DEFAULTS, hugePageSize: 2 << 20 }, () => {})
    const reads = new Float64Array([0, 4096])
    try {
      expect(() => engine.prefetchNbd(1, [], reads, { exportSize: 4096 })).toThrow(TypeError)
      expect(() => engine.prefetchNbd(1, [0], [0, 4096] as unknown as Float64Array, { exportSize: 4096 })).toThrow(
        TypeError,
      )
      expect(() => engine.prefetchNbd(1, [0], new Float64Array([0]), { exportSize: 4096 })).toThrow(RangeError)
      expect(() => engine.prefetchNbd(1, [0], new Float64Array([0, 0]), { exportSize: 4096 })).toThrow(RangeError)
      expect(() => engine.prefetchNbd(1, [0], new Float64Array([0.5, 4096]), { exportSize: 4096 })).toThrow(RangeError)
      expect(() => engine.prefetchNbd(1, [0], reads, { exportSize: 4096, depth: 0 })).toThrow(RangeError)
      expect(() => engine.prefetchNbd(1, [-1], reads, { exportSize: 4096 })).toThrow(
        expect.objectContaining({ code: 'EBADF', syscall: 'fcntl(F_DUPFD_CLOEXEC)' }),
      )
      expect(engine.prefetchResult(12345)).toBeNull()
      expect(engine.prefetchStop(12345)).toBeNull()
    } finally {
      engine.close()
    }
    expect(() => engine.prefetchNbd(1, [0], reads, { exportSize: 4096 })).toThrow(
      expect.objectContaining({ code: 'EBADF' }),
    )
  })
})
