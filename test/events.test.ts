// Every event type arrives typed through uffd.events(), raised from native threads.
import { afterEach, describe, expect, it } from 'vitest'
import { Feature, Mapping, PAGE_SIZE, Userfaultfd, type UffdEvent } from '../src/index'
import { forkOnThread, madviseOnThread, mmapRaw, mremapOnThread, munmapOnThread, pages, touch } from '../src/testing'
import { collect, countFds, stampedPage } from './helpers/events'
import { env, needs } from './helpers/env'
import { dist, runNode } from './helpers/children'
import * as path from 'node:path'
import { withFeature } from './helpers/kernel'
import { timeScale } from './helpers/children'

const cleanup: Array<() => void> = []
afterEach(() => {
  for (const f of cleanup.splice(0).reverse()) f()
})
function track<T extends { close?: () => void; unmap?: () => void }>(x: T): T {
  cleanup.push(() => (x.close ?? x.unmap)!.call(x))
  return x
}

describe('events(): typed events', () => {
  it('delivers MISSING pagefaults with address, write flag and tid', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.THREAD_ID }))
    const m = track(Mapping.anonymous(4 * PAGE_SIZE))
    uffd.register(m)
    const touched = touch([m.at(0) + 8n, m.at(PAGE_SIZE)], { write: false })
    const writes = touch([m.at(2 * PAGE_SIZE) + 16n], { write: true, value: 5n })
    const faults = await collect(uffd.events(), 3, (e) => {
      if (e.type === 'pagefault') uffd.copy(e.address & ~BigInt(PAGE_SIZE - 1), stampedPage(e.address))
      return true
    })
    expect(faults.map((f) => f.type)).toEqual(['pagefault', 'pagefault', 'pagefault'])
    const byAddress = new Map(faults.map((f) => [(f as { address: bigint }).address, f]))
    const w = byAddress.get(m.at(2 * PAGE_SIZE) + 16n) as Extract<UffdEvent, { type: 'pagefault' }>
    // Without EXACT_ADDRESS the kernel reports the page address... or the exact one: accept both.
    expect(w ?? byAddress.get(m.at(2 * PAGE_SIZE))).toBeDefined()
    for (const f of faults as Array<Extract<UffdEvent, { type: 'pagefault' }>>) {
      expect(typeof f.tid).toBe('number')
      expect(f.tid).toBeGreaterThan(0)
      expect(f.tid).not.toBe(process.pid)
      expect(f.wp).toBe(false)
      expect(f.minor).toBe(false)
    }
    expect(faults.filter((f) => (f as { write: boolean }).write)).toHaveLength(1)
    const r = await touched
    expect(r.values[0]).toBe(0n) // read at offset 8 of a page stamped at offset 0
    await writes
  })

  it('delivers WP faults (wp + write) and unprotecting wakes the writer', async () => {
    const open = (): Userfaultfd => track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP }))
    if (!withFeature('PAGEFAULT_FLAG_WP', open)) return
    const uffd = open()
    const m = track(Mapping.anonymous(2 * PAGE_SIZE, { populate: true }))
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    const writer = touch([m.at(PAGE_SIZE)], { write: true, value: 77n })
    const [f] = await collect(uffd.events(), 1)
    expect(f).toMatchObject({ type: 'pagefault', wp: true, write: true, minor: false, address: m.at(PAGE_SIZE) })
    uffd.writeProtect(m.range(PAGE_SIZE, PAGE_SIZE), { protect: false })
    await writer
    const out = new BigUint64Array(1)
    m.read(PAGE_SIZE, out)
    expect(out[0]).toBe(77n)
  })

  it('delivers MINOR faults on shmem, resolved by continue()', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.MINOR_SHMEM }))
    const m = track(Mapping.memfd(2 * PAGE_SIZE))
    const alias = track(m.alias())
    alias.write(0, stampedPage(1234n)) // page cache populated, m's PTEs still empty
    uffd.register(m, { minor: true })
    const reader = touch([m.at(0)])
    const [f] = await collect(uffd.events(), 1)
    expect(f).toMatchObject({ type: 'pagefault', minor: true, wp: false, write: false, address: m.at(0) })
    uffd.continue(m.range(0, PAGE_SIZE))
    expect((await reader).values[0]).toBe(1234n)
  })

  it('delivers REMOVE for MADV_DONTNEED and the causer waits until it is read', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMOVE }))
    const m = track(Mapping.anonymous(4 * PAGE_SIZE, { populate: true }))
    uffd.register(m)
    let settled = false
    const advised = madviseOnThread(m.range(PAGE_SIZE, 2 * PAGE_SIZE), 'dontneed').then((e) => {
      settled = true
      return e
    })
    await new Promise((r) => setTimeout(r, 50))
    expect(settled).toBe(false) // blocked in the kernel until the event is read
    const [e] = await collect(uffd.events(), 1)
    expect(e).toEqual({ type: 'remove', start: m.at(PAGE_SIZE), end: m.at(3 * PAGE_SIZE) })
    expect(await advised).toBe(0)
  })

  it('delivers REMOVE for MADV_REMOVE on shmem', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMOVE | Feature.MISSING_SHMEM }))
    const m = track(Mapping.memfd(2 * PAGE_SIZE))
    m.write(0, new Uint8Array(2 * PAGE_SIZE).fill(1))
    uffd.register(m)
    const advised = madviseOnThread(m.range(), 'remove')
    const [e] = await collect(uffd.events(), 1)
    expect(e).toEqual({ type: 'remove', start: m.address, end: m.address + BigInt(2 * PAGE_SIZE) })
    expect(await advised).toBe(0)
  })

  it('delivers REMAP for mremap of a registered range, and faults follow to the new address', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMAP }))
    const len = 4 * PAGE_SIZE
    const addr = mmapRaw(len)
    uffd.register({ address: addr, length: len })
    // Growing forces a move (MREMAP_MAYMOVE); the registration moves with it.
    const remapped = mremapOnThread(addr, len, 2 * len)
    const [e] = await collect(uffd.events(), 1)
    const { address: to, errno } = await remapped
    expect(errno).toBe(0)
    cleanup.push(() => {
      void munmapOnThread(to, 2 * len)
    })
    expect(e).toEqual({ type: 'remap', from: addr, to, length: len })
    const reader = touch([to])
    const [f] = await collect(uffd.events(), 1)
    expect(f).toMatchObject({ type: 'pagefault', address: to })
    uffd.copy(to, stampedPage(99n))
    expect((await reader).values[0]).toBe(99n)
  })

  it('delivers UNMAP for munmap of a registered range', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_UNMAP }))
    const len = 4 * PAGE_SIZE
    const addr = mmapRaw(len)
    uffd.register({ address: addr, length: len })
    const unmapped = munmapOnThread(addr, len)
    const [e] = await collect(uffd.events(), 1)
    expect(e).toEqual({ type: 'unmap', start: addr, end: addr + BigInt(len) })
    expect(await unmapped).toBe(0)
  })

  it('delivers FORK with a Userfaultfd for the child, which serves (and then loses) the child', async (ctx) => {
    needs(
      ctx,
      env.capSysPtrace,
      'Feature.EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks (e.g. docker run --device /dev/userfaultfd without --cap-add SYS_PTRACE)',
    )
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_FORK }))
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    uffd.register(m)
    const forked = forkOnThread()
    const [e] = await collect(uffd.events(), 1)
    expect(e.type).toBe('fork')
    const child = track((e as Extract<UffdEvent, { type: 'fork' }>).uffd)
    expect(child).toBeInstanceOf(Userfaultfd)
    expect(child.fd).toBeGreaterThan(2)
    expect(child.via).toBe('inherited')
    expect(child.features).toBe(uffd.features)
    const { pid, status } = await forked
    expect(pid).toBeGreaterThan(0)
    expect(status).toBe(0)
    // The child has exited: its address space is gone.
    expect(() => child.copy(m.address, stampedPage(1n))).toThrow(expect.objectContaining({ code: 'ESRCH' }))
  })
})

