// Live snapshots under concurrent writers. Writes come from native stamper/toucher threads only:
// the snapshot's resolver is a native thread, but the JS thread must stay free to run the test.
import { afterEach, describe, expect, it } from 'vitest'
import { timeScale } from './helpers/children'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { once } from 'node:events'
import { Worker } from 'node:worker_threads'
import type * as index from '../src/index'
import {
  FaultServer,
  Feature,
  Mapping,
  PAGE_SIZE,
  Userfaultfd,
  UffdError,
  hugePageSize,
  takeSnapshot,
  type KernelFeature,
  type LiveSnapshot,
} from '../src/index'
import { madviseOnThread, munmapOnThread, pages, startStamper, touch } from '../src/testing'
import type { Stamper } from '../src/testing'
import { checkFinal, checkStamps } from './helpers/stamps'
import { env } from './helpers/env'
import { withFeature } from './helpers/kernel'

const MiB = 1024 * 1024
const probe = Userfaultfd.probe()
const offered = probe.features
const freeHuge = (): number =>
  Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)

if (!probe.supported) console.log(`live-snapshot tests skipped: userfaultfd unavailable: ${probe.reason}`)

// Without userfaultfd write protection (arm64 before 6.10) each test asserts takeSnapshot()'s
// refusal instead; shmem and hugetlb also need WP_HUGETLBFS_SHMEM.
function canSnapshot(kind: 'anonymous' | 'shmem' = 'anonymous'): boolean {
  const features: KernelFeature[] =
    kind === 'anonymous' ? ['PAGEFAULT_FLAG_WP'] : ['PAGEFAULT_FLAG_WP', 'WP_HUGETLBFS_SHMEM']
  const m = track(kind === 'anonymous' ? Mapping.anonymous(PAGE_SIZE) : Mapping.memfd(PAGE_SIZE))
  return withFeature(features, () => takeSnapshot(m, { buffer: new ArrayBuffer(PAGE_SIZE) }))
}

