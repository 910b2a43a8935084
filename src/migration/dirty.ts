// How the migration source's pre-copy rounds find the pages written since the last round: the
// DirtyTracker, 'async' (WP_ASYNC + PAGEMAP_SCAN: writes never block) where the kernel has it,
// 'sync' (write-protect faults served by a native thread) otherwise. Checked before the source
// connects, so that a kernel that can do neither is refused up front, naming the feature.
import { Feature } from '../core/constants'
import { unsupported } from '../core/kernel-features'
import type { MemoryKind } from '../core/mapping'
import { type DirtyTrackingInputs, type DirtyTrackingMode, dirtyTrackingSupport } from '../engines/dirty-tracker'
import { pagemapScanSupported } from '../engines/pagemap-scan'
import { Userfaultfd } from '../core/userfaultfd'

/** MigrationSourceOptions.dirtyTracking: the DirtyTracker's mode, or the best here ('auto'). */
export type DirtyTracking = 'auto' | DirtyTrackingMode

/** The facts of this kernel and process (overridable, to decide for other kernels in tests). */
export function trackingInputs(): Omit<DirtyTrackingInputs, 'memory'> {
  const p = Userfaultfd.probe()
  return {
    features: p.features,
    pagemapScan: pagemapScanSupported(),
    userfaultfd: p.supported,
    userfaultfdReason: p.reason,
    kernel: p.kernel,
  }
}

/**
 * The DirtyTracker mode that `method` gives for `kind` memory, or an UnsupportedError naming the
 * missing feature (mode 'postcopy' tracks nothing, and works without any of them).
 */
export function checkTracking(
  kind: MemoryKind,
  method: DirtyTracking,
  inputs: Omit<DirtyTrackingInputs, 'memory'> = trackingInputs(),
): DirtyTrackingMode {
  const what = `MigrationSource pre-copy (dirtyTracking '${method}') of ${kind} memory`
  const support = dirtyTrackingSupport({ ...inputs, memory: kind })
  if (!support.supported)
    throw unsupported(
      (inputs.features & Feature.PAGEFAULT_FLAG_WP) === 0n ? 'PAGEFAULT_FLAG_WP' : 'WP_HUGETLBFS_SHMEM',
      what,
    )
  if (method === 'async' && support.mode !== 'async')
    throw unsupported((inputs.features & Feature.WP_ASYNC) === 0n ? 'WP_ASYNC' : 'PAGEMAP_SCAN', what)
  return method === 'auto' ? (support.mode ?? 'sync') : method
}