describe('events(): fork', () => {
  it("the fork event's uffd serves the child's own faults", async (ctx) => {
    needs(
      ctx,
      env.capSysPtrace,
      'Feature.EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks (e.g. docker run --device /dev/userfaultfd without --cap-add SYS_PTRACE)',
    )
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_FORK }))
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    uffd.register(m)
    // The child reads the (missing) second page and exits with the low byte of what it read.
    const forked = forkOnThread(m.address + BigInt(PAGE_SIZE))
    const [fork] = await collect(uffd.events(), 1)
    expect(fork.type).toBe('fork')
    const child = track((fork as Extract<UffdEvent, { type: 'fork' }>).uffd)
    const [fault] = await collect(child.events(), 1)
    expect(fault).toMatchObject({ type: 'pagefault', address: m.address + BigInt(PAGE_SIZE), write: false })
    expect(child.copy(m.address + BigInt(PAGE_SIZE), stampedPage(0x1234_5642n))).toBe(PAGE_SIZE)
    const { status } = await forked
    expect(status >> 8).toBe(0x42) // WEXITSTATUS: the child read our page
    // The parent's own memory was never served.
    expect(uffd.copy(m.address + BigInt(PAGE_SIZE), stampedPage(7n))).toBe(PAGE_SIZE)
  })
})

