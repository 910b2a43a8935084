// Dirty tracking, both ways: 'async' (WP_ASYNC + PAGEMAP_SCAN, 6.7+) and 'sync' (WP faults on a
// native thread: the fallback for older kernels, run here too), and the validated pagemapScan().
// Where the kernel lacks what a mode needs, each test asserts the UnsupportedError instead.
import { afterEach, describe, expect, it, vi } from 'vitest'
import { timeScale } from './helpers/children'
import * as fs from 'node:fs'
import {
  DirtyTracker,
  Feature,
  Mapping,
  PAGE_SIZE,
  PageCategory,
  PagemapScanFlag,
  UffdError,
  UnsupportedError,
  Userfaultfd,
  dirtyTrackingSupport,
  hugePageSize,
  pagemapScan,
  pagemapScanSupported,
  type DirtyRange,
  type DirtyTrackerOptions,
  type DirtyTrackingMode,
  type KernelFeature,
} from '../src/index'
import { native } from '../src/addon/native'
import { madviseOnThread, pages, startStamper, touch } from '../src/testing'
import { expectUnsupported, hasFeature, kernelRelease, withFeature } from './helpers/kernel'

const MiB = 1024 * 1024
const support = DirtyTracker.support()
const probe = Userfaultfd.probe()
const freeHuge = (): number =>
  Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)

const cleanup: Array<() => unknown> = []
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f()
  vi.restoreAllMocks()
})
/**
 * A tracker in `mode` over `range`, or undefined where the kernel lacks what that mode needs
 * (then the refusal was asserted: an UnsupportedError naming the missing feature).
 */
function trackerIn(
  mode: DirtyTrackingMode,
  range: Mapping,
  options: DirtyTrackerOptions = {},
): DirtyTracker | undefined {
  const needs: KernelFeature[] = ['PAGEFAULT_FLAG_WP']
  if (range.kind === 'memfd' || range.hugetlb) needs.push('WP_HUGETLBFS_SHMEM')
  if (mode === 'async') needs.push('WP_ASYNC', 'PAGEMAP_SCAN')
  const start = (): DirtyTracker => track(DirtyTracker.start(range, { ...options, mode }))
  if (!withFeature(needs, start)) return undefined
  const tracker = start()
  expect(tracker.mode).toBe(mode)
  return tracker
}

/** Is this (2 MiB-aligned) address backed by a transparent huge page? (/proc/self/smaps) */
function thpAt(address: bigint): boolean {
  const smaps = fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')
  for (let i = 0; i < smaps.length; i++) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(smaps[i])
    if (m === null || address < BigInt(`0x${m[1]}`) || address >= BigInt(`0x${m[2]}`)) continue
    for (let j = i + 1; j < smaps.length && !/^[0-9a-f]+-/.test(smaps[j]); j++) {
      const kb = /^AnonHugePages:\s+(\d+) kB/.exec(smaps[j])
      if (kb !== null) return Number(kb[1]) > 0
    }
  }
  return false
}

function track<T extends Mapping | DirtyTracker>(x: T): T {
  cleanup.push(() => (x instanceof Mapping ? x.unmap() : x.stop()))
  return x
}

/** Page indexes (of `unit` bytes) covered by dirty ranges. */
function pageSet(ranges: DirtyRange[], unit = PAGE_SIZE): Set<number> {
  const out = new Set<number>()
  for (const r of ranges) for (let o = r.offset; o < r.offset + r.length; o += unit) out.add(o / unit)
  return out
}

function randomPages(n: number, count: number, seed: number): number[] {
  const set = new Set<number>()
  if (count > n) throw new RangeError('more pages than exist')
  let x = seed >>> 0
  while (set.size < count) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    set.add(x % n)
  }
  return [...set]
}

