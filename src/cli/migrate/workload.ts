// The migration demo's workload (native/engine/workload.h): writers dirtying random pages at a
// set rate and readers touching random pages, on native threads, with a SIGBUS caught and
// counted rather than fatal. Used by `migrate send/receive`, the migration tests and bench.
import type { WorkloadHandle, WorkloadHandleOptions } from '../../addon/binding'
import { native } from '../../addon/native'
import { type RangeLike, toAddress, toLength } from '../../core/range'

export type {
  WorkloadHandle as Workload,
  WorkloadHandleOptions as WorkloadOptions,
  WorkloadHandleStats as WorkloadStats,
} from '../../addon/binding'

export function startWorkload(range: RangeLike, pageSize: number, options: WorkloadHandleOptions = {}): WorkloadHandle {
  return new native.Workload(toAddress(range.address, 'address'), toLength(range.length, 'length'), pageSize, options)
}
