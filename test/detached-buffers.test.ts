// Buffers handed to the native engines and then detached (structuredClone with `transfer`, which
// frees the memory as soon as the clone is collected): the engines must never read or write the
// freed memory, and never leave a faulting thread unanswered (issue 17, defect 4).
//   - a FaultServer { buffer } source is copied when served: detaching it later changes nothing;
//   - a takeSnapshot { buffer } sink is written through engine memory and copied in at the end:
//     detached meanwhile, `done` rejects (EFAULT) and nothing is written anywhere.
// Before the fix, the small source served the allocator's free-list pointers, the 4 MiB one
// (munmapped on free) failed its copy with EFAULT and left the faulting thread blocked, and the
// snapshot wrote into whatever reused the sink's memory.
import * as v8 from 'node:v8'
import * as vm from 'node:vm'
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, Feature, Mapping, PAGE_SIZE, Userfaultfd, takeSnapshot } from '../src/index'
import { pages, touch } from '../src/testing'
import { closeAll, randomContent, setup, track, within } from './helpers/fault-server'

v8.setFlagsFromString('--expose-gc')
const gc: () => void = vm.runInNewContext('gc')

afterEach((ctx) => closeAll(ctx))

/** Detaches `buffer` and lets its memory go: the clone that owns it now is collected. */
function detachAndFree(buffer: ArrayBuffer): void {
  structuredClone(buffer, { transfer: [buffer] })
  expect(buffer.byteLength).toBe(0)
  gc()
  gc()
}

/** Allocates buffers the size of the freed one (and fills them), to take over its memory. */
function reuse(bytes: number, count = 16): Buffer[] {
  return Array.from({ length: count }, () => Buffer.alloc(bytes, 0xa5))
}

/** Whether the buffers reuse() made still hold only what it wrote. */
function untouched(buffers: Buffer[]): boolean {
  const pattern = Buffer.alloc(buffers[0].length, 0xa5)
  return buffers.every((b) => b.equals(pattern))
}

describe('a FaultServer { buffer } source detached while served', () => {
  for (const size of [16 * PAGE_SIZE, 4 * 1024 * 1024]) {
    it(`${size / 1024} KiB: the faulting threads get the bytes it held when served`, async () => {
      const n = size / PAGE_SIZE
      const { m, server, errors } = setup(n, { faultAround: PAGE_SIZE })
      const content = randomContent(size)
      const source = new Uint8Array(size)
      source.set(content)
      server.serve(m, { buffer: source })
      detachAndFree(source.buffer)
      const others = reuse(size)
      // From 2 native threads; a fault left unanswered fails the test by its deadline.
      const { values } = await within(touch(pages(m), { threads: 2 }), 10_000, 'touch')
      for (let p = 0; p < n; p++) expect(values[p]).toBe(BigInt(p + 1))
      expect(untouched(others)).toBe(true)
      expect(errors).toEqual([])
      expect(server.stats().errors).toBe(0)
    })
  }

  it('a SharedArrayBuffer source is used in place (it cannot be detached)', async () => {
    const n = 8
    const { m, server, errors } = setup(n, { faultAround: PAGE_SIZE })
    const shared = new SharedArrayBuffer(n * PAGE_SIZE)
    new Uint8Array(shared).set(randomContent(n * PAGE_SIZE))
    server.serve(m, { buffer: shared })
    expect(() => structuredClone(shared, { transfer: [shared as never] })).toThrow()
    // Written after serve(): in place, so the engine copies what the buffer holds now.
    new DataView(shared).setBigUint64(3 * PAGE_SIZE, 0x5eedn, true)
    const { values } = await within(touch(pages(m)), 5000, 'touch')
    expect(values[3]).toBe(0x5eedn)
    expect(values[0]).toBe(1n)
    expect(errors).toEqual([])
  })
})

