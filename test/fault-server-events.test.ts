// FaultServer under memory events (REMOVE, UNMAP, REMAP, FORK raised from native threads while
// it serves), and errors surfacing as 'error' events.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import {
  Feature,
  FaultServer,
  type FaultServerError,
  Mapping,
  PAGE_SIZE,
  Userfaultfd,
  type Userfaultfd as Uffd,
} from '../src/index'
import { forkOnThread, madviseOnThread, mmapRaw, mremapOnThread, munmapOnThread, pages, touch } from '../src/testing'
import {
  closeAll,
  onCleanup,
  once,
  randomContent,
  readAll,
  setup,
  track,
  u64At,
  until,
  within,
} from './helpers/fault-server'
import { env, needs } from './helpers/env'

afterEach((ctx) => closeAll(ctx))

function u64s(values: BigUint64Array): bigint[] {
  return Array.from(values)
}

describe('FaultServer events', () => {
  it("REMOVE (MADV_DONTNEED) with onRemove 'zero': the removed pages are served as zeros", async () => {
    const n = 64
    const { m, server, errors } = setup(n, { faultAround: 8 * PAGE_SIZE }, Feature.EVENT_REMOVE)
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    await touch(pages(m), { threads: 2 })
    expect(await within(madviseOnThread(m.range(16 * PAGE_SIZE, 16 * PAGE_SIZE), 'dontneed'), 5000, 'madvise')).toBe(0)
    await until(() => server.stats().removes === 1)
    const { values } = await touch(pages(m), { threads: 2 })
    for (let p = 0; p < n; p++) {
      expect(values[p]).toBe(p >= 16 && p < 32 ? 0n : BigInt(p + 1))
    }
    await until(() => server.stats().pagesPresent === n) // removed pages count as settled
    expect(errors).toEqual([])
  })

  it("REMOVE with onRemove 'source', racing faults from 2 threads: every page ends with its source bytes", async () => {
    const n = 512
    const { m, server, errors } = setup(
      n,
      {
        faultAround: 4 * PAGE_SIZE,
        onRemove: 'source',
        prefetch: true,
        prefetchChunk: 16 * PAGE_SIZE,
        prefetchYieldUs: 0,
      },
      Feature.EVENT_REMOVE,
    )
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    for (let round = 0; round < 5; round++) {
      const touching = touch(pages(m), { threads: 2 })
      const removing = madviseOnThread(m.range(round * 64 * PAGE_SIZE, 128 * PAGE_SIZE), 'dontneed')
      const [{ values }, errno] = await within(Promise.all([touching, removing]), 10_000, `round ${round}`)
      expect(errno).toBe(0)
      for (let p = 0; p < n; p++) expect(values[p]).toBe(BigInt(p + 1))
    }
    await until(() => server.stats().removes === 5)
    expect(Buffer.compare(readAll(m), src)).toBe(0)
    expect(errors).toEqual([])
  })

  it("REMOVE with onRemove 'unregister': the removed pages fault no more and read zeros", async () => {
    const n = 32
    const { uffd, m, server, errors } = setup(
      n,
      { faultAround: PAGE_SIZE, onRemove: 'unregister' },
      Feature.EVENT_REMOVE,
    )
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    await touch(pages(m), { threads: 2 })
    expect(await within(madviseOnThread(m.range(8 * PAGE_SIZE, 8 * PAGE_SIZE), 'dontneed'), 5000, 'madvise')).toBe(0)
    await until(() => server.stats().removes === 1)
    const faults = server.stats().faults
    const { values } = await within(touch(pages(m), { threads: 2 }), 5000, 'touch')
    for (let p = 0; p < n; p++) expect(values[p]).toBe(p >= 8 && p < 16 ? 0n : BigInt(p + 1))
    expect(server.stats().faults).toBe(faults) // the kernel's own zero pages: no fault reached us
    expect(server.stats().pagesPresent).toBe(n) // unregistered pages count as settled
    // Registered no more: a second register of that part succeeds (EBUSY/EEXIST otherwise).
    const other = track(Userfaultfd.open())
    expect(() => other.register(m.range(8 * PAGE_SIZE, 8 * PAGE_SIZE))).not.toThrow()
    expect(uffd.closed).toBe(false)
    expect(errors).toEqual([])
  })

  it('UNMAP: unmapped pages are dropped; a fully unmapped range stops being served', async () => {
    const n = 32
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_UNMAP }))
    const server = track(new FaultServer(uffd))
    const addr = mmapRaw(n * PAGE_SIZE)
    const src = randomContent(n * PAGE_SIZE)
    server.serve({ address: addr, length: n * PAGE_SIZE }, { buffer: src })
    await touch([addr + BigInt(PAGE_SIZE)])
    expect(await within(munmapOnThread(addr + BigInt(16 * PAGE_SIZE), 16 * PAGE_SIZE), 5000, 'munmap')).toBe(0)
    await until(() => server.stats().unmaps === 1)
    let s = server.stats()
    expect(s.unmaps).toBe(1)
    expect(s.pagesTotal).toBe(n)
    expect(s.pagesPresent).toBeGreaterThanOrEqual(16) // gone pages are settled
    const { values } = await touch([addr + BigInt(15 * PAGE_SIZE)])
    expect(values[0]).toBe(16n)
    expect(await within(munmapOnThread(addr, 16 * PAGE_SIZE), 5000, 'munmap')).toBe(0)
    await until(() => server.stats().unmaps === 2)
    s = server.stats()
    expect(s.unmaps).toBe(2)
    expect(s.pagesTotal).toBe(0)
    await within(server.drained(), 1000, 'drained')
  })

  it('REMAP: a moved range is served at its new address with the same source', async () => {
    const n = 32
    const len = n * PAGE_SIZE
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMAP }))
    const server = track(new FaultServer(uffd, { faultAround: PAGE_SIZE }))
    const errors: Error[] = []
    server.on('error', (e: Error) => errors.push(e))
    const addr = mmapRaw(len)
    const src = randomContent(len)
    server.serve({ address: addr, length: len }, { buffer: src })
    await touch(pages({ address: addr, length: len }, 8)) // pages 0..7 present before the move
    const moved = await within(mremapOnThread(addr, len, 2 * len), 5000, 'mremap')
    expect(moved.errno).toBe(0)
    onCleanup(() => {
      void munmapOnThread(moved.address, 2 * len)
    }, true)
    await until(() => server.stats().remaps === 1)
    const list = pages({ address: moved.address, length: len })
    const { values } = await within(touch(list, { threads: 2 }), 5000, 'touch')
    expect(u64s(values)).toEqual(Array.from({ length: n }, (_, p) => BigInt(p + 1)))
    await within(server.drained(), 5000, 'drained')
    const s = server.stats()
    expect(s.pagesTotal).toBe(n)
    expect(s.pagesPresent).toBe(n)
    expect(s.demandPages).toBe(n) // the 8 moved pages were not copied again
    expect(errors).toEqual([])
  })

  it("FORK: the child's uffd is closed by default, or emitted with onFork 'emit'", async (ctx) => {
    needs(
      ctx,
      env.capSysPtrace,
      'Feature.EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks (e.g. docker run --device /dev/userfaultfd without --cap-add SYS_PTRACE)',
    )
    for (const onFork of ['close', 'emit'] as const) {
      const { m, server } = setup(8, { onFork }, Feature.EVENT_FORK)
      const src = randomContent(m.length)
      server.serve(m, { buffer: src })
      await touch([m.at(0)])
      const got: Uffd[] = []
      server.on('fork', (child: Uffd) => got.push(child))
      const forked = onFork === 'emit' ? once(server, 'fork') : null
      if (onFork === 'close') server.removeAllListeners('fork')
      // Made with a raw clone on a native thread: glibc fork() would deadlock on malloc locks
      // while EVENT_FORK blocks it.
      const r = await within(forkOnThread(), 5000, 'fork')
      expect(r.errno).toBe(0)
      expect(r.status).toBe(0)
      await until(() => server.stats().forks === 1)
      if (forked !== null) {
        const child = await forked
        expect(child).toBeInstanceOf(Userfaultfd)
        child.close()
      }
      const { values } = await touch([m.at(PAGE_SIZE)])
      expect(values[0]).toBe(2n)
      closeAll()
    }
  })
})

