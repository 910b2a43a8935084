// PAGEMAP_SCAN (Linux 6.7+): page-table categories of a range, from /proc/PID/pagemap, and with
// PM_SCAN_WP_MATCHING the atomic "report written pages and write-protect them again" that dirty
// tracking over a WP_ASYNC userfaultfd needs. Input is validated here, so that a mistake is a
// RangeError/TypeError naming it rather than a bare EINVAL from the kernel.
import { native } from '../addon/native'
import { PAGE_SIZE } from '../core/constants'
import { toAddress, toLength, type RangeLike } from '../core/range'
import { describe } from '../util/validate'
import type { UffdError } from '../core/errors'
import { hasFeature, unsupported } from '../core/kernel-features'

/** PAGE_IS_* categories (bits of the masks and of each region's `categories`). */
export const PageCategory = Object.freeze({
  /** async write-protection (UFFD WP_ASYNC) is enabled on the page */
  WPALLOWED: 1 << 0,
  /** written since it was last write-protected */
  WRITTEN: 1 << 1,
  /** file-backed (or shmem) page */
  FILE: 1 << 2,
  /** present in memory */
  PRESENT: 1 << 3,
  /** swapped out */
  SWAPPED: 1 << 4,
  /** the shared zero page */
  PFNZERO: 1 << 5,
  /** backed by a THP or hugetlb page */
  HUGE: 1 << 6,
  /** soft-dirty (see /proc/PID/clear_refs) */
  SOFT_DIRTY: 1 << 7,
  /** a guard region (MADV_GUARD_INSTALL; Linux 6.14+) */
  GUARD: 1 << 8,
} as const)
/** A name of PageCategory. */
export type PageCategoryName = keyof typeof PageCategory

/** PM_SCAN_* flags. */
export const PagemapScanFlag = Object.freeze({
  /** write-protect the matched pages in the same walk */
  WP_MATCHING: 1 << 0,
  /** fail (EPERM) instead of skipping a page without async write-protection */
  CHECK_WPASYNC: 1 << 1,
} as const)

const ALL_CATEGORIES = Object.values(PageCategory).reduce((a, b) => a | b, 0)
// The default return mask: every category of the original ABI (6.7). GUARD came in 6.14, and a
// kernel that does not know a bit rejects the call, so it is reported only when asked for.
const DEFAULT_RETURN = ALL_CATEGORIES & ~PageCategory.GUARD
const ALL_FLAGS = PagemapScanFlag.WP_MATCHING | PagemapScanFlag.CHECK_WPASYNC
const MAX_REGIONS = 1 << 20

/** Options of pagemapScan() (struct pm_scan_arg). */
export interface PagemapScanOptions {
  /** PagemapScanFlag bits */
  flags?: number
  /** categories that match when CLEAR instead of set */
  categoryInverted?: number
  /** report only pages matching ALL of these categories (after inversion) */
  categoryMask?: number
  /** report only pages matching ANY of these categories (after inversion) */
  categoryAnyofMask?: number
  /** categories to report in each region (default: every category but GUARD, which needs 6.14+) */
  returnMask?: number
  /** stop after this many pages (0: no limit) */
  maxPages?: number
  /** output capacity in regions per call (default 4096); a full output ends the walk early */
  maxRegions?: number
  /** another process's pagemap (default: this process) */
  pid?: number
}

/** A run of pages with the same categories. */
export interface PageRegion {
  /** Start address. */
  address: bigint
  /** Length in bytes. */
  length: number
  /** PageCategory bits, limited to returnMask */
  categories: number
}

/** What one PAGEMAP_SCAN call found. */
export interface PagemapScanResult {
  /** The matching runs, in address order. */
  regions: PageRegion[]
  /** where the walk stopped: the range's end unless maxPages or maxRegions cut it short */
  walkEnd: bigint
}

function mask(value: unknown, what: string, allowed: number): number {
  if (value === undefined) return 0
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new TypeError(`${what} must be a non-negative integer of bits (got ${describe(value)})`)
  }
  if ((value & ~allowed) !== 0) {
    throw new RangeError(
      `${what} has unknown bits 0x${(value & ~allowed).toString(16)} (known: 0x${allowed.toString(16)})`,
    )
  }
  return value
}

/**
 * ioctl(PAGEMAP_SCAN) over [range.address, range.address + range.length). One call: if
 * `walkEnd` is short of the end, call again from there. Throws UffdError for the kernel's
 * errors (EPERM: CHECK_WPASYNC met a page without async WP); UnsupportedError before Linux 6.7.
 */
export function pagemapScan(range: RangeLike, options: PagemapScanOptions = {}): PagemapScanResult {
  if (range === null || typeof range !== 'object')
    throw new TypeError(`range must be { address, length } (got ${describe(range)})`)
  if (options === null || typeof options !== 'object')
    throw new TypeError(`options must be an object (got ${describe(options)})`)
  const start = toAddress(range.address, 'range.address')
  const length = toLength(range.length, 'range.length')
  if (start % BigInt(PAGE_SIZE) !== 0n) {
    throw new RangeError(`pagemapScan: address 0x${start.toString(16)} is not aligned to the page size (${PAGE_SIZE})`)
  }
  const flags = mask(options.flags, 'flags', ALL_FLAGS)
  const categoryInverted = mask(options.categoryInverted, 'categoryInverted', ALL_CATEGORIES)
  const categoryMask = mask(options.categoryMask, 'categoryMask', ALL_CATEGORIES)
  const categoryAnyofMask = mask(options.categoryAnyofMask, 'categoryAnyofMask', ALL_CATEGORIES)
  const returnMask =
    options.returnMask === undefined ? DEFAULT_RETURN : mask(options.returnMask, 'returnMask', ALL_CATEGORIES)
  if (returnMask === 0) throw new RangeError('returnMask must name at least one category (regions would carry nothing)')
  const maxPages = options.maxPages ?? 0
  if (!Number.isSafeInteger(maxPages) || maxPages < 0)
    throw new RangeError(`maxPages must be a non-negative integer (got ${describe(maxPages)})`)
  const maxRegions = options.maxRegions ?? 4096
  if (!Number.isSafeInteger(maxRegions) || maxRegions < 1 || maxRegions > MAX_REGIONS) {
    throw new RangeError(`maxRegions must be 1..${MAX_REGIONS} (got ${describe(maxRegions)})`)
  }
  const pid = options.pid ?? 0
  if (!Number.isSafeInteger(pid) || pid < 0)
    throw new RangeError(`pid must be a non-negative integer (got ${describe(pid)})`)

  let out: ReturnType<typeof native.pagemapScan>
  try {
    out = native.pagemapScan(
      pid,
      start,
      start + BigInt(length),
      flags,
      categoryInverted,
      categoryMask,
      categoryAnyofMask,
      returnMask,
      maxPages,
      maxRegions,
    )
  } catch (err) {
    if ((err as UffdError).code === 'ENOTTY') throw unsupported('PAGEMAP_SCAN', 'pagemapScan()')
    throw err
  }
  const regions: PageRegion[] = []
  for (let i = 0; i < out.regions.length; i += 3) {
    regions.push({
      address: out.regions[i],
      length: Number(out.regions[i + 1] - out.regions[i]),
      categories: Number(out.regions[i + 2]),
    })
  }
  return { regions, walkEnd: out.walkEnd }
}

/** True if this kernel has the PAGEMAP_SCAN ioctl (Linux 6.7+). Cached. */
export function pagemapScanSupported(): boolean {
  return hasFeature('PAGEMAP_SCAN')
}