describe('a takeSnapshot { buffer } sink detached mid-snapshot', () => {
  const probe = Userfaultfd.probe()
  const canWp = probe.supported && (probe.features & Feature.PAGEFAULT_FLAG_WP) !== 0n

  it('done rejects with EFAULT and no memory is written, neither the freed one nor its reuser', async (ctx) => {
    if (!canWp) ctx.skip(`kernel ${probe.kernel} lacks userfaultfd write-protection`)
    const n = 32
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    m.write(0, randomContent(n * PAGE_SIZE))
    const sink = new ArrayBuffer(n * PAGE_SIZE)
    // One page per background step at 16 pages/s: the snapshot runs for about 2 s.
    const snap = takeSnapshot(m, { buffer: sink }, { chunkSize: PAGE_SIZE, maxBytesPerSecond: 16 * PAGE_SIZE })
    track({ close: () => snap.close() })
    await new Promise((r) => setTimeout(r, 150))
    expect(snap.progress().done).toBe(false)
    detachAndFree(sink)
    const others = reuse(n * PAGE_SIZE)
    const err = await within(
      snap.done.then(
        () => undefined,
        (e: unknown) => e,
      ),
      10_000,
      'done',
    )
    expect(err).toMatchObject({
      name: 'UffdError',
      code: 'EFAULT',
      syscall: 'takeSnapshot',
      message: expect.stringMatching(/sink buffer was detached/),
    })
    expect(untouched(others)).toBe(true)
  })

  it('a buffer that stays whole gets the snapshot (copied in when done)', async (ctx) => {
    if (!canWp) ctx.skip(`kernel ${probe.kernel} lacks userfaultfd write-protection`)
    const n = 32
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    const content = randomContent(n * PAGE_SIZE)
    m.write(0, content)
    const sink = new Uint8Array(n * PAGE_SIZE)
    const stats = await within(takeSnapshot(m, { buffer: sink }).done, 10_000, 'done')
    expect(stats.copyMethod).toMatch(/process_vm_readv|pipe/)
    expect(Buffer.compare(sink, content)).toBe(0)
  })

  it('SharedArrayBuffer and Mapping sinks are written in place', async (ctx) => {
    if (!canWp) ctx.skip(`kernel ${probe.kernel} lacks userfaultfd write-protection`)
    const n = 16
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    const content = randomContent(n * PAGE_SIZE)
    m.write(0, content)
    const shared = new SharedArrayBuffer(n * PAGE_SIZE)
    await within(takeSnapshot(m, { buffer: shared }).done, 10_000, 'done')
    expect(Buffer.compare(new Uint8Array(shared), content)).toBe(0)
    const target = track(Mapping.anonymous(n * PAGE_SIZE))
    await within(takeSnapshot(m, { buffer: target }).done, 10_000, 'done')
    const out = new Uint8Array(n * PAGE_SIZE)
    target.read(0, out)
    expect(Buffer.compare(out, content)).toBe(0)
    const snap = takeSnapshot(m, { buffer: target })
    target.unmap() // waits for the snapshot: the engine never writes into memory that is gone
    expect(target.unmapped).toBe(true)
    expect((await within(snap.done, 10_000, 'done')).bytesCopied).toBe(n * PAGE_SIZE)
  })
})

describe('FaultServer sources that are not buffers keep working as before', () => {
  it('a plain ArrayBuffer (not a view) with an offset', async () => {
    const n = 4
    const { m, server } = setup(n, { faultAround: PAGE_SIZE })
    const content = randomContent((n + 1) * PAGE_SIZE)
    const ab = content.buffer.slice(content.byteOffset, content.byteOffset + content.length)
    server.serve(m, { buffer: ab, offset: PAGE_SIZE })
    const { values } = await within(touch(pages(m)), 5000, 'touch')
    for (let p = 0; p < n; p++) expect(values[p]).toBe(BigInt(p + 2))
    expect(server).toBeInstanceOf(FaultServer)
  })
})