describe('events(): fork by the event-loop thread itself', () => {
  it(
    'child_process (spawnSync, async exec, execFileSync) with an EVENT_FORK stream on this thread completes, and each fork is delivered',
    async (ctx) => {
      needs(
        ctx,
        env.capSysPtrace,
        'Feature.EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks (e.g. docker run --device /dev/userfaultfd without --cap-add SYS_PTRACE)',
      )
      // libuv forks on the calling thread, and fork() waits in the kernel until the FORK event is
      // read; the only reader is the stream on this very thread. Without the fork guard this hangs
      // forever (the child is SIGKILLed by the timeout); run in a child so a hang cannot stall vitest.
      const r = await runNode(
        [
          '-e',
          `
      const cp = require('node:child_process')
      const { Userfaultfd, Mapping, Feature } = require(${JSON.stringify(path.join(dist, 'index.js'))})
      const uffd = Userfaultfd.open({ features: Feature.EVENT_FORK })
      const m = Mapping.anonymous(4 * 4096)
      uffd.register(m)
      let forks = 0
      ;(async () => {
        for await (const e of uffd.events()) if (e.type === 'fork') { forks++; e.uffd.close() }
      })()
      setTimeout(async () => {
        const sync = cp.spawnSync('true').status
        const viaExec = await new Promise((resolve) => cp.exec('true', (err) => resolve(err ? err.message : 0)))
        cp.execFileSync('true')
        while (forks < 3) await new Promise((r) => setTimeout(r, 5))
        console.log(JSON.stringify({ sync, viaExec, forks }))
        uffd.close()
        m.unmap()
      }, 20)
    `,
        ],
        20_000,
      )
      expect(r.stderr).toBe('')
      expect({ code: r.code, signal: r.signal }).toEqual({ code: 0, signal: null })
      expect(JSON.parse(r.stdout)).toEqual({ sync: 0, viaExec: 0, forks: 3 })
    },
    30_000 * timeScale,
  )
})

