// The migration demo's workload (native/engine/workload.h): writers dirtying random pages at a
// set rate and readers touching random pages, on native threads, with a SIGBUS caught and
// counted rather than fatal. Used by `migrate send/receive`, the migration tests and bench.
import { native } from '../../addon/native'
import { type RangeLike, toAddress, toLength } from '../../core/range'

export interface WorkloadOptions {
  /** bytes of pages dirtied per second by the writers together (0: as fast as they can) */
  writeRate?: number
  /** where in each page the writers put their u64 stamp (a multiple of 8) */
  writeOffset?: number
  writers?: number
  /** threads reading random pages as fast as they can */
  readers?: number
  seed?: number
  /** the high bits of every stamp (tag << 40 | thread << 32 | count) */
  tag?: number
}

export interface WorkloadStats {
  writes: number
  reads: number
  /** accesses that raised SIGBUS (a poisoned page): the thread stopped there */
  sigbus: number
  sigbusAddress: bigint
  /** accesses slower than 2 us (faults), and their latency */
  faults: number
  faultP50us: number
  faultP99us: number
  faultMaxUs: number
  running: number
}

export interface Workload {
  /** parks the writers (true once all are parked); readers go on */
  pause(timeoutMs?: number): boolean
  resume(): void
  /** ends the threads; returns how many could not end (blocked in a fault) and were left behind */
  stop(timeoutMs?: number): number
  stats(): WorkloadStats
  /** the last stamp written to each page (0n: none) */
  stamps(): BigUint64Array
}

export function startWorkload(range: RangeLike, pageSize: number, options: WorkloadOptions = {}): Workload {
  const W = (native as unknown as { Workload: new (a: bigint, l: number, p: number, o: object) => Workload }).Workload
  return new W(toAddress(range.address, 'address'), toLength(range.length, 'length'), pageSize, options)
}
