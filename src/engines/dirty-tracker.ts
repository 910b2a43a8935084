// Dirty-page tracking: which pages of a range were written since the last time we asked.
// Two ways, the best the kernel offers ('auto'), and `tracker.mode` says which ran:
//   - 'async' (Linux 6.7+): a dedicated userfaultfd with WP_ASYNC write-protects the range;
//     writes then resolve in the kernel without any message (nobody blocks, not even the JS
//     thread), leaving the page marked "written". PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports
//     the written pages and protects them again in the same page-table walk, so a write racing
//     with collect() is either reported now or by the next collect(), never lost.
//   - 'sync' (any kernel with userfaultfd write protection: 5.7+, shmem/hugetlb 5.19+): plain
//     WP faults, handled on a native thread that marks the page dirty and unprotects it; the
//     first write to each page after a collect() waits for that thread (tens of microseconds).
//     Same guarantee: marking and unprotecting happen under the lock collect() takes to swap
//     the dirty set and protect its pages again (native/engine/wp_dirty_tracker.h).
import type { WpDirtyTracker } from '../addon/binding'
import { native } from '../addon/native'
import { Userfaultfd } from '../core/userfaultfd'
import { Feature, PAGE_SIZE } from '../core/constants'
import { UnsupportedError } from '../core/errors'
import { kernelRelease, unsupported } from '../core/kernel-features'
import { Mapping, type MemoryKind, hugePageSize, memoryKindOf } from '../core/mapping'
import { PageCategory, PagemapScanFlag, pagemapScan, pagemapScanSupported } from './pagemap-scan'
import { checkAligned, toRange, type Range, type RangeLike } from '../core/range'
import { choice, describe, optionalInt } from '../util/validate'

export type { MemoryKind } from '../core/mapping'
/** 'async': WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+); 'sync': WP faults on a native thread. */
export type DirtyTrackingMode = 'async' | 'sync'

/** A run of pages written since the previous collect(). */
export interface DirtyRange {
  /** Start address. */
  address: bigint
  /** bytes from the tracked range's start */
  offset: number
  /** Length in bytes. */
  length: number
  /** reported at huge-page granularity (hugetlb or a THP): it may include unwritten 4 KiB pages */
  huge: boolean
}

/** Whether dirty tracking works here (DirtyTracker.support()). */
export interface DirtyTrackingSupport {
  /** It works. */
  supported: boolean
  /** the mode 'auto' picks (when supported) */
  mode?: DirtyTrackingMode
  /** why not (unsupported), or why 'sync' rather than 'async' */
  reason?: string
}

/** The facts dirtyTrackingSupport() decides from. */
export interface DirtyTrackingInputs {
  /** features the kernel offers (Userfaultfd.probe().features) */
  features: bigint
  /** does the PAGEMAP_SCAN ioctl exist (pagemapScanSupported()) */
  pagemapScan: boolean
  /** may this process open a userfaultfd at all (Userfaultfd.probe().supported) */
  userfaultfd?: boolean
  /** why it may not (Userfaultfd.probe().reason) */
  userfaultfdReason?: string
  /** uname -r, for the messages */
  kernel?: string
  /** The memory to track (default 'anonymous'). */
  memory?: MemoryKind
}

/** The decision, from facts alone (so that it can be tested for kernels we do not run on). */
export function dirtyTrackingSupport(inputs: DirtyTrackingInputs): DirtyTrackingSupport {
  const kernel = inputs.kernel === undefined ? 'this kernel' : `this kernel (${inputs.kernel})`
  if (inputs.userfaultfd === false) {
    return {
      supported: false,
      reason: `userfaultfd is not available to this process: ${inputs.userfaultfdReason ?? 'see Userfaultfd.probe()'}`,
    }
  }
  const memory = inputs.memory ?? 'anonymous'
  const base: string[] = []
  if ((inputs.features & Feature.PAGEFAULT_FLAG_WP) === 0n)
    base.push(`UFFD_FEATURE_PAGEFAULT_FLAG_WP (Linux ${kernelRelease('PAGEFAULT_FLAG_WP')}+)`)
  if (memory !== 'anonymous' && (inputs.features & Feature.WP_HUGETLBFS_SHMEM) === 0n)
    base.push(`UFFD_FEATURE_WP_HUGETLBFS_SHMEM for ${memory} memory (Linux ${kernelRelease('WP_HUGETLBFS_SHMEM')}+)`)
  if (base.length > 0)
    return { supported: false, reason: `dirty tracking needs ${base.join(' and ')}, which ${kernel} lacks` }
  const missing: string[] = []
  if ((inputs.features & Feature.WP_ASYNC) === 0n)
    missing.push(`UFFD_FEATURE_WP_ASYNC (Linux ${kernelRelease('WP_ASYNC')}+)`)
  if (!inputs.pagemapScan)
    missing.push(`the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux ${kernelRelease('PAGEMAP_SCAN')}+)`)
  if (missing.length === 0) return { supported: true, mode: 'async' }
  return {
    supported: true,
    mode: 'sync',
    reason: `synchronous write protection: ${kernel} lacks ${missing.join(' and ')}, which asynchronous tracking needs`,
  }
}

