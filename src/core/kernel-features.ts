// Which kernel release brought each userfaultfd feature, and the one way the package refuses
// an API whose feature the running kernel lacks: an UnsupportedError naming the feature and that
// release (requireFeature / unsupported). Engines with a fallback ask hasFeature() and say which
// path they took; `doctor` lists missingFeatures().
import { native } from '../addon/native'
import { Feature, type FeatureName } from './constants'
import { UnsupportedError } from './errors'
import { probe } from './probe'

/**
 * A userfaultfd feature bit's name, or a related kernel capability the package uses:
 * PAGEMAP_SCAN (an ioctl on /proc/PID/pagemap) and CONTINUE_MODE_WP (UFFDIO_CONTINUE with
 * { wp: true }), which have no feature bit.
 */
export type KernelFeature = FeatureName | 'PAGEMAP_SCAN' | 'CONTINUE_MODE_WP'

/** The mainline release that brought each feature on x86_64 (the README's "since" column). */
export const FEATURE_SINCE: Readonly<Record<KernelFeature, string>> = Object.freeze({
  EVENT_FORK: '4.11',
  EVENT_REMAP: '4.11',
  EVENT_REMOVE: '4.11',
  EVENT_UNMAP: '4.11',
  MISSING_HUGETLBFS: '4.11',
  MISSING_SHMEM: '4.11',
  SIGBUS: '4.14',
  THREAD_ID: '4.14',
  PAGEFAULT_FLAG_WP: '5.7',
  MINOR_HUGETLBFS: '5.13',
  MINOR_SHMEM: '5.14',
  EXACT_ADDRESS: '5.18',
  WP_HUGETLBFS_SHMEM: '5.19',
  WP_UNPOPULATED: '6.4',
  CONTINUE_MODE_WP: '6.4',
  POISON: '6.6',
  WP_ASYNC: '6.7',
  PAGEMAP_SCAN: '6.7',
  MOVE: '6.8',
})

/**
 * Where arm64 got a feature later: userfaultfd write protection needs a page-table bit that
 * arm64 found only in 6.10 ("arm64/mm: Add uffd write-protect support"), so every WP feature
 * starts there (Debian 12's arm64 6.1 kernel reports none of them; measured, see the README).
 */
export const FEATURE_SINCE_ARM64: Readonly<Partial<Record<KernelFeature, string>>> = Object.freeze({
  PAGEFAULT_FLAG_WP: '6.10',
  WP_HUGETLBFS_SHMEM: '6.10',
  WP_UNPOPULATED: '6.10',
  CONTINUE_MODE_WP: '6.10',
  WP_ASYNC: '6.10',
})

// How each is named in messages: the uapi's own names.
const SPELLED: Partial<Record<KernelFeature, string>> = {
  PAGEMAP_SCAN: 'the PAGEMAP_SCAN ioctl on /proc/PID/pagemap',
  CONTINUE_MODE_WP: 'UFFDIO_CONTINUE_MODE_WP',
}

function spelled(feature: KernelFeature): string {
  return SPELLED[feature] ?? `UFFD_FEATURE_${feature}`
}

function known(feature: unknown): feature is KernelFeature {
  return typeof feature === 'string' && Object.hasOwn(FEATURE_SINCE, feature)
}

/**
 * The release that brought `feature` on `arch` (default: this process's), e.g.
 * kernelRelease('MOVE') === '6.8', kernelRelease('PAGEFAULT_FLAG_WP', 'arm64') === '6.10'.
 */
export function kernelRelease(feature: KernelFeature, arch: string = process.arch): string {
  if (!known(feature)) throw new TypeError(`unknown kernel feature ${JSON.stringify(feature)}`)
  return (arch === 'arm64' ? FEATURE_SINCE_ARM64[feature] : undefined) ?? FEATURE_SINCE[feature]
}

let pagemapScan: boolean | undefined