describe('events(): ending', () => {
  it('ends when the uffd is closed, resolving a pending next()', async () => {
    const uffd = Userfaultfd.open()
    const stream = uffd.events()
    const next = stream.next()
    setTimeout(() => uffd.close(), 20)
    await expect(next).resolves.toEqual({ done: true, value: undefined })
  })

  it('ends with an AbortError when the signal aborts', async () => {
    const uffd = track(Userfaultfd.open())
    const ac = new AbortController()
    const it = uffd.events({ signal: ac.signal })
    setTimeout(() => ac.abort(), 20)
    await expect(it.next()).rejects.toMatchObject({ name: 'AbortError' })
    // The reader was released: a new stream can start.
    uffd.events().close()
  })

  it('rejects at once for an already aborted signal', () => {
    const uffd = track(Userfaultfd.open())
    expect(() => uffd.events({ signal: AbortSignal.abort() })).toThrow(expect.objectContaining({ name: 'AbortError' }))
  })

  it('break releases the reader; a second concurrent stream is refused', async () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    const stream = uffd.events()
    expect(() => uffd.events()).toThrow(expect.objectContaining({ code: 'EBUSY' }))
    const reader = touch([m.address])
    for await (const e of stream) {
      expect(e).toMatchObject({ type: 'pagefault' })
      break
    }
    uffd.zeropage(m)
    await reader
    const again = uffd.events()
    again.close()
  })

  it('faults read but not handed out when the consumer breaks are woken and reach the next stream', async () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(4 * PAGE_SIZE))
    uffd.register(m)
    const reader = touch(pages(m), { threads: 4 })
    const stream = uffd.events()
    // Wait until the stream holds every fault (some in its queue), then take one and leave.
    const deadline = Date.now() + 5000
    while (stream.queued < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
    expect(stream.queued).toBe(4)
    for await (const e of stream) {
      uffd.copy((e as Extract<UffdEvent, { type: 'pagefault' }>).address, stampedPage(1n))
      break
    }
    // The other three faulted again: a new stream gets them.
    const again = await collect(uffd.events(), 3, (e) => e.type === 'pagefault')
    const left = new Set(again.map((e) => (e as Extract<UffdEvent, { type: 'pagefault' }>).address))
    expect(left.size).toBe(3)
    for (const address of left) uffd.copy(address, stampedPage(2n))
    const { values } = await reader
    expect([...values].sort()).toEqual([1n, 2n, 2n, 2n])
  })

  it('an abort releases queued faults and closes queued fork uffds', async (ctx) => {
    needs(ctx, env.capSysPtrace, 'Feature.EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks')
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_FORK }))
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    uffd.register(m)
    const fds = countFds()
    const ac = new AbortController()
    const stream = uffd.events({ signal: ac.signal })
    const reader = touch([m.address])
    const forked = forkOnThread()
    const deadline = Date.now() + 5000
    while (stream.queued < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
    expect(stream.queued).toBe(2)
    ac.abort()
    await expect(stream.next()).rejects.toMatchObject({ name: 'AbortError' })
    // The fork uffd was closed (the child, unserved, just ran on) and the fault came back.
    expect(countFds()).toBe(fds)
    expect((await forked).status).toBe(0)
    const [e] = await collect(uffd.events(), 1, (x) => x.type === 'pagefault')
    uffd.copy((e as Extract<UffdEvent, { type: 'pagefault' }>).address, stampedPage(9n))
    expect((await reader).values[0]).toBe(9n)
  })

  it('closing with a thread blocked in a fault wakes it: anonymous memory then reads as zeros', async () => {
    const uffd = Userfaultfd.open()
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    const reader = touch([m.address + 8n])
    await collect(uffd.events(), 1)
    uffd.close()
    expect((await reader).values[0]).toBe(0n)
  })

  it('validates options', () => {
    const uffd = track(Userfaultfd.open())
    expect(() => uffd.events({ batch: 0 })).toThrow(RangeError)
    expect(() => uffd.events({ readSize: 5000 })).toThrow(RangeError)
    expect(() => uffd.events({ signal: {} as AbortSignal })).toThrow(TypeError)
    expect(() => uffd.events(null as never)).toThrow(TypeError)
    uffd.close()
    expect(() => uffd.events()).toThrow(expect.objectContaining({ code: 'EBADF' }))
  })
})

describe('events(): batches and backpressure', () => {
  it('yields arrays with { batch: true } and at most N with { batch: N }', async () => {
    const uffd = track(Userfaultfd.open())
    const n = 64
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    uffd.register(m)
    const toucher = touch(pages(m), { threads: 8 })
    let seen = 0
    let maxLen = 0
    for await (const batch of uffd.events({ batch: 3 })) {
      expect(Array.isArray(batch)).toBe(true)
      const list = batch as UffdEvent[]
      expect(list.length).toBeGreaterThan(0)
      expect(list.length).toBeLessThanOrEqual(3)
      maxLen = Math.max(maxLen, list.length)
      for (const e of list) {
        uffd.zeropage({ address: (e as { address: bigint }).address, length: PAGE_SIZE })
        seen++
      }
      if (seen === n) break
    }
    await toucher
    expect(seen).toBe(n)
  })

  it('stops reading the fd when the consumer does not pull (faulters wait), and resumes', async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMOVE }))
    const n = 8
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    uffd.register(m)
    const stream = uffd.events({ highWaterMark: 2, readSize: 1 })
    const toucher = touch(pages(m), { threads: n })
    await new Promise((r) => setTimeout(r, 200))
    // Only highWaterMark events were read; the rest still sit in the kernel.
    expect(stream.queued).toBe(2)
    let seen = 0
    for await (const e of stream) {
      uffd.zeropage({ address: (e as { address: bigint }).address, length: PAGE_SIZE })
      if (++seen === n) break
    }
    await toucher
  })
})
