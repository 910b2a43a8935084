// What the migration source's pre-copy rounds use to find the pages written since the last
// round: the DirtyTracker (WP_ASYNC + PAGEMAP_SCAN: writes never block) where the kernel has it,
// and synchronous write protection otherwise (Linux before 6.7): the first write to a page in
// each round blocks its writer for one WP fault, which a native thread resolves
// (native/engine/sync_dirty_tracker.h).
import type { SyncDirtyTracker } from '../addon/binding'
import { native } from '../addon/native'
import { Feature } from '../core/constants'
import { UnsupportedError } from '../core/errors'
import type { Mapping, MemoryKind } from '../core/mapping'
import type { Range } from '../core/range'
import { Userfaultfd } from '../core/userfaultfd'
import { DirtyTracker } from '../engines/dirty-tracker'

/** How dirty pages are found: 'async' (WP_ASYNC + PAGEMAP_SCAN, Linux 6.7+), 'sync' (WP faults), or the best here. */
export type DirtyTracking = 'auto' | 'async' | 'sync'

/** Pages written since the previous collect(), as byte ranges from the tracked range's start. */
export interface PageWrites {
  readonly method: 'async' | 'sync'
  collect(): Array<{ offset: number; length: number }>
  stop(): void
}

/** Why synchronous write protection cannot track `kind` here, or undefined if it can. */
export function syncTrackingMissing(kind: MemoryKind, features: bigint): string | undefined {
  const missing: string[] = []
  if ((features & Feature.PAGEFAULT_FLAG_WP) === 0n) missing.push('UFFD_FEATURE_PAGEFAULT_FLAG_WP (Linux 5.7+)')
  if (kind !== 'anonymous' && (features & Feature.WP_HUGETLBFS_SHMEM) === 0n)
    missing.push(`UFFD_FEATURE_WP_HUGETLBFS_SHMEM for ${kind} memory (Linux 5.19+)`)
  return missing.length === 0 ? undefined : missing.join(' and ')
}

/**
 * Throws UnsupportedError, naming what is missing, where `method` cannot track `kind` memory on
 * this kernel: a MigrationSource checks this before it connects.
 */
export function checkTracking(
  kind: MemoryKind,
  method: DirtyTracking,
  features: bigint = Userfaultfd.probe().features,
): 'async' | 'sync' {
  const async = DirtyTracker.support(kind)
  if (method === 'async' || (method === 'auto' && async.supported)) {
    if (!async.supported)
      throw new UnsupportedError(`dirtyTracking 'async': ${async.reason}`, {
        syscall: 'MigrationSource',
        feature: 'UFFD_FEATURE_WP_ASYNC',
      })
    return 'async'
  }
  const missing = syncTrackingMissing(kind, features)
  if (missing !== undefined)
    throw new UnsupportedError(
      `pre-copy needs dirty-page tracking: WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+), or write protection, which needs ${missing}, which this kernel (${Userfaultfd.probe().kernel}) lacks; use mode 'postcopy'`,
      { syscall: 'MigrationSource', feature: 'UFFD_FEATURE_PAGEFAULT_FLAG_WP' },
    )
  return 'sync'
}

/** Starts tracking writes to `range` (memory of `kind` in pages of `pageSize`) with `method`. */
export function trackWrites(
  range: Mapping | Range,
  kind: MemoryKind,
  pageSize: number,
  method: DirtyTracking,
): PageWrites {
  const offered = Userfaultfd.probe().features
  if (checkTracking(kind, method, offered) === 'async') {
    const t = DirtyTracker.start(range, { memory: kind })
    return { method: 'async', collect: () => t.collect(), stop: () => t.stop() }
  }
  // Without WP_UNPOPULATED (Linux 6.4) a write to a page never touched does not fault: the
  // range is populated first.
  const unpopulated = (offered & Feature.WP_UNPOPULATED) !== 0n
  let features = Feature.PAGEFAULT_FLAG_WP | (unpopulated ? Feature.WP_UNPOPULATED : 0n)
  if (kind !== 'anonymous') features |= Feature.WP_HUGETLBFS_SHMEM
  const uffd = Userfaultfd.open({ features })
  let tracker: SyncDirtyTracker
  try {
    uffd.register(range, { wp: true })
    tracker = new native.SyncDirtyTracker(uffd.fd, range.address, range.length, pageSize, !unpopulated)
  } catch (err) {
    uffd.close()
    throw err
  }
  return {
    method: 'sync',
    collect() {
      const runs = tracker.collect()
      const out: Array<{ offset: number; length: number }> = []
      for (let i = 0; i < runs.length; i += 2) out.push({ offset: runs[i] * pageSize, length: runs[i + 1] * pageSize })
      return out
    },
    stop() {
      tracker.stop()
      uffd.close()
    },
  }
}