describe('FaultServer errors', () => {
  it('a source that cannot be read is an error event (EFAULT), not a crash', async () => {
    const { uffd, m, server, errors } = setup(4, { faultAround: PAGE_SIZE })
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-'))
    onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
    const file = path.join(dir, 'snapshot.bin')
    fs.writeFileSync(file, randomContent(4 * PAGE_SIZE))
    server.serve(m, { file }) // copied from a private mapping of the file
    fs.truncateSync(file, 0) // the source vanishes while served: its mapping reads as SIGBUS
    const err = once(server, 'error')
    const touching = touch([m.at(0)])
    expect(await err).toMatchObject({ name: 'UffdError', code: 'EFAULT', syscall: 'ioctl(UFFDIO_COPY)' })
    expect(server.stats().errors).toBeGreaterThanOrEqual(1)
    server.close()
    uffd.close() // wakes the blocked thread: it reads zeros
    expect((await within(touching, 5000, 'touch')).values[0]).toBe(0n)
    expect(errors.length).toBeGreaterThanOrEqual(1)
  })

  it('a Mapping source unmapped while served stays mapped until the range is no longer served', async () => {
    const { m, server, errors } = setup(4, { faultAround: PAGE_SIZE })
    const srcMap = Mapping.anonymous(4 * PAGE_SIZE)
    const content = randomContent(4 * PAGE_SIZE)
    srcMap.write(0, content)
    server.serve(m, { buffer: srcMap })
    srcMap.unmap() // the engine still copies from it: the memory stays until the range goes
    expect(srcMap.unmapped).toBe(true)
    expect(() => srcMap.read(0, new Uint8Array(8))).toThrow(expect.objectContaining({ code: 'EBADF' }))
    const { values } = await within(touch(pages(m)), 5000, 'touch')
    for (let p = 0; p < 4; p++) expect(values[p]).toBe(BigInt(p + 1))
    // Whether the source's memory is still mapped: /proc/self/mem reads it, or fails with EIO.
    const mapped = (): boolean => {
      const fd = fs.openSync('/proc/self/mem', 'r')
      try {
        return fs.readSync(fd, Buffer.alloc(8), 0, 8, srcMap.address) === 8
      } catch {
        return false
      } finally {
        fs.closeSync(fd)
      }
    }
    expect(mapped()).toBe(true)
    server.remove(m)
    expect(mapped()).toBe(false)
    expect(errors).toEqual([])
  })

  it('a fault outside every served range is served as zeros and reported once', async () => {
    const { uffd, m, server, errors } = setup(8)
    uffd.register(m) // registered, not served
    server.serve(m.range(0, 4 * PAGE_SIZE), { buffer: randomContent(4 * PAGE_SIZE) }, { register: false })
    const { values } = await within(touch([m.at(5 * PAGE_SIZE), m.at(6 * PAGE_SIZE)]), 5000, 'touch')
    expect(u64s(values)).toEqual([0n, 0n])
    await until(() => server.stats().unhandled === 2)
    await new Promise((r) => setTimeout(r, 20))
    expect(errors).toHaveLength(1)
    expect(errors[0]).toMatchObject({ code: 'ENOENT' })
  })

  it('a failing { handler } is an error event, and the request is retried while the thread waits', async () => {
    const { m, server } = setup(4, { faultAround: PAGE_SIZE })
    const src = randomContent(m.length)
    let calls = 0
    server.serve(m, {
      handler: ({ offset, length }) => {
        if (++calls <= 2) throw new Error('fetch failed')
        return src.slice(offset, offset + length)
      },
    })
    const errors: Error[] = []
    server.on('error', (e: Error) => errors.push(e))
    const first = touch([m.at(0)])
    const second = touch([m.at(8)]) // another fault on the same page meanwhile
    const [a, b] = await within(Promise.all([first, second]), 5000, 'touch')
    expect(a.values[0]).toBe(1n)
    expect(b.values[0]).toBe(u64At(src, 8))
    // Two failures, then success. (The second fault may ask again while the first request is
    // backing off on a loaded machine: a third successful call is allowed, not required.)
    expect(calls).toBeGreaterThanOrEqual(3)
    // Each failure: the cause, the faulting page's address, and what onSourceError ('retry' by
    // default) did about it.
    expect(errors.map((e) => (e.cause as Error).message)).toEqual(['fetch failed', 'fetch failed'])
    expect(errors.map((e) => (e as FaultServerError).action)).toEqual(['retry', 'retry'])
    expect(errors[0]).toMatchObject({ name: 'UffdError', address: m.address, retryInMs: 10 })
    expect(errors[0].message).toMatch(/could not give the page at 0x[0-9a-f]+: fetch failed \(retrying in 10 ms\)/)
  })

  it('a handler returning something other than bytes is an error event', async () => {
    const { uffd, m, server } = setup(2)
    server.serve(m, { handler: () => 42 as unknown as Uint8Array })
    const err = once(server, 'error')
    const touching = touch([m.at(0)])
    expect((await err).cause).toBeInstanceOf(TypeError)
    server.close()
    uffd.close()
    await within(touching, 5000, 'touch')
  })

  it('without an error listener, errors become process warnings', async () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    track(new FaultServer(uffd)) // serves no range: the fault below is unhandled
    uffd.register(m)
    const warned = new Promise<Error>((resolve) => process.once('warning', resolve))
    const t = touch([m.at(0)]) // not served: zeros, and one ENOENT report
    const w = await within(warned, 5000, 'warning')
    expect(w.message).toMatch(/outside every served range/)
    await t
  })
})