describe('dirtyTrackingSupport: the decision, for kernels other than this one', () => {
  const all = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP
  it("'async' with WP_ASYNC and PAGEMAP_SCAN (6.7+)", () => {
    expect(dirtyTrackingSupport({ features: all, pagemapScan: true })).toEqual({ supported: true, mode: 'async' })
    expect(
      dirtyTrackingSupport({
        features: Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP,
        pagemapScan: true,
        memory: 'anonymous',
      }),
    ).toEqual({ supported: true, mode: 'async' })
  })
  it("6.1 on x86_64 (write protection, no WP_ASYNC, no PAGEMAP_SCAN): 'sync', saying why", () => {
    const r = dirtyTrackingSupport({
      features: Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP,
      pagemapScan: false,
      kernel: '6.1.0-57-amd64',
    })
    expect(r.supported).toBe(true)
    expect(r.mode).toBe('sync')
    expect(r.reason).toMatch(/^synchronous write protection: .*6\.1\.0-57-amd64.*WP_ASYNC.*PAGEMAP_SCAN/)
  })
  it('6.1 on arm64 (no write protection at all): unsupported, naming PAGEFAULT_FLAG_WP', () => {
    const r = dirtyTrackingSupport({ features: 0xffen, pagemapScan: false, kernel: '6.1.0-57-arm64' })
    expect(r.supported).toBe(false)
    expect(r.mode).toBeUndefined()
    expect(r.reason).toMatch(/PAGEFAULT_FLAG_WP .*6\.1\.0-57-arm64/)
  })
  it("one of WP_ASYNC and PAGEMAP_SCAN missing: 'sync', naming the missing one", () => {
    expect(dirtyTrackingSupport({ features: all, pagemapScan: false })).toMatchObject({ mode: 'sync' })
    expect(dirtyTrackingSupport({ features: all, pagemapScan: false }).reason).toMatch(/PAGEMAP_SCAN/)
    expect(dirtyTrackingSupport({ features: all, pagemapScan: false }).reason).not.toMatch(/WP_ASYNC/)
    expect(dirtyTrackingSupport({ features: all & ~Feature.WP_ASYNC, pagemapScan: true }).reason).toMatch(
      /lacks UFFD_FEATURE_WP_ASYNC/,
    )
  })
  it('shmem and hugetlb also need WP_HUGETLBFS_SHMEM, in either mode', () => {
    const f = Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP
    expect(dirtyTrackingSupport({ features: f, pagemapScan: true, memory: 'shmem' }).reason).toMatch(
      /WP_HUGETLBFS_SHMEM for shmem/,
    )
    expect(dirtyTrackingSupport({ features: f, pagemapScan: false, memory: 'hugetlb' })).toMatchObject({
      supported: false,
      reason: expect.stringMatching(/hugetlb/),
    })
    expect(
      dirtyTrackingSupport({ features: f | Feature.WP_HUGETLBFS_SHMEM, pagemapScan: true, memory: 'hugetlb' }),
    ).toEqual({ supported: true, mode: 'async' })
  })
  it('no userfaultfd for this process at all', () => {
    const r = dirtyTrackingSupport({
      features: all,
      pagemapScan: true,
      userfaultfd: false,
      userfaultfdReason: 'EPERM: give access to /dev/userfaultfd',
    })
    expect(r).toEqual({ supported: false, reason: expect.stringMatching(/not available.*\/dev\/userfaultfd/) })
  })
  it("a probe without WP_ASYNC: 'auto' takes 'sync'; { mode: 'async' } is an UnsupportedError naming WP_ASYNC", () => {
    if (!hasFeature('PAGEFAULT_FLAG_WP')) {
      // No write protection here at all (arm64 before 6.10): the refusal names that instead.
      expectUnsupported(() => DirtyTracker.start(track(Mapping.anonymous(MiB))), 'PAGEFAULT_FLAG_WP')
      return
    }
    vi.spyOn(Userfaultfd, 'probe').mockReturnValue({ ...probe, features: probe.features & ~Feature.WP_ASYNC })
    const m = track(Mapping.anonymous(MiB))
    expect(track(DirtyTracker.start(m)).mode).toBe('sync')
    let err: unknown
    try {
      DirtyTracker.start(track(Mapping.anonymous(MiB)), { mode: 'async' })
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(UnsupportedError)
    expect(err).toMatchObject({ code: 'ENOTSUP', name: 'UnsupportedError', feature: 'WP_ASYNC' })
    expect((err as Error).message).toContain("mode: 'async'")
    expect((err as Error).message).toContain(`WP_ASYNC (Linux ${kernelRelease('WP_ASYNC')}+)`) // 6.10 on arm64
  })
  it('this machine: the probe and the decision agree', () => {
    const wp = (probe.features & Feature.PAGEFAULT_FLAG_WP) !== 0n
    const wpAsync = (probe.features & Feature.WP_ASYNC) !== 0n
    expect(support.supported).toBe(probe.supported && wp)
    expect(support.mode).toBe(!wp ? undefined : wpAsync && pagemapScanSupported() ? 'async' : 'sync')
  })
  it('bad options: TypeError/RangeError before anything is registered', () => {
    const m = track(Mapping.anonymous(MiB))
    expect(() => DirtyTracker.start(m, { mode: 'fast' as never })).toThrow(/mode must be 'auto' or 'async' or 'sync'/)
    expect(() => DirtyTracker.start(m, { memory: 'file' as never })).toThrow(TypeError)
    expect(() => DirtyTracker.start(m, { batch: 0 })).toThrow(RangeError)
    expect(() => DirtyTracker.start({ address: m.address, length: PAGE_SIZE }, { pageSize: 3000 })).toThrow(RangeError)
    expect(() => DirtyTracker.start({ address: m.address + 1n, length: PAGE_SIZE })).toThrow(RangeError)
    expect(() => DirtyTracker.start(m, null as never)).toThrow(TypeError)
  })
})

for (const mode of ['async', 'sync'] as const)
  describe(`DirtyTracker, mode '${mode}'`, () => {
    it('reports exactly the pages written since the last collect(), round after round', {
      timeout: 30_000 * timeScale,
    }, async () => {
      const m = track(Mapping.anonymous(64 * MiB))
      const n = m.length / PAGE_SIZE
      // Half the memory populated before tracking starts, half never touched (WP_UNPOPULATED).
      await touch(pages({ address: m.address, length: m.length / 2 }), { write: true, threads: 2 })
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      expect(tracker.collect()).toEqual([])
      for (let round = 0; round < 6; round++) {
        const written = randomPages(n, 500 + round * 300, round + 1)
        await touch(
          BigUint64Array.from(written, (p) => m.address + BigInt(p * PAGE_SIZE + 8 * round)),
          { write: true, threads: 2 },
        )
        const dirty = tracker.collect()
        expect([...pageSet(dirty)].sort((a, b) => a - b)).toEqual([...written].sort((a, b) => a - b))
        for (const r of dirty) expect(r.huge).toBe(false)
        for (let i = 1; i < dirty.length; i++)
          expect(dirty[i].address).toBeGreaterThan(dirty[i - 1].address + BigInt(dirty[i - 1].length))
        expect(tracker.collect()).toEqual([])
      }
    })

    it('adjacent pages merge into one range; peek() does not reset', { timeout: 10_000 * timeScale }, async () => {
      const m = track(Mapping.anonymous(4 * MiB))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      await touch(pages({ address: m.address + BigInt(5 * PAGE_SIZE), length: 10 * PAGE_SIZE }), { write: true })
      await touch([m.address + BigInt(100 * PAGE_SIZE)], { write: true })
      const expected = [
        { address: m.address + BigInt(5 * PAGE_SIZE), offset: 5 * PAGE_SIZE, length: 10 * PAGE_SIZE, huge: false },
        { address: m.address + BigInt(100 * PAGE_SIZE), offset: 100 * PAGE_SIZE, length: PAGE_SIZE, huge: false },
      ]
      expect(tracker.peek()).toEqual(expected)
      expect(tracker.peek()).toEqual(expected)
      expect(tracker.collect()).toEqual(expected)
      expect(tracker.peek()).toEqual([])
    })

    it('reads are not writes; the JS thread may write (async: it never blocks; sync: the native thread serves it)', {
      timeout: 10_000 * timeScale,
    }, async () => {
      const m = track(Mapping.anonymous(MiB))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      await touch(pages(m), { threads: 2 })
      expect(tracker.collect()).toEqual([])
      m.write(3 * PAGE_SIZE + 17, Buffer.from('x'))
      new Uint8Array(m.buffer)[7 * PAGE_SIZE] = 1
      expect(pageSet(tracker.collect())).toEqual(new Set([3, 7]))
    })

    it('no write is missed while writers run during collect(); no page is reported without a write', {
      timeout: 30_000 * timeScale,
    }, async () => {
      const m = track(Mapping.anonymous(64 * MiB))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      const threads = 2
      const stamper = startStamper(m, { threads, shuffle: true, seed: 3 })
      cleanup.push(() => stamper.stop())
      const orders = Array.from({ length: threads }, (_, t) => stamper.order(t))
      // Slots of thread t written by its writes (lo, hi].
      const slotsOf = (t: number, lo: number, hi: number): number[] => {
        const n = orders[t].length
        const out: number[] = []
        for (let k = Math.max(lo + 1, hi - n + 1); k <= hi; k++) out.push(orders[t][(k - 1) % n])
        return out
      }
      let prevBefore: Float64Array = new Float64Array(threads)
      let prevAfter: Float64Array = new Float64Array(threads)
      let prevDirty = new Set<number>()
      let rounds = 0
      const deadline = Date.now() + 400
      while (Date.now() < deadline || rounds < 5) {
        const before = stamper.counts()
        const dirty = pageSet(tracker.collect())
        const after = stamper.counts()
        for (let t = 0; t < threads; t++) {
          // Writes that began after the previous collect() returned and ended before this one began.
          for (const slot of slotsOf(t, prevAfter[t] + 1, before[t])) {
            if (!dirty.has(slot))
              throw new Error(`round ${rounds}: thread ${t} wrote slot ${slot} between collects; not reported`)
          }
          // Writes done while the previous collect() ran: reported by it or by this one.
          if (rounds > 0)
            for (const slot of slotsOf(t, prevBefore[t], prevAfter[t])) {
              if (!dirty.has(slot) && !prevDirty.has(slot))
                throw new Error(
                  `round ${rounds}: thread ${t} wrote slot ${slot} during the previous collect; never reported`,
                )
            }
        }
        // Every reported page had a write after the previous collect() began.
        const possible = new Set<number>()
        for (let t = 0; t < threads; t++)
          for (const slot of slotsOf(t, Math.max(0, prevBefore[t] - 1), after[t] + 1)) possible.add(slot)
        for (const slot of dirty)
          if (!possible.has(slot)) throw new Error(`round ${rounds}: slot ${slot} reported but not written`)
        prevBefore = before
        prevAfter = after
        prevDirty = dirty
        rounds++
        await new Promise((r) => setTimeout(r, 2))
      }
      await stamper.stop()
      expect(rounds).toBeGreaterThanOrEqual(5)
    })

    it('pages dropped with MADV_DONTNEED change (to zeros): reported as written, as a later write is', {
      timeout: 10_000 * timeScale,
    }, async () => {
      const m = track(Mapping.anonymous(MiB))
      await touch(pages(m), { write: true, threads: 2 })
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      await madviseOnThread(m.range(0, 8 * PAGE_SIZE), 'dontneed')
      await touch([m.address + BigInt(2 * PAGE_SIZE)], { write: true, value: 5n })
      expect((await touch([m.address + BigInt(3 * PAGE_SIZE)])).values[0]).toBe(0n)
      expect(pageSet(tracker.collect())).toEqual(new Set([0, 1, 2, 3, 4, 5, 6, 7]))
      // Reads of dropped pages after that are not writes; writes are.
      await touch([m.address + BigInt(4 * PAGE_SIZE)])
      await touch([m.address + BigInt(3 * PAGE_SIZE)], { write: true })
      expect(pageSet(tracker.collect())).toEqual(new Set([3]))
      expect(new BigUint64Array(m.buffer, 2 * PAGE_SIZE, 1)[0]).toBe(5n)
    })

    it('shmem (memfd): exact pages', { timeout: 10_000 * timeScale }, async () => {
      const m = track(Mapping.memfd(16 * MiB))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      const written = randomPages(m.length / PAGE_SIZE, 300, 9)
      await touch(
        BigUint64Array.from(written, (p) => m.address + BigInt(p * PAGE_SIZE)),
        { write: true, threads: 2 },
      )
      expect(pageSet(tracker.collect())).toEqual(new Set(written))
      expect(tracker.collect()).toEqual([])
    })

    it('hugetlb: reported at huge-page granularity (the documented false positives)', {
      timeout: 10_000 * timeScale,
    }, async () => {
      if (freeHuge() < 4) return console.log('skipped: needs 4 free huge pages (echo 64 > /proc/sys/vm/nr_hugepages)')
      const huge = hugePageSize()
      const m = track(Mapping.anonymous(4 * huge, { hugetlb: true }))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      await touch([m.address + BigInt(huge + 5 * PAGE_SIZE)], { write: true })
      expect(tracker.collect()).toEqual([{ address: m.address + BigInt(huge), offset: huge, length: huge, huge: true }])
      expect(tracker.collect()).toEqual([])
    })

    it('transparent huge pages: the first write splits the THP, so pages stay exact', {
      timeout: 10_000 * timeScale,
    }, async () => {
      const m = track(Mapping.anonymous(8 * MiB))
      m.madvise('hugepage')
      const H = 2n * BigInt(MiB)
      const aligned = ((m.address + H - 1n) / H) * H
      await touch(pages({ address: aligned, length: 2 * MiB }), { write: true })
      if (!thpAt(aligned)) return console.log('skipped: no THP was allocated (transparent_hugepage disabled?)')
      if (hasFeature('PAGEMAP_SCAN')) {
        const before = pagemapScan({ address: aligned, length: 2 * MiB }, { returnMask: PageCategory.HUGE })
        expect(before.regions[0]?.categories).toBe(PageCategory.HUGE)
      }
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      await touch([aligned + BigInt(5 * PAGE_SIZE)], { write: true })
      expect(tracker.collect()).toEqual([
        {
          address: aligned + BigInt(5 * PAGE_SIZE),
          offset: Number(aligned - m.address) + 5 * PAGE_SIZE,
          length: PAGE_SIZE,
          huge: false,
        },
      ])
    })

    it('a range another userfaultfd holds: EBUSY; stop() is idempotent and ends collect()', {
      timeout: 10_000 * timeScale,
    }, () => {
      const m = track(Mapping.anonymous(MiB))
      const tracker = trackerIn(mode, m)
      if (tracker === undefined) return
      expect(() => DirtyTracker.start(m, { mode })).toThrow(expect.objectContaining({ code: 'EBUSY' }))
      tracker.stop()
      tracker.stop()
      expect(tracker.active).toBe(false)
      expect(() => tracker.collect()).toThrow(/stopped/)
      // Once stopped, the range can be tracked again.
      track(DirtyTracker.start(m, { mode })).stop()
    })
  })

// Before 6.7 each test asserts the refusal: pagemapScan() is an UnsupportedError naming PAGEMAP_SCAN.
const hasScan = (m: Mapping): boolean => withFeature('PAGEMAP_SCAN', () => pagemapScan(m))

describe('pagemapScan', () => {
  it('reports categories; maxPages stops the walk early and walkEnd says where', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const m = track(Mapping.anonymous(MiB))
    if (!hasScan(m)) return
    await touch(pages({ address: m.address, length: 16 * PAGE_SIZE }), { write: true })
    const present = pagemapScan(m, { categoryMask: PageCategory.PRESENT, returnMask: PageCategory.PRESENT })
    expect(present).toEqual({
      regions: [{ address: m.address, length: 16 * PAGE_SIZE, categories: PageCategory.PRESENT }],
      walkEnd: m.address + BigInt(m.length),
    })
    const limited = pagemapScan(m, {
      categoryMask: PageCategory.PRESENT,
      returnMask: PageCategory.PRESENT,
      maxPages: 4,
    })
    expect(limited.regions).toEqual([{ address: m.address, length: 4 * PAGE_SIZE, categories: PageCategory.PRESENT }])
    expect(limited.walkEnd).toBe(m.address + BigInt(4 * PAGE_SIZE))
    const inverted = pagemapScan(m, {
      categoryInverted: PageCategory.PRESENT,
      categoryMask: PageCategory.PRESENT,
      returnMask: PageCategory.PRESENT,
    })
    expect(inverted.regions).toEqual([
      { address: m.address + BigInt(16 * PAGE_SIZE), length: m.length - 16 * PAGE_SIZE, categories: 0 },
    ])
    // One region of output: the walk ends after the first region (the caller resumes at walkEnd).
    await touch([m.address + BigInt(32 * PAGE_SIZE)], { write: true })
    const one = pagemapScan(m, { categoryMask: PageCategory.PRESENT, returnMask: PageCategory.PRESENT, maxRegions: 1 })
    expect(one.regions.length).toBe(1)
    expect(one.walkEnd).toBeLessThan(m.address + BigInt(m.length))
  })

  it('validates input before the call (on every kernel): RangeError/TypeError naming the mistake', () => {
    const m = track(Mapping.anonymous(MiB))
    expect(() => pagemapScan({ address: m.address + 8n, length: PAGE_SIZE })).toThrow(/not aligned/)
    expect(() => pagemapScan(m, { flags: 1 << 5 })).toThrow(RangeError)
    expect(() => pagemapScan(m, { flags: 1 << 5 })).toThrow(/flags has unknown bits 0x20/)
    expect(() => pagemapScan(m, { categoryMask: 1 << 12 })).toThrow(/categoryMask has unknown bits/)
    expect(() => pagemapScan(m, { categoryInverted: 1 << 9 })).toThrow(/categoryInverted/)
    expect(() => pagemapScan(m, { categoryAnyofMask: -1 })).toThrow(TypeError)
    expect(() => pagemapScan(m, { returnMask: 1 << 20 })).toThrow(/returnMask/)
    expect(() => pagemapScan(m, { returnMask: 0 })).toThrow(/at least one category/)
    expect(() => pagemapScan(m, { maxRegions: 0 })).toThrow(RangeError)
    expect(() => pagemapScan(m, { maxPages: -1 })).toThrow(RangeError)
    expect(() => pagemapScan(m, { pid: 1.5 })).toThrow(RangeError)
    expect(() => pagemapScan(m, { flags: '1' as never })).toThrow(TypeError)
    expect(() => pagemapScan({ address: m.address, length: 0 })).toThrow(RangeError)
    expect(() => pagemapScan(null as never)).toThrow(TypeError)
  })

  it("the kernel's own validation errors arrive as UffdError (calling the addon unchecked)", () => {
    const m = track(Mapping.anonymous(MiB))
    if (!hasScan(m)) return
    const a = m.address
    const e = a + BigInt(m.length)
    const call = (start: bigint, end: bigint, flags: number, mask: number, ret: number): unknown => {
      try {
        native.pagemapScan(0, start, end, flags, 0, mask, 0, ret, 0, 16)
      } catch (err) {
        return err
      }
      return undefined
    }
    const einval = { code: 'EINVAL', errno: 22, syscall: 'ioctl(PAGEMAP_SCAN)' }
    expect(call(a, e, 1 << 5, 0, 0xff)).toMatchObject(einval) // unknown flag
    expect(call(a, e, 0, 1 << 12, 0xff)).toMatchObject(einval) // unknown category
    expect(call(a, e, 0, 0, 1 << 12)).toMatchObject(einval) // unknown return category
    expect(call(a + 8n, e, 0, 0, 0xff)).toMatchObject(einval) // unaligned start
    expect(call(e, a, 0, 0, 0xff)).toMatchObject({ code: 'EFAULT' }) // end before start
    expect(call(a, e, 0, 0, 0xff)).toBeUndefined()
    expect(call(a, e, 0, 0, 0xff)).not.toBeInstanceOf(UffdError)
    expect(call(a + 8n, e, 0, 0, 0xff)).toBeInstanceOf(UffdError)
  })

  it('CHECK_WPASYNC on memory without async write-protection: EPERM', () => {
    const m = track(Mapping.anonymous(MiB))
    if (!hasScan(m)) return
    const run = (): unknown =>
      pagemapScan(m, {
        flags: PagemapScanFlag.WP_MATCHING | PagemapScanFlag.CHECK_WPASYNC,
        categoryMask: PageCategory.WRITTEN,
      })
    expect(run).toThrow(UffdError)
    expect(run).toThrow(expect.objectContaining({ code: 'EPERM', syscall: 'ioctl(PAGEMAP_SCAN)' }))
  })
})
