// The test-only addon (native/testing, built as userfaultfd_testing.node; never shipped: the
// package leaves its sources out and has no prebuild of it). Loaded on first use, so that the
// package itself never needs it.
import { loadAddon } from '../addon/native'
import { UffdError } from '../core/errors'

export interface TouchResult {
  values: BigUint64Array
  ns?: Float64Array
  errno: number
}

export interface Stamper {
  /** this stamper's run number, part of every stamp it writes (see stampOf) */
  run(): number
  counts(): Float64Array
  order(thread: number): Uint32Array
  initial(thread: number): BigUint64Array
  maxGapMs(reset?: boolean): number
  stop(): Promise<{ counts: Float64Array; stale: number }>
}

/** Everything native/testing exports (toucher.cc, stamper.cc). */
export interface TestingBinding {
  setErrorClass(ctor: new (message: string) => Error): void
  touch(
    addresses: BigUint64Array,
    options: { write?: boolean; value?: bigint; threads?: number; timings?: boolean; workNs?: number; cpu?: number },
  ): Promise<TouchResult>
  madviseOnThread(address: bigint, length: number, advice: number): Promise<TouchResult>
  forkOnThread(readAt?: bigint): Promise<TouchResult & { pid: number; status: number }>
  mremapOnThread(address: bigint, oldLength: number, newLength: number): Promise<TouchResult & { result: bigint }>
  munmapOnThread(address: bigint, length: number): Promise<TouchResult>
  mmapRaw(length: number): bigint
  Stamper: new (
    address: bigint,
    length: number,
    options: { threads?: number; shuffle?: boolean; seed?: number },
  ) => Stamper
}

let loaded: TestingBinding | undefined

/** The test-only addon (an error saying how to build it where it is absent). */
export function testingNative(): TestingBinding {
  if (loaded === undefined) {
    const addon = loadAddon<TestingBinding>('userfaultfd_testing', 'test-only addon (built in a checkout only)')
    addon.setErrorClass(UffdError)
    loaded = addon
  }
  return loaded
}
