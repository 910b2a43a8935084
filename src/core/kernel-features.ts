// Which kernel release brought the userfaultfd features this module is asked about, and the one
// way the package refuses an API whose feature the running kernel lacks: an UnsupportedError
// naming the feature and that release. (A minimal version: the older-kernels work brings the
// full table, with the same functions.)
import { Feature } from './constants'
import { UnsupportedError } from './errors'
import { probe } from './probe'

/** A userfaultfd feature bit's name. */
export type KernelFeature = keyof typeof Feature

/** The mainline release that brought each feature this module knows of (x86_64). */
const FEATURE_SINCE: Partial<Record<KernelFeature, string>> = {
  MINOR_HUGETLBFS: '5.13',
  MINOR_SHMEM: '5.14',
  POISON: '6.6',
  MOVE: '6.8',
}

/** The release that brought `feature`, e.g. kernelRelease('POISON') === '6.6'. */
export function kernelRelease(feature: KernelFeature): string {
  const since = FEATURE_SINCE[feature]
  if (since === undefined) throw new TypeError(`unknown kernel feature ${JSON.stringify(feature)}`)
  return since
}

/** Does the running kernel offer `feature`? (From the cached probe.) */
export function hasFeature(feature: KernelFeature): boolean {
  return (probe().features & Feature[feature]) !== 0n
}

/** The UnsupportedError for `what` needing `feature` on a kernel without it (not thrown). */
export function unsupported(feature: KernelFeature, what: string): UnsupportedError {
  const since = kernelRelease(feature)
  return new UnsupportedError(
    `${what} needs UFFD_FEATURE_${feature} (Linux ${since}+), which this kernel (${probe().kernel}) lacks`,
    { syscall: what, feature: `UFFD_FEATURE_${feature}` },
  )
}

/** Throws unsupported(feature, what) unless the running kernel offers `feature`. */
export function requireFeature(feature: KernelFeature, what: string): void {
  if (!hasFeature(feature)) throw unsupported(feature, what)
}