const cleanup: Array<() => unknown> = []
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f()
})
function track<T extends Mapping | LiveSnapshot>(x: T): T {
  cleanup.push(() => (x instanceof Mapping ? x.unmap() : x.close()))
  return x
}
function trackStamper(s: Stamper): Stamper {
  cleanup.push(() => s.stop())
  return s
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** Every stamper thread writes again within `ms` (none is left blocked in a fault). */
async function expectProgress(stamper: Stamper, ms = 2000 * timeScale): Promise<void> {
  const c0 = stamper.counts()
  const deadline = Date.now() + ms
  let c = c0
  while (Date.now() < deadline) {
    await sleep(5)
    c = stamper.counts()
    if (c.every((v, t) => v > c0[t])) return
  }
  throw new Error(`stamper threads stuck: ${Array.from(c0)} -> ${Array.from(c)} in ${ms} ms`)
}

function bytesOf(m: Mapping): Uint8Array {
  const out = new Uint8Array(m.length)
  m.read(0, out)
  return out
}

/** Snapshot `m` while `threads` stampers write it; check it page by page; return the stats. */
async function stampedSnapshot(
  m: Mapping,
  sinkOf: (length: number) => { sink: Parameters<typeof takeSnapshot>[1]; read: () => Uint8Array },
  options: Parameters<typeof takeSnapshot>[2] = {},
  threads = 2,
): Promise<index.SnapshotStats> {
  const stamper = trackStamper(startStamper(m, { threads, shuffle: true, seed: 7 }))
  await sleep(30)
  const { sink, read } = sinkOf(m.length)
  const before = stamper.counts()
  const snap = track(takeSnapshot(m, sink, options))
  const after = stamper.counts()
  const stats = await snap.done
  // Writers go on after it (each writes again, however loaded the machine).
  await expectProgress(stamper)
  const { counts, stale } = await stamper.stop()
  const check = checkStamps(read(), stamper, threads, before, after)
  expect(check.mismatches).toEqual([])
  expect(check.torn).toBe(0)
  expect(stale).toBe(0)
  expect(checkFinal(bytesOf(m), stamper, threads, counts)).toEqual([])
  // Writers kept going during and after the snapshot.
  for (let t = 0; t < threads; t++) expect(counts[t]).toBeGreaterThan(after[t])
  expect(stats.pagesCopied).toBe(stats.totalPages)
  expect(stats.bytesCopied).toBe(m.length)
  expect(stats.faultCopies + stats.backgroundCopies).toBe(stats.totalPages)
  return stats
}

const bufferSink = (length: number): { sink: { buffer: ArrayBuffer }; read: () => Uint8Array } => {
  const buffer = new ArrayBuffer(length)
  return { sink: { buffer }, read: () => new Uint8Array(buffer) }
}

function tmpFile(name: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-snap-'))
  cleanup.push(() => fs.rmSync(dir, { recursive: true, force: true }))
  return path.join(dir, name)
}

describe.skipIf(!probe.supported)('live snapshot', () => {
  it('equals memory as of its start, page by page, while 2 threads keep writing (buffer sink)', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(64 * MiB))
    // Slow the background pass so that writers hit many pages before it does.
    const stats = await stampedSnapshot(m, bufferSink, { maxBytesPerSecond: 256 * MiB })
    expect(stats.faultCopies).toBeGreaterThan(0)
    expect(stats.populated).toBe((offered & Feature.WP_UNPOPULATED) === 0n)
    expect(['process_vm_readv', 'pipe']).toContain(stats.copyMethod)
  })

  it("backgroundPriority: 'idle' (SCHED_IDLE background copy) is consistent too", {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(16 * MiB))
    await stampedSnapshot(m, bufferSink, { backgroundPriority: 'idle', chunkSize: 64 * 1024 })
  })

  it('4 writer threads, unthrottled, several snapshots in a row (fault-around 0, 64 KiB, 1 MiB)', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(32 * MiB))
    for (const faultAround of [0, 64 * 1024, MiB]) await stampedSnapshot(m, bufferSink, { faultAround }, 4)
  })

  // With one order and seed, two stampers used to write the very same values to the same slots,
  // so a second snapshot of memory a first stamper had written (slowly: under emulation it did
  // not get through its slots twice) read its first writes as "initial values" and failed the
  // check above although the snapshot was right. Each stamper now tags its stamps with its run.
  it('stampers on the same memory write values no earlier stamper wrote (run number in each stamp)', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(MiB))
    const first = startStamper(m, { threads: 2, shuffle: true, seed: 7 })
    await first.stop()
    const second = startStamper(m, { threads: 2, shuffle: true, seed: 7 })
    // Until it has written (under emulation its threads may take a while to start).
    for (const deadline = Date.now() + 5000 * timeScale; Date.now() < deadline; ) {
      if (second.counts().every((c) => c > 0)) break
      await sleep(5)
    }
    await second.stop()
    expect(second.run()).not.toBe(first.run())
    const words = new BigUint64Array(bytesOf(m).buffer)
    for (let slot = 0; slot < m.length / PAGE_SIZE; slot++) {
      const run = Number(words[slot * (PAGE_SIZE / 8)] >> 48n)
      expect([0, first.run(), second.run()]).toContain(run)
    }
    expect(
      Array.from({ length: m.length / PAGE_SIZE }, (_, slot) => Number(words[slot * (PAGE_SIZE / 8)] >> 48n)),
    ).toContain(second.run())
  })

  it('file sink: pages land at offset + page offset (a FaultServer { file, offset } source)', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(16 * MiB))
    const file = tmpFile('snap.bin')
    const offset = 3 * PAGE_SIZE
    fs.writeFileSync(file, Buffer.alloc(offset, 0xaa))
    const stats = await stampedSnapshot(
      m,
      () => ({
        sink: { path: file, offset },
        read: () => new Uint8Array(fs.readFileSync(file).subarray(offset)),
      }),
      { maxBytesPerSecond: 128 * MiB },
    )
    expect(stats.copyMethod).toBe('pwrite')
    const content = fs.readFileSync(file)
    expect(content.length).toBe(offset + m.length)
    expect(content.subarray(0, offset).every((b) => b === 0xaa)).toBe(true)
  })

  it('fd sink is written but not closed', { timeout: 30_000 * timeScale }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(4 * MiB))
    m.write(0, Buffer.from('hello'))
    const file = tmpFile('fd.bin')
    const fd = fs.openSync(file, 'w+')
    cleanup.push(() => fs.closeSync(fd))
    await track(takeSnapshot(m, { fd })).done
    expect(fs.fstatSync(fd).size).toBe(m.length)
    expect(fs.readFileSync(file).subarray(0, 5).toString()).toBe('hello')
  })

  it('the pipe copy path (used where seccomp forbids process_vm_readv) is consistent too', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(32 * MiB))
    const stats = await stampedSnapshot(m, bufferSink, {
      copyMethod: 'pipe',
      maxBytesPerSecond: 256 * MiB,
      faultAround: 0,
    })
    expect(stats.copyMethod).toBe('pipe')
  })

  it('populate: true (the path for kernels without WP_UNPOPULATED) is consistent and says so', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(32 * MiB))
    const stats = await stampedSnapshot(m, bufferSink, { populate: true, maxBytesPerSecond: 256 * MiB })
    expect(stats.populated).toBe(true)
  })

  for (const populate of [false, true]) {
    it(`writes to never-touched pages after it began are not in it (populate: ${populate})`, {
      timeout: 30_000 * timeScale,
    }, async () => {
      if (!canSnapshot()) return
      const m = track(Mapping.anonymous(8 * MiB))
      const buffer = new ArrayBuffer(m.length)
      // Without WP_UNPOPULATED (before 6.4) a never-touched page cannot be protected: populate:
      // false is refused by name (populate: 'auto', the default, populates instead).
      if (!populate && !withFeature('WP_UNPOPULATED', () => takeSnapshot(m, { buffer }, { populate }))) return
      const snap = track(takeSnapshot(m, { buffer }, { populate, maxBytesPerSecond: 16 * MiB }))
      const written = await touch(pages(m), { write: true, value: 0x5eed0000n, threads: 2 })
      const stats = await snap.done
      expect(new Uint8Array(buffer).every((b) => b === 0)).toBe(true)
      expect(stats.populated).toBe(populate)
      expect(snap.populated).toBe(populate)
      // The writers' values are all in memory.
      const mem = new BigUint64Array(bytesOf(m).buffer)
      for (let i = 0; i < written.values.length; i++) expect(mem[i * (PAGE_SIZE / 8)]).toBe(written.values[i])
    })
  }

  it('hugetlb memory (2 MiB pages)', { timeout: 60_000 * timeScale }, async () => {
    if (!canSnapshot('shmem')) return
    if (freeHuge() < 8) return console.log('skipped: needs 8 free huge pages (echo 64 > /proc/sys/vm/nr_hugepages)')
    const m = track(Mapping.anonymous(8 * hugePageSize(), { hugetlb: true }))
    const stats = await stampedSnapshot(m, bufferSink, { maxBytesPerSecond: 64 * MiB })
    expect(stats.totalPages).toBe(8)
  })

  it('shmem (memfd) memory', { timeout: 60_000 * timeScale }, async () => {
    if (!canSnapshot('shmem')) return
    const m = track(Mapping.memfd(32 * MiB))
    await stampedSnapshot(m, bufferSink, { maxBytesPerSecond: 256 * MiB })
  })

  it('hugetlbfs memfd memory, to a file', { timeout: 60_000 * timeScale }, async () => {
    if (!canSnapshot('shmem')) return
    if (freeHuge() < 8) return console.log('skipped: needs 8 free huge pages (echo 64 > /proc/sys/vm/nr_hugepages)')
    const m = track(Mapping.memfd(8 * hugePageSize(), { hugetlb: true }))
    const file = tmpFile('huge.bin')
    await stampedSnapshot(m, () => ({ sink: { path: file }, read: () => new Uint8Array(fs.readFileSync(file)) }), {
      maxBytesPerSecond: 64 * MiB,
    })
  })

  it('a snapshot file restores into fresh memory through FaultServer (lazily, page by page)', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(8 * MiB))
    const stamper = startStamper(m, { threads: 2 })
    await sleep(20)
    const file = tmpFile('restore.bin')
    const snap = track(takeSnapshot(m, { path: file }))
    await snap.done
    await stamper.stop()
    const expected = fs.readFileSync(file)

    const target = track(Mapping.anonymous(m.length))
    const uffd = Userfaultfd.open()
    cleanup.push(() => uffd.close())
    // FaultServer serves the file lazily: page offset in the range = offset in the file.
    const server = new FaultServer(uffd)
    server.serve(target, { file, offset: 0 })
    const stop = (): void => server.close()
    try {
      const read = await touch(pages(target), { threads: 2 })
      for (let i = 0; i < read.values.length; i++) expect(read.values[i]).toBe(expected.readBigUInt64LE(i * PAGE_SIZE))
    } finally {
      stop()
    }
    expect(Buffer.from(bytesOf(target)).equals(expected)).toBe(true)
  })

  it('reports progress while it runs and once at the end', { timeout: 30_000 * timeScale }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(16 * MiB))
    const seen: index.SnapshotProgress[] = []
    const snap = track(
      takeSnapshot(
        m,
        { buffer: new ArrayBuffer(m.length) },
        { maxBytesPerSecond: 64 * MiB, progressIntervalMs: 20, onProgress: (p) => seen.push(p) },
      ),
    )
    await sleep(60)
    const mid = snap.progress()
    expect(mid.done).toBe(false)
    expect(mid.bytesCopied).toBeLessThan(m.length)
    const stats = await snap.done
    expect(seen.length).toBeGreaterThan(3)
    for (let i = 1; i < seen.length; i++) expect(seen[i].bytesCopied).toBeGreaterThanOrEqual(seen[i - 1].bytesCopied)
    expect(seen[seen.length - 1]).toMatchObject({ done: true, bytesCopied: m.length })
    expect(stats.elapsedMs).toBeGreaterThan(150)
    expect(stats.protectMs).toBeGreaterThanOrEqual(0)
  })

  it('cancel() releases the writers and rejects with ECANCELED; so does an AbortSignal', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(32 * MiB))
    // Writers on the first MiB only, one page per fault: their faults cannot finish the snapshot early.
    const stamper = trackStamper(startStamper({ address: m.address, length: MiB }, { threads: 2 }))
    await sleep(20)
    const snap = track(
      takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: 16 * MiB, faultAround: 0 }),
    )
    await sleep(50)
    await snap.cancel()
    await expect(snap.done).rejects.toMatchObject({ code: 'ECANCELED', syscall: 'snapshot' })
    await expectProgress(stamper)
    expect((await stamper.stop()).stale).toBe(0)

    const ac = new AbortController()
    const snap2 = track(
      takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: 16 * MiB, signal: ac.signal }),
    )
    setTimeout(() => ac.abort(), 30)
    const err = await snap2.done.catch((e: UffdError) => e)
    expect(err).toBeInstanceOf(UffdError)
    expect((err as UffdError).code).toBe('ECANCELED')
  })

  it('range unmapped mid-snapshot: a clear error, writers elsewhere released, no hang', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(32 * MiB))
    const half = m.length / 2
    const stamper = trackStamper(startStamper({ address: m.address, length: half }, { threads: 2 }))
    await sleep(20)
    const snap = track(
      takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: 32 * MiB, faultAround: 0 }),
    )
    const outcome = snap.done.catch((e: UffdError) => e)
    await sleep(50)
    // From a native thread: munmap blocks until the snapshot thread reads the UNMAP event.
    expect(await munmapOnThread(m.address + BigInt(half), half)).toBe(0)
    const err = await outcome
    expect(err).toBeInstanceOf(UffdError)
    // From the UNMAP event, or from a copy that got there first (munmap unmaps, then reports).
    expect(err).toMatchObject({ code: 'EFAULT' })
    expect((err as UffdError).message).toMatch(/was unmapped|no longer mapped/)
    expect((err as UffdError & { stats: index.SnapshotStats }).stats.pagesCopied).toBeLessThan(m.length / PAGE_SIZE)
    // Writers in the half still mapped run on (each makes progress within 2 s, however loaded the machine).
    await expectProgress(stamper)
    expect((await stamper.stop()).stale).toBe(0)
  })

  it('range unmapped under the copy with no event to warn it: EFAULT from the copy itself, no crash', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    // Every copy path must survive a source that vanishes (the pipe path is what runs in Docker).
    // process_vm_readv only where seccomp allows it (Docker's profile: with CAP_SYS_PTRACE only)
    if (!env.processVmReadv)
      console.log(
        'process_vm_readv sink not tried: a seccomp filter without CAP_SYS_PTRACE refuses it here (the pipe path is what runs)',
      )
    for (const sink of (['process_vm_readv', 'pipe', 'file'] as const).filter(
      (k) => k !== 'process_vm_readv' || env.processVmReadv,
    )) {
      const m = Mapping.anonymous(32 * MiB)
      const snap = track(
        takeSnapshot(m, sink === 'file' ? { path: tmpFile('gone.bin') } : { buffer: new ArrayBuffer(m.length) }, {
          maxBytesPerSecond: 64 * MiB,
          copyMethod: sink === 'file' ? undefined : sink,
          events: false,
        }),
      )
      await sleep(40)
      m.unmap()
      const err = await snap.done.catch((e: UffdError) => e)
      expect(err).toBeInstanceOf(UffdError)
      // EFAULT from the copy, or ENOENT from unprotecting pages a writer had made us copy already.
      expect(['EFAULT', 'ENOENT']).toContain((err as UffdError).code)
      expect((err as UffdError).message).toMatch(/no longer mapped/)
    }
  })

  it('MADV_DONTNEED over pages not yet copied fails the snapshot instead of copying zeros', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(16 * MiB))
    m.write(m.length - PAGE_SIZE, Buffer.from('old data'))
    const snap = track(takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: 16 * MiB }))
    const outcome = snap.done.then(
      () => 'resolved',
      (e: UffdError) => {
        throw e
      },
    )
    outcome.catch(() => {})
    await sleep(30)
    expect(await madviseOnThread({ address: m.address + BigInt(m.length - MiB), length: MiB }, 'dontneed')).toBe(0)
    await expect(outcome).rejects.toMatchObject({ code: 'EFAULT', message: expect.stringMatching(/discarded/) })
  })

  it('a worker that exits (or is terminated) mid-snapshot: its teardown stops and joins the threads', {
    timeout: 30_000 * timeScale,
  }, async () => {
    if (!canSnapshot()) return
    const dist = path.join(__dirname, '..', 'dist')
    for (const how of ['exit', 'terminate']) {
      const worker = new Worker(
        `
        const { parentPort } = require('worker_threads')
        const { Mapping, takeSnapshot } = require(${JSON.stringify(dist)})
        const { startStamper } = require(${JSON.stringify(path.join(dist, 'testing'))})
        const m = Mapping.anonymous(64 * 1024 * 1024)
        startStamper(m, { threads: 1 })
        const snap = takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: 16 * 1024 * 1024 })
        snap.done.catch(() => {})
        setTimeout(() => ${JSON.stringify(how)} === 'exit' ? process.exit(0) : parentPort.postMessage('running'), 50)
      `,
        { eval: true },
      )
      if (how === 'terminate') {
        await once(worker, 'message')
        await worker.terminate()
      } else {
        const [code] = await once(worker, 'exit')
        expect(code).toBe(0)
      }
    }
    // This process is fine: a snapshot still works here.
    const m = track(Mapping.anonymous(MiB))
    await track(takeSnapshot(m, { buffer: new ArrayBuffer(m.length) })).done
  })

  it('rejects bad input before touching the memory', { timeout: 10_000 * timeScale }, () => {
    if (!canSnapshot()) return
    const m = track(Mapping.anonymous(MiB))
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(PAGE_SIZE) })).toThrow(RangeError)
    expect(() => takeSnapshot(m, {} as never)).toThrow(TypeError)
    expect(() => takeSnapshot(m, null as never)).toThrow(TypeError)
    expect(() => takeSnapshot(m, { fd: -1 })).toThrow(TypeError)
    expect(() => takeSnapshot(m, { path: '/x', offset: -1 })).toThrow(RangeError)
    expect(() =>
      takeSnapshot({ address: m.address + 1n, length: PAGE_SIZE }, { buffer: new ArrayBuffer(PAGE_SIZE) }),
    ).toThrow(RangeError)
    const plain = { address: m.address, length: m.length }
    expect(() => takeSnapshot(plain, { buffer: new ArrayBuffer(m.length) }, { pageSize: 3000 })).toThrow(RangeError)
    expect(() => takeSnapshot(plain, { buffer: new ArrayBuffer(m.length) }, { pageSize: 2 * MiB })).toThrow(
      /not aligned|multiple/,
    )
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { chunkSize: 0 })).toThrow(RangeError)
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { maxBytesPerSecond: -1 })).toThrow(RangeError)
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { faultAround: -1 })).toThrow(RangeError)
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { onProgress: 3 as never })).toThrow(TypeError)
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { populate: 'yes' as never })).toThrow(
      TypeError,
    )
    expect(() =>
      takeSnapshot(m, { buffer: new ArrayBuffer(m.length) }, { backgroundPriority: 'low' as never }),
    ).toThrow(TypeError)
    // Not memory of this process: EINVAL/ENOMEM from the kernel, as a UffdError.
    expect(() => takeSnapshot({ address: 0x1000n, length: PAGE_SIZE }, { buffer: new ArrayBuffer(PAGE_SIZE) })).toThrow(
      UffdError,
    )
    // A range another userfaultfd already registered: EBUSY.
    const other = Userfaultfd.open()
    cleanup.push(() => other.close())
    other.register(m)
    expect(() => takeSnapshot(m, { buffer: new ArrayBuffer(m.length) })).toThrow(
      expect.objectContaining({ code: 'EBUSY' }),
    )
  })
})
