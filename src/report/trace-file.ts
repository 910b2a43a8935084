// Reads a fault trace (FaultServer { trace }, `serve --trace`: Chrome trace-event JSON) back
// into fault records for `userfaultfd report`, refusing anything else with a message that says
// what the file is instead. A trace whose writer was killed before it closed the file lacks its
// last line: it is read as far as it goes, and said to be incomplete.
import * as fs from 'node:fs'
import { FAULT_KINDS, type FaultKind, TRACE_CATEGORY } from '../engines/fault-trace'

export interface TracedFault {
  kind: FaultKind
  address: bigint
  /** start, µs (CLOCK_MONOTONIC) */
  ts: number
  /** the wait (demand, zero) or the fill's duration (around, prefetch), µs */
  dur: number
  bytes: number
  /** the faulting thread (0: unknown) */
  tid: number
}

export interface FaultTraceData {
  faults: TracedFault[]
  /** records the engine could not buffer (otherData.dropped) */
  dropped: number
  /** the file ended before the trace's end (its writer did not close it) */
  incomplete: boolean
}

/** Not a fault trace: the message says why (a usage error for the CLI). */
export class TraceFileError extends Error {
  override readonly name = 'TraceFileError'
}

const TRACE_START = /^\s*\{\s*"traceEvents"\s*:\s*\[/

function parse(text: string, file: string): { json: unknown; incomplete: boolean } {
  try {
    return { json: JSON.parse(text), incomplete: false }
  } catch (err) {
    // Cut short: complete the array at the last whole event.
    if (TRACE_START.test(text)) {
      const cut = text.lastIndexOf('}')
      try {
        return { json: JSON.parse(`${text.slice(0, cut + 1)}]}`), incomplete: true }
      } catch {
        /* not that either */
      }
    }
    throw new TraceFileError(`${file} is not a trace-event file: it is not JSON (${(err as Error).message})`)
  }
}

/** The fault events of trace-event JSON `text` (`file` names it in errors). */
export function parseFaultTrace(text: string, file: string): FaultTraceData {
  const { json, incomplete } = parse(text, file)
  // The trace-event format is an object with traceEvents, or a bare array of events.
  const events = Array.isArray(json)
    ? json
    : json !== null && typeof json === 'object'
      ? (json as { traceEvents?: unknown }).traceEvents
      : undefined
  if (!Array.isArray(events))
    throw new TraceFileError(`${file} is not a trace-event file: JSON without a traceEvents array`)
  const faults: TracedFault[] = []
  for (const e of events as Array<Record<string, unknown>>) {
    if (e === null || typeof e !== 'object' || e.cat !== TRACE_CATEGORY || e.ph !== 'X') continue
    const args = (e.args ?? {}) as Record<string, unknown>
    const kind = args.kind as FaultKind
    if (!FAULT_KINDS.includes(kind) || typeof e.ts !== 'number' || typeof e.dur !== 'number') continue
    if (typeof args.address !== 'string' || !/^0x[0-9a-f]+$/i.test(args.address)) continue
    faults.push({
      kind,
      address: BigInt(args.address),
      ts: e.ts,
      dur: e.dur,
      bytes: typeof args.bytes === 'number' ? args.bytes : 0,
      tid: typeof args.tid === 'number' ? args.tid : 0,
    })
  }
  const other = (!Array.isArray(json) && (json as { otherData?: Record<string, unknown> }).otherData) || {}
  const ours =
    other.producer === 'userfaultfd' ||
    events.some((e) => (e as { args?: { name?: unknown } } | null)?.args?.name === 'userfaultfd faults')
  if (faults.length === 0 && events.length > 0 && !ours)
    throw new TraceFileError(
      `${file} is a trace-event file with no userfaultfd fault events (${events.length} other events); record one with FaultServer({ trace }) or serve --trace`,
    )
  faults.sort((a, b) => a.ts - b.ts)
  return { faults, dropped: typeof other.dropped === 'number' ? other.dropped : 0, incomplete }
}

/** Reads and parses a fault trace file. */
export function readFaultTrace(file: string): FaultTraceData {
  let text: string
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new TraceFileError(
      `${file}: ${code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'a directory, not a trace file' : code}`,
    )
  }
  return parseFaultTrace(text, file)
}