/**
 * Does the running kernel offer `feature`? From the cached probe; PAGEMAP_SCAN is tried once;
 * CONTINUE_MODE_WP, which nothing reports, goes by the release (uname -r) and write protection.
 */
export function hasFeature(feature: KernelFeature): boolean {
  kernelRelease(feature)
  if (feature === 'CONTINUE_MODE_WP')
    return hasFeature('PAGEFAULT_FLAG_WP') && releaseAtLeast(probe().kernel, kernelRelease(feature))
  if (feature === 'PAGEMAP_SCAN') {
    if (pagemapScan === undefined) {
      try {
        pagemapScan = native.pagemapScanProbe() === 22 /* EINVAL: it exists and rejected size 0 */
      } catch {
        pagemapScan = false
      }
    }
    return pagemapScan
  }
  return (probe().features & Feature[feature]) !== 0n
}

/**
 * The UnsupportedError for `what` needing `feature` on a kernel without it (not thrown: for
 * callers that decide on an error path). `what` names the API, e.g. 'uffd.move()'.
 */
export function unsupported(feature: KernelFeature, what: string): UnsupportedError {
  const since = kernelRelease(feature)
  const p = probe()
  // `what` reads "takeSnapshot() of shmem memory": the API's name is the error's syscall.
  const syscall = what.split(/[ (]/)[0]
  if (!p.supported && feature !== 'PAGEMAP_SCAN') {
    return new UnsupportedError(
      `${what} needs ${spelled(feature)} (Linux ${since}+), and userfaultfd is not available to this process: ${p.reason ?? 'see Userfaultfd.probe()'}`,
      { syscall, feature, since, kernel: p.kernel },
    )
  }
  return new UnsupportedError(
    `${what} needs ${spelled(feature)} (Linux ${since}+), which this kernel (${p.kernel}) lacks`,
    { syscall, feature, since, kernel: p.kernel },
  )
}

/** Throws unsupported(feature, what) unless the running kernel offers `feature`. */
export function requireFeature(feature: KernelFeature, what: string): void {
  if (!hasFeature(feature)) throw unsupported(feature, what)
}

export interface MissingFeature {
  feature: KernelFeature
  since: string
}

/** Features this package knows of that the running kernel lacks (empty when uffd is unusable). */
export function missingFeatures(): MissingFeature[] {
  if (!probe().supported) return []
  return (Object.keys(FEATURE_SINCE) as KernelFeature[])
    .filter((f) => !hasFeature(f))
    .map((feature) => ({ feature, since: kernelRelease(feature) }))
}

/** The UnsupportedError for requested Feature.* bits the kernel does not offer, if any. */
export function unofferedFeatures(requested: bigint, what: string): UnsupportedError | undefined {
  const p = probe()
  if (!p.supported) return undefined
  const names = (Object.keys(Feature) as FeatureName[]).filter(
    (n) => (requested & Feature[n]) !== 0n && (p.features & Feature[n]) === 0n,
  )
  if (names.length === 0) return undefined
  if (names.length === 1) return unsupported(names[0], what)
  const list = names.map((n) => `${spelled(n)} (Linux ${kernelRelease(n)}+)`).join(', ')
  const newest = names.reduce((a, b) => (compareReleases(kernelRelease(a), kernelRelease(b)) >= 0 ? a : b))
  return new UnsupportedError(`${what} needs ${list}, which this kernel (${p.kernel}) lacks`, {
    feature: names.join(', '),
    since: kernelRelease(newest),
    kernel: p.kernel,
  })
}

function releaseAtLeast(running: string, release: string): boolean {
  const m = /^(\d+)\.(\d+)/.exec(running)
  return m !== null && compareReleases(`${m[1]}.${m[2]}`, release) >= 0
}

function compareReleases(a: string, b: string): number {
  const [a1, a2] = a.split('.').map(Number)
  const [b1, b2] = b.split('.').map(Number)
  return a1 - b1 || a2 - b2
}
