// FaultServer: contents served byte for byte from every kind of source, from several native
// threads in sequential and random order, and read directly by the main JS thread.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, Mapping, PAGE_SIZE, UffdError, Userfaultfd } from '../src/index'
import { pages, touch } from '../src/testing'
import { closeAll, onCleanup, randomContent, readAll, setup, track, u64At, until, within } from './helpers/fault-server'
import { timeScale } from './helpers/children'

afterEach((ctx) => closeAll(ctx))

function shuffled(list: BigUint64Array): BigUint64Array {
  const out = BigUint64Array.from(list)
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    const t = out[i]
    out[i] = out[j]
    out[j] = t
  }
  return out
}

/** Touches every page (at a varying offset) from `threads` native threads; checks each u64. */
async function touchAndCheck(
  m: Mapping,
  expected: Uint8Array,
  threads: number,
  order: 'seq' | 'random',
): Promise<void> {
  const n = m.length / PAGE_SIZE
  const list = pages(m)
  for (let i = 0; i < n; i++) list[i] += BigInt((i * 72) % (PAGE_SIZE - 8))
  const addrs = order === 'random' ? shuffled(list) : list
  const { values } = await within(touch(addrs, { threads }), 15_000, 'touch')
  for (let i = 0; i < addrs.length; i++) {
    const at = Number(addrs[i] - m.address)
    if (values[i] !== u64At(expected, at))
      throw new Error(`u64 at offset ${at}: got ${values[i]}, want ${u64At(expected, at)}`)
  }
}

