// What both ends of a migration share: option checks, the result shape, control messages.
import { decodeJson, ProtocolError } from './wire'

/** A migration's outcome, as both ends report it (the CLI prints it as JSON). */
export interface MigrationResult {
  mode: 'precopy' | 'postcopy' | 'hybrid'
  /** memory migrated (bytes) */
  bytes: number
  /** from start() to the target having every page */
  totalMs: number
  /** pre-copy rounds, while the source's workload ran */
  precopyMs: number
  /** from the stop hook's call to the target's workload running (measured at the source: an upper bound by one network delay) */
  downtimeMs: number
  /** from the target running to the target having every page */
  postcopyMs: number
  /** bytes on the wire, both directions, both channels, handshakes included */
  wireBytes: number
  /** demand fault latency at the target (request sent to page installed), microseconds */
  demandP50Us: number
  demandP99Us: number
  /** per-page hashes matched (null: not checked) */
  verified: boolean | null
  reconnects: number
  poisonedPages: number
  rounds: number
  pagesTotal: number
  /** pages sent in pre-copy rounds (including re-sends of dirtied pages) */
  precopyPages: number
  /** pages pushed in post-copy */
  pushedPages: number
  /** pages sent on demand in post-copy */
  demandPages: number
  /** pages the target received again and dropped (0 unless a connection broke mid-page) */
  duplicatePages: number
  /** pages sent again after a reconnect because they were lost in flight */
  resentPages: number
  /** demand requests for a page the push had already sent (left to the push) */
  requestsForPushed: number
  /** pages dirty at the stop (sent in the downtime with 'precopy', to come in post-copy otherwise) */
  dirtyAtStop: number
  zeroedPages: number
  mismatches: number
  /** where the downtime went (diagnostics; fields may change): the stop hook, the last dirty scan, sending the rest or the discard list, the source's share, the round trip, the target's share */
  downtimeParts?: Record<string, unknown>
}

export type Phase =
  | 'connecting'
  | 'precopy'
  | 'stopping'
  | 'postcopy'
  | 'disconnected'
  | 'verifying'
  | 'complete'
  | 'failed'
  | 'listening'

/** A control message (CONTROL frame): a JSON object with a string `t`. */
export type Control = { t: string } & Record<string, unknown>

export function decodeControl(payload: Buffer): Control {
  const o = decodeJson(payload, 'CONTROL')
  if (typeof o.t !== 'string') throw new ProtocolError('CONTROL without a type')
  return o as Control
}

export function finite(value: unknown, fallback = 0): number {
  return typeof value === 'number' && Number.isFinite(value) ? value : fallback
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms))
}

/**
 * What postcopyPriority 'latency' sets at each end (measured in bench/migrate.js: demand-fault
 * p99 several times lower while the push runs, the push slower, much slower on a busy machine).
 */
export function postcopyTuning(priority: 'throughput' | 'latency'): {
  pushIdle: boolean
  bulkIdle: boolean
  postcopyBuffer: number
  realtimeDemand: boolean
} {
  const latency = priority === 'latency'
  return { pushIdle: latency, bulkIdle: latency, postcopyBuffer: latency ? 256 * 1024 : 0, realtimeDemand: latency }
}
