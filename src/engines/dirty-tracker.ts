// Dirty-page tracking: which pages of a range were written since the last time we asked.
// A dedicated userfaultfd with WP_ASYNC write-protects the range; writes then resolve in the
// kernel without any message (nobody blocks, not even the JS thread), leaving the page marked
// "written". PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports the written pages and protects them
// again in the same page-table walk, so a write racing with collect() is either reported now
// or by the next collect(), never lost.
import { Userfaultfd } from '../core/userfaultfd'
import { Feature } from '../core/constants'
import { UnsupportedError } from '../core/errors'
import { Mapping } from '../core/mapping'
import { PageCategory, PagemapScanFlag, pagemapScan, pagemapScanSupported } from './pagemap-scan'
import { describe, toRange, type Range, type RangeLike } from '../core/range'

/** What backs a range: private anonymous memory, shmem (memfd), or hugetlb. */
export type MemoryKind = 'anonymous' | 'shmem' | 'hugetlb'

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
  /** why not, and what would make it work */
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
  const missing: string[] = []
  if ((inputs.features & Feature.WP_ASYNC) === 0n) missing.push('UFFD_FEATURE_WP_ASYNC (Linux 6.7+)')
  if (!inputs.pagemapScan) missing.push('the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7+)')
  const memory = inputs.memory ?? 'anonymous'
  if (memory !== 'anonymous' && (inputs.features & Feature.WP_HUGETLBFS_SHMEM) === 0n) {
    missing.push(`UFFD_FEATURE_WP_HUGETLBFS_SHMEM for ${memory} memory (Linux 5.19+)`)
  }
  if (missing.length === 0) return { supported: true }
  return { supported: false, reason: `dirty tracking needs ${missing.join(' and ')}, which ${kernel} lacks` }
}

function memoryOf(range: unknown): MemoryKind {
  if (range instanceof Mapping) return range.hugetlb ? 'hugetlb' : range.kind === 'memfd' ? 'shmem' : 'anonymous'
  return 'anonymous'
}

/** Options of DirtyTracker.start(). */
export interface DirtyTrackerOptions {
  /** what backs a plain { address, length } range (a Mapping says so itself); default 'anonymous' */
  memory?: MemoryKind
  /** regions fetched per PAGEMAP_SCAN call (default 4096; the walk resumes where a full call stopped) */
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
  #uffd: Userfaultfd | undefined
  #batch: number

  private constructor(uffd: Userfaultfd, range: Range, memory: MemoryKind, batch: number) {
    this.#uffd = uffd
    this.range = range
    this.memory = memory
    this.#batch = batch
  }

  /** Can this kernel and process track dirty pages of `memory`? Never throws. */
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
   * process). Throws UnsupportedError where the kernel lacks WP_ASYNC or PAGEMAP_SCAN.
   * The range is registered with a userfaultfd of the tracker's own (EBUSY if another
   * userfaultfd already registered it).
   */
  static start(range: Mapping | RangeLike, options: DirtyTrackerOptions = {}): DirtyTracker {
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    const r = toRange(range)
    const memory = options.memory ?? memoryOf(range)
    if (memory !== 'anonymous' && memory !== 'shmem' && memory !== 'hugetlb') {
      throw new TypeError(`memory must be 'anonymous', 'shmem' or 'hugetlb' (got ${describe(memory)})`)
    }
    const batch = options.batch ?? 4096
    if (!Number.isSafeInteger(batch) || batch < 1)
      throw new RangeError(`batch must be a positive integer (got ${describe(batch)})`)
    const support = DirtyTracker.support(memory)
    if (!support.supported) throw new UnsupportedError(support.reason!)

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
    return new DirtyTracker(uffd, r, memory, batch)
  }

  /** False after stop(). */
  get active(): boolean {
    return this.#uffd !== undefined
  }

  /**
   * The ranges written since start() or the previous collect(), in address order, adjacent
   * pages merged; they are write-protected again in the same walk (atomically), so the next
   * collect() reports exactly the writes made after this one saw the page.
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
    uffd.close()
  }

  /** stop(), for `using tracker = DirtyTracker.start(m)`. */
  [Symbol.dispose](): void {
    this.stop()
  }

  #scan(reprotect: boolean): DirtyRange[] {
    if (this.#uffd === undefined) throw new TypeError('the dirty tracker was stopped')
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
}
