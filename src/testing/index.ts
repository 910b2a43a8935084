/**
 * @internal Test and benchmark helpers: not part of the public API, may change at any time.
 *
 * They raise faults and memory events from native threads, so that the JS thread (which reads
 * and resolves them) never blocks on its own fault. They need the test-only addon (./addon.ts),
 * which only a checkout builds.
 */
import { native } from '../addon/native'
import { PAGE_SIZE } from '../core/constants'
import type { Advice } from '../core/mapping'
import { type RangeLike, toAddress, toLength } from '../core/range'
import { type Stamper, testingNative } from './addon'

export type { Stamper } from './addon'

export interface TouchOptions {
  /** write instead of read: stores value + index (u64) at each address */
  write?: boolean
  value?: bigint
  /** native threads to spread the addresses over (round-robin) */
  threads?: number
  /** record each touch's latency in ns */
  timings?: boolean
  /** busy work (ns) after each touch: a workload computing on what it touched (benchmarks) */
  workNs?: number
  /** pin the touching threads to this CPU (benchmarks choosing the placement) */
  cpu?: number
}

export interface TouchResult {
  /** the u64 read (or written) at each address */
  values: BigUint64Array
  /** per-touch latency in ns, with { timings: true } */
  ns?: Float64Array
}

/** Touches each address from native threads; resolves once every touch returned. */
export async function touch(
  addresses: readonly bigint[] | BigUint64Array,
  options: TouchOptions = {},
): Promise<TouchResult> {
  const list = addresses instanceof BigUint64Array ? addresses : BigUint64Array.from(addresses)
  const { values, ns } = await testingNative().touch(list, options)
  return ns === undefined ? { values } : { values, ns }
}

/** The addresses of `count` pages from `range`'s start, `stride` bytes apart (default: every page). */
export function pages(range: RangeLike, count?: number, stride = PAGE_SIZE, offset = 0): BigUint64Array {
  const start = toAddress(range.address, 'address') + BigInt(offset)
  const length = toLength(range.length, 'length')
  const n = count ?? Math.floor((length - offset) / stride)
  const out = new BigUint64Array(n)
  for (let i = 0; i < n; i++) out[i] = start + BigInt(i * stride)
  return out
}

/** madvise(2) from a native thread (MADV_DONTNEED/REMOVE events block their causer until read). */
export async function madviseOnThread(range: RangeLike, advice: Advice): Promise<number> {
  const value = native.constants.Advice[advice]
  if (value === undefined) throw new TypeError(`unknown advice '${advice}'`)
  const { errno } = await testingNative().madviseOnThread(
    toAddress(range.address, 'address'),
    toLength(range.length, 'length'),
    value,
  )
  return errno
}

/**
 * fork(2) from a native thread; the child exits at once and is reaped. With `readAt`, the child
 * first reads the u64 there (faulting, for the fork's uffd, where it is missing) and exits with
 * its low byte as status. Resolves with the child's pid and wait status.
 */
export async function forkOnThread(readAt?: bigint): Promise<{ pid: number; status: number; errno: number }> {
  const { pid, status, errno } = await testingNative().forkOnThread(readAt)
  return { pid, status, errno }
}

/** mremap(2) with MREMAP_MAYMOVE from a native thread (a REMAP event blocks it until read). */
export async function mremapOnThread(
  address: bigint,
  oldLength: number,
  newLength: number,
): Promise<{ address: bigint; errno: number }> {
  const { result, errno } = await testingNative().mremapOnThread(address, oldLength, newLength)
  return { address: result, errno }
}

/** munmap(2) from a native thread (an UNMAP event blocks it until read). */
export async function munmapOnThread(address: bigint, length: number): Promise<number> {
  const { errno } = await testingNative().munmapOnThread(address, length)
  return errno
}

/** Anonymous memory owned by no Mapping: for tests that mremap/munmap it behind our back. */
export function mmapRaw(length: number): bigint {
  return testingNative().mmapRaw(length)
}

export interface StamperOptions {
  /** writer threads; thread t owns the 4 KiB slots t, t + threads, ... */
  threads?: number
  /** write each thread's slots in a seeded shuffled order instead of address order */
  shuffle?: boolean
  seed?: number
}

/**
 * Native writer threads stamping 4 KiB slots of [address, address + length) with counters until
 * stop() (see native/testing/stamper.cc for the stamp layout and the stale-data check).
 */
export function startStamper(range: RangeLike, options: StamperOptions = {}): Stamper {
  return new (testingNative().Stamper)(toAddress(range.address, 'address'), toLength(range.length, 'length'), options)
}

/** The stamp thread `thread` of the stamper numbered `run` (stamper.run()) writes on its `k`-th write. */
export function stampOf(run: number, thread: number, k: number): bigint {
  return (BigInt(run) << 48n) | (BigInt(thread + 1) << 40n) | BigInt(k)
}

/** uv poll handles (event streams, fd watchers) this thread's environment has open: leak checks. */
export function openPollHandles(): number {
  return native.openPollHandles()
}