describe('FaultServer sources', () => {
  it('{ buffer }: every byte, sequential from 2 threads, no fault-around', async () => {
    const n = 512
    const { m, server, errors } = setup(n, { faultAround: PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    await touchAndCheck(m, src, 2, 'seq')
    expect(Buffer.compare(readAll(m), src)).toBe(0)
    await within(server.drained(), 5000, 'drained') // the counters trail the wake-ups
    const s = server.stats()
    expect(s.faults).toBeGreaterThanOrEqual(n)
    expect(s.demandPages).toBe(n)
    expect(s.aroundPages).toBe(0)
    expect(s.bytes).toBe(n * PAGE_SIZE)
    expect(s.pagesPresent).toBe(n)
    expect(s.latencyUs.p50).toBeGreaterThan(0)
    expect(s.latencyUs.count).toBeGreaterThanOrEqual(1)
    expect(s.bytesPresent).toBe(n * PAGE_SIZE)
    expect(errors).toEqual([])
  })

  it('{ buffer } with an offset, random order from 3 threads, with fault-around', async () => {
    const n = 1024
    const { m, server, errors } = setup(n, { faultAround: 16 * PAGE_SIZE })
    const big = randomContent((n + 8) * PAGE_SIZE)
    server.serve(m, { buffer: big, offset: 8 * PAGE_SIZE })
    const src = big.subarray(8 * PAGE_SIZE)
    await touchAndCheck(m, src, 3, 'random')
    expect(Buffer.compare(readAll(m), src)).toBe(0)
    await within(server.drained(), 5000, 'drained')
    const s = server.stats()
    expect(s.bytes).toBe(n * PAGE_SIZE) // every page copied exactly once
    expect(s.faults).toBeLessThan(n) // fault-around saved faults
    expect(s.aroundPages).toBeGreaterThan(0)
    expect(errors).toEqual([])
  })

  it('{ buffer: Mapping } copies from another mapping', async () => {
    const n = 64
    const { m, server } = setup(n)
    const srcMap = track(Mapping.anonymous(n * PAGE_SIZE))
    const src = randomContent(n * PAGE_SIZE)
    srcMap.write(0, src)
    server.serve(m, { buffer: srcMap })
    await touchAndCheck(m, src, 2, 'random')
    expect(Buffer.compare(readAll(m), src)).toBe(0)
  })

  it('{ zero: true } serves zero pages', async () => {
    const n = 256
    const { m, server } = setup(n, { faultAround: 8 * PAGE_SIZE })
    server.serve(m, { zero: true })
    await touchAndCheck(m, new Uint8Array(n * PAGE_SIZE), 2, 'random')
    expect(readAll(m).every((b) => b === 0)).toBe(true)
    await within(server.drained(), 5000, 'drained')
    expect(server.stats().zeroPages).toBe(n)
  })

  for (const mode of ['mmap', 'pread'] as const) {
    it(`{ file } (${mode}): from an offset, a file shorter than the range reads as zeros past its end`, async () => {
      const n = 300
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-'))
      onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
      const file = path.join(dir, 'snapshot.bin')
      const skip = 4 * PAGE_SIZE
      const content = randomContent(skip + 200 * PAGE_SIZE + 123) // ends mid-page
      fs.writeFileSync(file, content)
      const { m, server, errors } = setup(n, { faultAround: 32 * PAGE_SIZE })
      server.serve(m, { file, offset: skip, readMethod: mode })
      const expected = new Uint8Array(n * PAGE_SIZE)
      expected.set(content.subarray(skip))
      await touchAndCheck(m, expected, 2, 'random')
      expect(Buffer.compare(readAll(m), expected)).toBe(0)
      await within(server.drained(), 5000, 'drained')
      expect(server.stats().zeroPages).toBeGreaterThan(0)
      expect(errors).toEqual([])
    })
  }

  it('{ file } by fd, at an offset that is not page-aligned (served through pread)', async () => {
    const n = 40
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-'))
    onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
    const file = path.join(dir, 'snap')
    const content = randomContent(100 + n * PAGE_SIZE)
    fs.writeFileSync(file, content)
    const fd = fs.openSync(file, 'r')
    const { m, server } = setup(n)
    server.serve(m, { file: fd, offset: 100 })
    fs.closeSync(fd) // the server keeps its own reference
    await touchAndCheck(m, content.subarray(100), 2, 'seq')
  })

  for (const readMethod of ['pread', 'mmap'] as const) {
    it(`{ file, size } truncated while served (${readMethod}): errors with the address, the thread waits, never zeros or stale bytes; served once the file is whole`, async () => {
      const n = 16
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-'))
      onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
      const file = path.join(dir, 'snap')
      const content = randomContent(n * PAGE_SIZE)
      fs.writeFileSync(file, content)
      const { m, server, errors } = setup(n, { faultAround: PAGE_SIZE })
      server.serve(m, { file, readMethod, size: n * PAGE_SIZE })
      // pread: page 4 reads short, pages 5.. not at all. mmap: the kernel maps a partial last page
      // with a zero tail, which no copy can tell from data: cut at a page boundary there.
      fs.truncateSync(file, 4 * PAGE_SIZE + (readMethod === 'pread' ? 100 : 0))
      const touched = touch([m.at(4 * PAGE_SIZE), m.at(9 * PAGE_SIZE)], { threads: 2 })
      await until(() => errors.length >= 2, 5000, 'an error for each page past the end')
      const addresses = new Set(errors.map((e) => (e as { address?: bigint }).address))
      expect(addresses).toEqual(new Set([m.at(4 * PAGE_SIZE), m.at(9 * PAGE_SIZE)]))
      expect((errors[0] as UffdError).code).toBe(readMethod === 'pread' ? 'EIO' : 'EFAULT')
      fs.writeFileSync(file, content) // whole again: the next try serves it
      const { values } = await within(touched, 5000, 'touch')
      expect([...values]).toEqual([u64At(content, 4 * PAGE_SIZE), u64At(content, 9 * PAGE_SIZE)])
      expect(server.stats().zeroPages).toBe(0)
    })
  }

  it('{ handler }: called with batches of windows off the hot path, bytes copied as returned', async () => {
    const n = 256
    const { m, server, errors } = setup(n, { faultAround: 8 * PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    const requests: Array<{ offset: number; length: number }> = []
    server.serve(m, {
      handler: async ({ address, offset, length, prefetch }) => {
        expect(prefetch).toBe(false)
        expect(address - m.address).toBe(BigInt(offset))
        requests.push({ offset, length })
        await new Promise((r) => setImmediate(r))
        return src.slice(offset, offset + length)
      },
    })
    await touchAndCheck(m, src, 3, 'random')
    // The main thread may not read { handler } memory itself until it is present (it runs
    // the handler): it is all present now.
    expect(Buffer.compare(readAll(m), src)).toBe(0)
    await within(server.drained(), 5000, 'drained')
    const s = server.stats()
    expect(s.requests).toBe(requests.length)
    expect(s.handlerPages).toBe(n)
    expect(requests.every((r) => r.length % PAGE_SIZE === 0 && r.length <= 8 * PAGE_SIZE)).toBe(true)
    expect(errors).toEqual([])
  })

  it('{ handler } with an offset and prefetch fills the range without faults; drained() resolves', async () => {
    const n = 200
    const { m, server } = setup(n, { prefetchChunk: 16 * PAGE_SIZE })
    const src = randomContent((n + 1) * PAGE_SIZE)
    server.serve(
      m,
      { handler: ({ offset, length }) => src.slice(offset, offset + length), offset: PAGE_SIZE },
      { prefetch: true },
    )
    await within(server.drained(), 10_000, 'drained')
    expect(server.stats().faults).toBe(0)
    expect(Buffer.compare(readAll(m), src.subarray(PAGE_SIZE))).toBe(0)
  })

  it('several ranges with different sources on one server; ranges added and removed while serving', async () => {
    const { uffd, server } = setup(1)
    const a = track(Mapping.anonymous(64 * PAGE_SIZE))
    const b = track(Mapping.anonymous(64 * PAGE_SIZE))
    const srcA = randomContent(a.length)
    server.serve(a, { buffer: srcA })
    const t = touchAndCheck(a, srcA, 2, 'random')
    server.serve(b, { zero: true })
    await t
    await touchAndCheck(b, new Uint8Array(b.length), 1, 'seq')
    expect(server.remove(b)).toBe(1)
    expect(uffd.closed).toBe(false)
    // b is unregistered again: plain memory.
    b.write(0, new Uint8Array([1, 2, 3]))
    expect(server.stats().pagesTotal).toBe(64)
  })
})

describe('FaultServer in-process', () => {
  it('the main JS thread reads lazily served memory directly (the engine has its own thread)', async () => {
    const n = 128
    const { m, server } = setup(n, { faultAround: 4 * PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    const view = new Uint8Array(m.buffer)
    // Byte by byte through a plain typed array: every first touch of a page is a fault.
    let mismatches = 0
    for (let i = 0; i < view.length; i += 1021) if (view[i] !== src[i]) mismatches++
    expect(mismatches).toBe(0)
    expect(Buffer.compare(Buffer.from(view), src)).toBe(0)
    await until(() => server.stats().faults > 0)
  })
})

describe('FaultServer fault-around', () => {
  it('copies an aligned window clipped to the range, skipping pages already present (EEXIST)', async () => {
    const n = 20
    const { uffd, m, server } = setup(n, { faultAround: 16 * PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    // Page 3 is present before serving: it must keep its own bytes.
    m.write(3 * PAGE_SIZE, new Uint8Array(PAGE_SIZE).fill(0xab))
    server.serve(m, { buffer: src })
    expect(uffd.closed).toBe(false)
    await touch([m.at(5 * PAGE_SIZE)])
    await until(() => server.stats().pagesPresent === 16, 5000, 'window filled')
    let s = server.stats()
    expect(s.pagesPresent).toBe(16) // the window [0, 16): 15 copied + page 3 found present
    expect(s.exists).toBe(1)
    expect(s.bytes).toBe(15 * PAGE_SIZE)
    await touch([m.at(17 * PAGE_SIZE)])
    await within(server.drained(), 5000, 'drained')
    s = server.stats()
    expect(s.pagesPresent).toBe(20) // the window [16, 32) clipped to the range's 20 pages
    const all = readAll(m)
    expect(all.subarray(3 * PAGE_SIZE, 4 * PAGE_SIZE).every((b) => b === 0xab)).toBe(true)
    expect(Buffer.compare(all.subarray(4 * PAGE_SIZE), src.subarray(4 * PAGE_SIZE))).toBe(0)
    expect(s.faults).toBe(2)
  })
})

describe('FaultServer prefetch and drained()', () => {
  it('prefetch races demand faults from 2 threads: every page once, none lost', async () => {
    const n = 4096
    // prefetchYield 0: the prefetch does not pause for demand faults, so the two really race.
    const { m, server, errors } = setup(n, {
      faultAround: 4 * PAGE_SIZE,
      prefetchChunk: 32 * PAGE_SIZE,
      prefetch: true,
      prefetchYieldUs: 0,
    })
    const src = randomContent(n * PAGE_SIZE)
    const progress: number[] = []
    server.on('progress', (p: { fraction: number }) => progress.push(p.fraction))
    server.serve(m, { buffer: src })
    await touchAndCheck(m, src, 2, 'random')
    await within(server.drained(), 10_000, 'drained')
    const s = server.stats()
    expect(s.bytes).toBe(n * PAGE_SIZE) // a page is never copied twice (EEXIST instead)
    expect(s.demandPages + s.prefetchPages).toBe(n)
    expect(s.pagesPresent).toBe(n)
    expect(Buffer.compare(readAll(m), src)).toBe(0)
    await until(() => progress.at(-1) === 1, 5000, 'final progress event')
    expect(errors).toEqual([])
  })

  it('drained() resolves at once when everything is present, and after a prefetch-only fill', async () => {
    const n = 2048
    const { m, server } = setup(n, { prefetchChunk: 2 * 1024 * 1024 })
    await server.drained() // no ranges: nothing to wait for
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src }, { prefetch: true })
    await within(server.drained(), 10_000, 'drained')
    expect(server.stats().prefetchPages).toBe(n)
    expect(server.stats().faults).toBe(0)
    await server.drained()
  })

  it('prefetch pauses while demand faults keep coming (demand first), then completes', async () => {
    // Demand (20 000 faults, one page each) lasts longer than the 64 MiB prefetch would alone,
    // so the two overlap however the scheduler runs them. Both shrink by the same factor where
    // everything runs slower (emulation), which keeps that ratio and the test's duration.
    const demand = Math.round(20_000 / timeScale)
    const prefetched = Math.round(16_384 / timeScale)
    const { server, m } = setup(demand, {
      faultAround: PAGE_SIZE,
      prefetchChunk: 4 * PAGE_SIZE,
      backgroundPriority: 'normal',
    })
    const big = track(Mapping.anonymous(prefetched * PAGE_SIZE))
    server.serve(big, { buffer: randomContent(big.length) }, { prefetch: true })
    server.serve(m, { zero: true })
    await touch(pages(m), { threads: 1 })
    await within(server.drained(), 10_000 * timeScale, 'drained')
    const s = server.stats()
    expect(s.prefetchPauses).toBeGreaterThan(0)
    expect(s.prefetchPages).toBe(prefetched)
  })

  it('drained() rejects when the server closes first', async () => {
    const { m, server } = setup(16)
    server.serve(m, { zero: true })
    const d = server.drained()
    server.close()
    await expect(d).rejects.toMatchObject({ code: 'EBADF' })
    await expect(server.drained()).rejects.toMatchObject({ code: 'EBADF' })
  })
})

describe('FaultServer events are typed', () => {
  it('listeners get typed arguments; an event name it does not emit does not compile', async () => {
    const { m, server } = setup(4)
    const seen: number[] = []
    server.on('progress', (p) => seen.push(p.fraction, p.bytesPresent))
    server.on('error', (e) => seen.push(Number(e.address ?? 0n)))
    server.on('fork', (child) => child.close())
    // @ts-expect-error: 'progres' is no event of a FaultServer (npm run typecheck fails without this line's error)
    server.on('progres', () => {})
    // @ts-expect-error: a progress listener gets a FaultServerProgress, not a string
    server.on('progress', (p: string) => p)
    server.serve(m, { zero: true }, { prefetch: true })
    await within(server.drained(), 5000, 'drained')
    await until(() => seen.includes(1), 5000, 'a progress event at 1')
  })
})

describe('FaultServer adaptive spin', () => {
  it('spinUs 0 never spins; by default a spin is 50 µs, 25 µs (a probe) or none, and hits are counted among reads', async () => {
    for (const spinUs of [0, undefined]) {
      const uffd = track(Userfaultfd.open())
      const server = track(
        new FaultServer(uffd, { faultAround: PAGE_SIZE, ...(spinUs === undefined ? {} : { spinUs }) }),
      )
      const m = track(Mapping.anonymous(256 * PAGE_SIZE))
      server.serve(m, { zero: true })
      await within(touch(pages(m), { threads: 1 }), 10_000, 'touch')
      await until(() => server.stats().faults === 256, 5000, 'faults counted')
      const st = server.stats()
      if (spinUs === 0) {
        expect(st.spinHits).toBe(0)
        expect(st.spinBudgetUs).toBe(0)
      } else {
        expect([0, 25, 50]).toContain(st.spinBudgetUs)
        expect(st.spinHits).toBeLessThanOrEqual(st.reads)
      }
      expect(st.reads).toBeGreaterThan(0)
    }
  })
})

describe('FaultServer bad input', () => {
  it('rejects bad options, sources and ranges with clear errors', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(4 * PAGE_SIZE))
    expect(() => new FaultServer({} as Userfaultfd)).toThrow(TypeError)
    expect(() => new FaultServer(uffd, { faultAround: 3 * PAGE_SIZE })).toThrow(/power of two/)
    expect(() => new FaultServer(uffd, { faultAround: 100 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { spinUs: -1 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { spinUs: '5' as never })).toThrow(TypeError)
    expect(() => new FaultServer(uffd, { readSize: 0 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { prefetchChunk: 1000 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { prefetchYieldUs: -5 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { watchdogMs: -1 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { progressIntervalMs: 1.5 })).toThrow(RangeError)
    expect(() => new FaultServer(uffd, { onFork: 'keep' as 'close' })).toThrow(TypeError)
    expect(() => new FaultServer(uffd, { backgroundPriority: 'high' as 'idle' })).toThrow(TypeError)
    expect(() => new FaultServer(uffd, { onRemove: 'drop' as 'zero' })).toThrow(TypeError)
    expect(() => new FaultServer(uffd, null as unknown as object)).toThrow(TypeError)
    const server = track(new FaultServer(uffd))
    expect(() => new FaultServer(uffd)).toThrow(/already has a FaultServer/)
    expect(() => server.serve(m, null as unknown as { zero: true })).toThrow(TypeError)
    expect(() => server.serve(m, {} as { zero: true })).toThrow(/one of/)
    expect(() => server.serve(m, { zero: false as true })).toThrow(TypeError)
    expect(() => server.serve(m, { buffer: 'x' as unknown as Uint8Array })).toThrow(TypeError)
    expect(() => server.serve(m, { buffer: new Uint8Array(PAGE_SIZE) })).toThrow(/cannot cover/)
    expect(() => server.serve(m, { buffer: new Uint8Array(m.length), offset: -1 })).toThrow(RangeError)
    expect(() => server.serve(m, { handler: 5 as unknown as () => Uint8Array })).toThrow(TypeError)
    expect(() => server.serve(m, { file: {} as string })).toThrow(TypeError)
    expect(() => server.serve(m, { file: '/nonexistent/snapshot' })).toThrow(/ENOENT/)
    expect(() => server.serve(m, { file: '/dev/null', readMethod: 'x' as 'mmap' })).toThrow(TypeError)
    expect(() => server.serve({ address: m.address + 1n, length: PAGE_SIZE }, { zero: true })).toThrow(RangeError)
    expect(() => server.serve({ address: m.address, length: 0 }, { zero: true })).toThrow(RangeError)
    expect(() => server.serve(m, { zero: true }, { faultAround: 7 })).toThrow(RangeError)
    server.serve(m.range(0, 2 * PAGE_SIZE), { zero: true })
    let err: unknown
    try {
      server.serve(m.range(PAGE_SIZE, 2 * PAGE_SIZE), { zero: true })
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(UffdError)
    expect(err).toMatchObject({ code: 'EEXIST' })
    server.close()
    server.close()
    expect(() => server.serve(m.range(2 * PAGE_SIZE, PAGE_SIZE), { zero: true })).toThrow(/closed/)
    expect(server.closed).toBe(true)
    track(new FaultServer(uffd)).close() // the uffd is free again
  })

  it('a closed uffd cannot be served', () => {
    const uffd = Userfaultfd.open()
    uffd.close()
    expect(() => new FaultServer(uffd)).toThrow(/closed/)
  })
})