/** Options of DirtyTracker.start(). */
export interface DirtyTrackerOptions {
  /** what backs a plain { address, length } range (a Mapping says so itself); default 'anonymous' */
  memory?: MemoryKind
  /** 'auto' (default): 'async' where the kernel has WP_ASYNC and PAGEMAP_SCAN, else 'sync' */
  mode?: 'auto' | DirtyTrackingMode
  /** page size of a plain { address, length } range over hugetlb memory (a Mapping knows its own) */
  pageSize?: number
  /** regions fetched per PAGEMAP_SCAN call in 'async' mode (default 4096; the walk resumes where a full call stopped) */
  batch?: number
}

/**
 * Which pages of a range were written since the previous collect(): WP_ASYNC write protection
 * (writes never block) read back with PAGEMAP_SCAN, Linux 6.7+.
 */
export class DirtyTracker {
  /** The tracked range. */
  readonly range: Range
  /** What backs the range. */
  readonly memory: MemoryKind
  /** Which way writes are tracked: see DirtyTrackingMode. */
  readonly mode: DirtyTrackingMode
  #uffd: Userfaultfd | undefined
  #sync: WpDirtyTracker | undefined
  #batch: number

  private constructor(
    uffd: Userfaultfd,
    range: Range,
    memory: MemoryKind,
    mode: DirtyTrackingMode,
    batch: number,
    sync?: WpDirtyTracker,
  ) {
    this.#uffd = uffd
    this.range = range
    this.memory = memory
    this.mode = mode
    this.#batch = batch
    this.#sync = sync
  }

  /** Can this kernel and process track dirty pages of `memory`, and which way? Never throws. */
  static support(memory: MemoryKind = 'anonymous'): DirtyTrackingSupport {
    const p = Userfaultfd.probe()
    return dirtyTrackingSupport({
      features: p.features,
      pagemapScan: pagemapScanSupported(),
      userfaultfd: p.supported,
      userfaultfdReason: p.reason,
      kernel: p.kernel,
      memory,
    })
  }

  /**
   * Starts tracking writes to `range` (a Mapping, or { address, length } of memory in this
   * process). Throws UnsupportedError where the kernel lacks userfaultfd write protection (or
   * WP_ASYNC/PAGEMAP_SCAN, when { mode: 'async' } is asked for). The range is registered with a
   * userfaultfd of the tracker's own (EBUSY if another userfaultfd already registered it).
   */
  static start(range: Mapping | RangeLike, options: DirtyTrackerOptions = {}): DirtyTracker {
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    const r = toRange(range)
    const memory = choice(options.memory, 'memory', ['anonymous', 'shmem', 'hugetlb'] as const, memoryKindOf(range))
    const want = choice(options.mode, 'mode', ['auto', 'async', 'sync'] as const, 'auto')
    const batch = optionalInt(options.batch, 'batch', 4096, 1)
    const pageSize =
      range instanceof Mapping
        ? range.pageSize
        : (options.pageSize ?? (memory === 'hugetlb' ? hugePageSize() : PAGE_SIZE))
    if (!Number.isSafeInteger(pageSize) || pageSize < PAGE_SIZE || (pageSize & (pageSize - 1)) !== 0)
      throw new RangeError(`pageSize must be a power of two >= ${PAGE_SIZE} (got ${describe(pageSize)})`)
    checkAligned(r.address, r.length, 'DirtyTracker.start', pageSize)
    const support = DirtyTracker.support(memory)
    if (!support.supported) {
      const p = Userfaultfd.probe()
      if (!p.supported) throw new UnsupportedError(support.reason!, { syscall: 'DirtyTracker.start' })
      throw unsupported(
        (p.features & Feature.PAGEFAULT_FLAG_WP) === 0n ? 'PAGEFAULT_FLAG_WP' : 'WP_HUGETLBFS_SHMEM',
        `DirtyTracker.start() on ${memory} memory`,
      )
    }
    if (want === 'async' && support.mode === 'sync') {
      const p = Userfaultfd.probe()
      throw unsupported(
        (p.features & Feature.WP_ASYNC) === 0n ? 'WP_ASYNC' : 'PAGEMAP_SCAN',
        "DirtyTracker.start({ mode: 'async' })",
      )
    }
    const mode: DirtyTrackingMode = want === 'auto' ? support.mode! : want
    return mode === 'async' ? DirtyTracker.#startAsync(r, memory, batch) : DirtyTracker.#startSync(r, memory, pageSize)
  }

