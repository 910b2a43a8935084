// FaultTrace: every fault a FaultServer served (address, kind, wait, faulting thread) written as
// Chrome trace-event JSON (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU),
// which Perfetto (ui.perfetto.dev) and chrome://tracing open, and `userfaultfd report` draws.
// Records come from the engine's bounded buffer (native/engine/fault_trace.h) in batches and are
// appended to the file as they come; close() writes the end, so the file is valid JSON only then.
import * as fs from 'node:fs'
import { describe } from '../util/validate'

/** How a fault (or a fill) put pages in place. */
export type FaultKind = 'demand' | 'around' | 'prefetch' | 'zero'

/** In the order of native/engine/fault_trace.h FaultTraceKind. */
export const FAULT_KINDS: readonly FaultKind[] = ['demand', 'around', 'prefetch', 'zero']

/** The trace-event category of every fault event: what `userfaultfd report` reads. */
export const TRACE_CATEGORY = 'userfaultfd'

/** native/engine/fault_trace.h FaultTraceRecord. */
export const TRACE_RECORD_SIZE = 40

// Tracks for records without a faulting thread: trace-event tids are numbers, so these are
// numbers no Linux thread has (pid_max is at most 2^22), named by thread_name metadata.
const SERVER_TID = 0x7fff0001 // fault-around fills: the engine's demand thread
const PREFETCH_TID = 0x7fff0002 // background fills: the prefetch thread
const UNKNOWN_TID = 0x7fff0003 // faults read without Feature.THREAD_ID

/** One record, as FaultTrace.add() takes it (times on CLOCK_MONOTONIC, as process.hrtime). */
export interface FaultRecord {
  kind: FaultKind
  address: bigint
  /** when the fault was read (demand, zero) or the fill began, ns */
  startNs: bigint
  /** the wait (demand, zero: read to resolved) or the fill's duration, ns */
  durNs: bigint
  /** bytes put in place (0: already there) */
  bytes: number
  /** the faulting thread's id (0: unknown) */
  tid: number
}

/**
 * A Chrome trace-event file of faults: give its path as FaultServer's { trace } (the server
 * creates and closes it), or create one and give it to several servers (then close it yourself,
 * after them). Each fault is an 'X' (complete) event on its faulting thread's track: name and
 * args.kind 'demand' | 'zero', args.address, args.bytes; fills around a fault and in the
 * background ('around', 'prefetch') are on the server's own tracks.
 */
export class FaultTrace {
  readonly path: string
  #fd: number
  #first = true
  #records = 0
  #dropped = 0
  #pending: string[] = []
  readonly #tracks = new Set<number>()

  /** Creates (or truncates) `path` and writes the trace's beginning. */
  constructor(path: string) {
    if (typeof path !== 'string' || path === '')
      throw new TypeError(`trace must be a file path (got ${describe(path)})`)
    this.path = path
    this.#fd = fs.openSync(path, 'w', 0o644)
    fs.writeSync(this.#fd, '{"traceEvents":[\n')
    this.#event({ name: 'process_name', ph: 'M', pid: process.pid, tid: 0, args: { name: 'userfaultfd faults' } })
    this.#flush()
  }

  /** True after close(). */
  get closed(): boolean {
    return this.#fd < 0
  }

  /** Fault events written so far. */
  get records(): number {
    return this.#records
  }

  /** Records the engine could not buffer (FaultServer drains it every 100 ms). */
  get dropped(): number {
    return this.#dropped
  }

  /** Appends one record (the JS fault paths: FirecrackerHandler). */
  add(r: FaultRecord): void {
    if (this.closed) return
    this.#fault(r.kind, r.address, r.startNs, r.durNs, r.bytes, r.tid)
    if (this.#pending.length >= 1024) this.#flush()
  }

  /**
   * Appends the engine's records (takeTrace()); `threadIds`: whether the uffd reports the
   * faulting thread (Feature.THREAD_ID), else the tids read are not ones.
   */
  addRecords(records: ArrayBuffer, dropped: number, threadIds: boolean): void {
    if (this.closed) return
    this.#dropped += dropped
    const view = new DataView(records)
    for (let at = 0; at + TRACE_RECORD_SIZE <= records.byteLength; at += TRACE_RECORD_SIZE) {
      const kind = FAULT_KINDS[view.getUint8(at + 36)] ?? 'demand'
      this.#fault(
        kind,
        view.getBigUint64(at, true),
        view.getBigUint64(at + 8, true),
        view.getBigUint64(at + 16, true),
        Number(view.getBigUint64(at + 24, true)),
        threadIds ? view.getUint32(at + 32, true) : 0,
      )
    }
    this.#flush()
  }

  /** Writes the thread names and the end of the file, and closes it. Idempotent. */
  close(): void {
    if (this.closed) return
    const names: Record<number, string> = {
      [SERVER_TID]: 'userfaultfd fault-around',
      [PREFETCH_TID]: 'userfaultfd prefetch',
      [UNKNOWN_TID]: 'faulting threads (no THREAD_ID)',
    }
    for (const tid of this.#tracks)
      this.#event({
        name: 'thread_name',
        ph: 'M',
        pid: process.pid,
        tid,
        args: { name: names[tid] ?? `faulting thread ${tid}` },
      })
    this.#flush()
    const other = { producer: 'userfaultfd', records: this.#records, dropped: this.#dropped }
    fs.writeSync(this.#fd, `\n],"displayTimeUnit":"ns","otherData":${JSON.stringify(other)}}\n`)
    fs.closeSync(this.#fd)
    this.#fd = -1
  }

  #fault(kind: FaultKind, address: bigint, startNs: bigint, durNs: bigint, bytes: number, tid: number): void {
    const faulting = kind === 'demand' || kind === 'zero'
    const track = faulting ? tid || UNKNOWN_TID : kind === 'prefetch' ? PREFETCH_TID : SERVER_TID
    this.#tracks.add(track)
    const args: Record<string, unknown> = { address: `0x${address.toString(16)}`, kind, bytes }
    if (faulting) args.waitUs = Number(durNs) / 1000
    if (tid !== 0) args.tid = tid
    this.#event({
      name: kind,
      cat: TRACE_CATEGORY,
      ph: 'X',
      ts: Number(startNs) / 1000,
      dur: Number(durNs) / 1000,
      pid: process.pid,
      tid: track,
      args,
    })
    this.#records++
  }

  #event(e: object): void {
    this.#pending.push(this.#first ? JSON.stringify(e) : `,\n${JSON.stringify(e)}`)
    this.#first = false
  }

  #flush(): void {
    if (this.#pending.length === 0) return
    fs.writeSync(this.#fd, this.#pending.join(''))
    this.#pending = []
  }
}
