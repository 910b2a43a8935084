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

/** How post-copy shares the network stack and the CPUs between demand faults and the background push (MigrationSourceOptions.postcopyPriority). */
export type PostcopyPriority = 'throughput' | 'latency'
export const POSTCOPY_PRIORITIES = ['latency', 'throughput'] as const
export const DEFAULT_POSTCOPY_PRIORITY: PostcopyPriority = 'latency'

/**
 * What each end sets in post-copy for a postcopyPriority (measured in bench/migrate.js, see
 * docs/migration.md "Numbers"). 'latency' keeps a demand page from waiting behind the push:
 *  - in the network stack: a short queue of push bytes (128 KiB send buffer, at most 16 KiB not
 *    sent yet, 256 KiB receive buffer, 64 KiB frames) ahead of a demand page's packets;
 *  - for a CPU: the demand path's threads SCHED_FIFO, the push's two threads nice -10 (ahead of
 *    the workload's, which would otherwise take the CPU a faster demand path frees). Both need
 *    CAP_SYS_NICE; without it only the buffers apply.
 * 'throughput' leaves everything as the kernel sets it: the push fills the link and the socket
 * buffers, and a demand page waits behind them (milliseconds).
 */
export function postcopyTuning(
  priority: PostcopyPriority,
  chunkBytes = 256 * 1024,
): {
  source: {
    pushChunkBytes: number
    postcopyBuffer: number
    notsentLowat: number
    pushNice: number
    realtimeDemand: boolean
  }
  target: { postcopyBuffer: number; bulkNice: number; realtimeDemand: boolean }
} {
  if (priority === 'throughput') {
    return {
      source: { pushChunkBytes: 0, postcopyBuffer: 0, notsentLowat: 0, pushNice: 0, realtimeDemand: false },
      target: { postcopyBuffer: 0, bulkNice: 0, realtimeDemand: false },
    }
  }
  return {
    source: {
      pushChunkBytes: Math.min(chunkBytes, 64 * 1024),
      postcopyBuffer: 128 * 1024,
      notsentLowat: 16 * 1024,
      pushNice: -10,
      realtimeDemand: true,
    },
    target: { postcopyBuffer: 256 * 1024, bulkNice: -10, realtimeDemand: true },
  }
}