  static #startAsync(r: Range, memory: MemoryKind, batch: number): DirtyTracker {
    const offered = Userfaultfd.probe().features
    let features = Feature.WP_ASYNC | Feature.WP_UNPOPULATED
    if (memory !== 'anonymous') features |= Feature.WP_HUGETLBFS_SHMEM
    if ((offered & Feature.PAGEFAULT_FLAG_WP) !== 0n) features |= Feature.PAGEFAULT_FLAG_WP
    const uffd = Userfaultfd.open({ features })
    try {
      uffd.register(r, { wp: true })
      // Tracking starts here: every page protected (unpopulated ones too: WP_UNPOPULATED).
      uffd.writeProtect(r)
    } catch (err) {
      uffd.close()
      throw err
    }
    return new DirtyTracker(uffd, r, memory, 'async', batch)
  }

  // Without WP_UNPOPULATED (before 6.4) an empty anonymous page cannot be write-protected, and
  // MADV_DONTNEED empties pages at any time: anonymous ranges are registered MISSING too, and
  // the native thread maps such pages itself (write-protected). The same on every kernel, so
  // that the path 6.1 takes is the one tested everywhere. shmem and hugetlb keep the protection
  // of an empty page in the page table (PTE markers, 5.19+).
  // EVENT_REMOVE: pages dropped by MADV_DONTNEED/MADV_REMOVE change (to zeros) without a write;
  // they are reported as written, as PAGEMAP_SCAN does in 'async' mode.
  static #startSync(r: Range, memory: MemoryKind, pageSize: number): DirtyTracker {
    let features = Feature.PAGEFAULT_FLAG_WP | Feature.EVENT_REMOVE
    if (memory !== 'anonymous') features |= Feature.WP_HUGETLBFS_SHMEM
    const missing = memory === 'anonymous'
    const uffd = Userfaultfd.open({ features })
    let engine: WpDirtyTracker
    try {
      uffd.register(r, { wp: true, missing })
      engine = new native.WpDirtyTracker(uffd.fd, r.address, r.length, pageSize, missing)
    } catch (err) {
      uffd.close()
      throw err
    }
    return new DirtyTracker(uffd, r, memory, 'sync', 0, engine)
  }

  /** False after stop(). */
  get active(): boolean {
    return this.#uffd !== undefined
  }

  /**
   * The ranges written since start() or the previous collect(), in address order, adjacent
   * pages merged; they are write-protected again (atomically with respect to writers), so the
   * next collect() reports exactly the writes made after this one saw the page.
   */
  collect(): DirtyRange[] {
    return this.#scan(true)
  }

  /** Like collect() but leaves the pages marked written (the next collect() reports them again). */
  peek(): DirtyRange[] {
    return this.#scan(false)
  }

  /** Stops tracking: unregisters the range and closes the tracker's userfaultfd. Idempotent. */
  stop(): void {
    const uffd = this.#uffd
    if (uffd === undefined) return
    this.#uffd = undefined
    // The native thread first (joined), then the fd: closing it wakes any writer still waiting.
    this.#sync?.stop()
    this.#sync = undefined
    uffd.close()
  }

  /** stop(), for `using tracker = DirtyTracker.start(m)`. */
  [Symbol.dispose](): void {
    this.stop()
  }

  #scan(reprotect: boolean): DirtyRange[] {
    if (this.#uffd === undefined) throw new TypeError('the dirty tracker was stopped')
    if (this.#sync !== undefined) return this.#scanSync(reprotect)
    const start = this.range.address
    const end = start + BigInt(this.range.length)
    const out: DirtyRange[] = []
    let cursor = start
    while (cursor < end) {
      const { regions, walkEnd } = pagemapScan(
        { address: cursor, length: end - cursor },
        {
          flags: reprotect
            ? PagemapScanFlag.WP_MATCHING | PagemapScanFlag.CHECK_WPASYNC
            : PagemapScanFlag.CHECK_WPASYNC,
          categoryMask: PageCategory.WRITTEN,
          returnMask: PageCategory.WRITTEN | PageCategory.HUGE,
          maxRegions: this.#batch,
        },
      )
      for (const region of regions) {
        const huge = (region.categories & PageCategory.HUGE) !== 0
        const last = out[out.length - 1]
        if (last !== undefined && last.address + BigInt(last.length) === region.address && last.huge === huge) {
          last.length += region.length
        } else {
          out.push({ address: region.address, offset: Number(region.address - start), length: region.length, huge })
        }
      }
      if (walkEnd <= cursor) throw new Error(`PAGEMAP_SCAN made no progress at 0x${cursor.toString(16)}`)
      cursor = walkEnd
    }
    return out
  }

  #scanSync(reprotect: boolean): DirtyRange[] {
    const runs = this.#sync!.collect(reprotect)
    const start = this.range.address
    const huge = this.memory === 'hugetlb'
    const out: DirtyRange[] = []
    for (let i = 0; i < runs.length; i += 2) {
      out.push({ address: runs[i], offset: Number(runs[i] - start), length: Number(runs[i + 1] - runs[i]), huge })
    }
    return out
  }
}
