// Gating for tests of kernel features newer than the oldest kernel the suite runs on (Debian
// 12's 6.1; on arm64 every write-protection feature needs 6.10). Never a silent skip: where the
// running kernel lacks the feature, the test asserts the package's refusal instead (an
// UnsupportedError naming the feature and the release that brought it) and prints that it did.
//
//   it('moves pages', () => {
//     if (!withFeature('MOVE', () => Userfaultfd.open({ features: Feature.MOVE }))) return
//     ...the test of MOVE itself...
//   })
//
// CONTRIBUTING.md "Older kernels" says how to run the suite on 6.1 (npm run test:kernel61).
import * as os from 'node:os'
import { expect } from 'vitest'
import {
  Feature,
  type FeatureName,
  type KernelFeature,
  UnsupportedError,
  hasFeature,
  kernelRelease,
} from '../../src/index'
import { kernelAtLeast } from './env'

export { hasFeature, kernelRelease }

/** Every one of `features` is offered by the running kernel. */
export function hasFeatures(...features: KernelFeature[]): boolean {
  return features.every((f) => hasFeature(f))
}

/**
 * Runs fn, expects the package's UnsupportedError for `feature`: code ENOTSUP, `feature` naming
 * it, `since` and the message giving the release that brought it (on this architecture), and
 * `kernel` the running one. Says so on stdout (one line per refusal: the VM runs' logs list
 * them). Returns the error.
 */
export function expectUnsupported(fn: () => unknown, feature: KernelFeature): UnsupportedError {
  let thrown: unknown
  try {
    fn()
  } catch (err) {
    thrown = err
  }
  expect(thrown, `expected UnsupportedError for ${feature}`).toBeInstanceOf(UnsupportedError)
  const err = thrown as UnsupportedError
  const since = kernelRelease(feature)
  expect(err).toMatchObject({ name: 'UnsupportedError', code: 'ENOTSUP', kernel: os.release() })
  expect(err.feature?.split(', ')).toContain(feature)
  expect(err.message).toContain(feature)
  expect(err.message).toContain(`Linux ${since}+`)
  // Several missing features at once: `since` is the newest of them.
  if (err.feature === feature) expect(err.since).toBe(since)
  reportRefusal(feature)
  return err
}

/** The async form of expectUnsupported (fn returns a promise that must reject with it). */
export async function expectUnsupportedAsync(fn: () => Promise<unknown>, feature: KernelFeature): Promise<void> {
  let thrown: unknown
  try {
    await fn()
  } catch (err) {
    thrown = err
  }
  expectUnsupported(() => {
    if (thrown !== undefined) throw thrown
  }, feature)
}

/**
 * For a test of `features`: true where the kernel offers them all (the test goes on). Where it
 * lacks one, asserts that `refusal()` throws the UnsupportedError for it, says so on stdout, and
 * returns false: the test then returns, having checked the refusal instead.
 */
export function withFeature(features: KernelFeature | KernelFeature[], refusal: () => unknown): boolean {
  const list = Array.isArray(features) ? features : [features]
  const missing = list.find((f) => !hasFeature(f))
  if (missing === undefined) return true
  expectUnsupported(refusal, missing)
  return false
}

/** withFeature for a refusal that is a promise (e.g. a child process's report). */
export async function withFeatureAsync(
  features: KernelFeature | KernelFeature[],
  refusal: () => Promise<unknown>,
): Promise<boolean> {
  const list = Array.isArray(features) ? features : [features]
  const missing = list.find((f) => !hasFeature(f))
  if (missing === undefined) return true
  await expectUnsupportedAsync(refusal, missing)
  return false
}

function reportRefusal(feature: KernelFeature): void {
  const name = expect.getState().currentTestName ?? '(a test)'
  console.log(
    `kernel ${os.release()} lacks ${feature} (Linux ${kernelRelease(feature)}+): "${name}" asserted its UnsupportedError`,
  )
}

/**
 * The Feature.* bits a kernel of this release and architecture offers, by kernelRelease():
 * the package's table of releases, checked against the running kernel (constants.test.ts).
 */
export function featuresExpectedHere(): bigint {
  let mask = 0n
  for (const [name, bit] of Object.entries(Feature)) if (releaseAtLeast(kernelRelease(name as FeatureName))) mask |= bit
  return mask
}

/** The running kernel (uname -r) is at least `release` ('6.10'). */
export function releaseAtLeast(release: string): boolean {
  const [major, minor] = release.split('.').map(Number)
  return kernelAtLeast(major, minor)
}
