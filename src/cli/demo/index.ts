// `userfaultfd demo`: the package's main job end to end. Writes a memory snapshot file, starts
// the Firecracker-compatible handler, and forks a child process that does what Firecracker
// does on snapshot restore with a Uffd backend: maps guest memory, registers it (MISSING +
// EVENT_REMOVE), hands its uffd over the socket with the region JSON, then touches every page
// (served lazily, one fault at a time), verifies every byte against the snapshot, and
// MADV_DONTNEEDs a range that must read back as zeros. The child reports progress and its
// result (a latency histogram, not raw samples) over IPC. SIGINT/SIGTERM stop everything and
// remove the temporary files.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { fork, type ChildProcess } from 'node:child_process'
import { FirecrackerHandler } from '../../firecracker/handler'
import { PAGE_SIZE } from '../../core/constants'
import { LatencyHistogram } from '../../util/histogram'
import { Progress } from '../progress'
import { writeSnapshotAsync } from './snapshot'
import type { GuestMessage, GuestOptions, GuestPhase, GuestResult } from './guest'

export interface DemoArgs {
  sizeMiB: number
  threads: number
  json: boolean
  /** give up after this long (ms); undefined: no limit (the stall check still applies) */
  timeoutMs?: number
  /** give up when the guest reports no progress for this long (ms), default 30 s */
  stallMs?: number
  /** where the temporary directory goes (default os.tmpdir()) */
  tmpdir?: string
}

export interface DemoSummary {
  ok: boolean
  sizeBytes: number
  pages: number
  regions: number
  threads: number
  /** fault messages the handler read (fault-around fills several pages per fault) */
  faults: number
  /** the old name of `faults` (it counted pages when every fault filled one) */
  pagesFaulted: number
  pagesServed: number
  zeroPages: number
  removes: number
  verifiedBytes: number
  mismatches: number
  zeroChecked: number
  zeroMismatches: number
  touchMs: number
  wallMs: number
  mibPerSec: number
  faultLatencyUs: { p50: number; p90: number; p99: number; max: number }
  faultLatencyHistogramUs: Record<string, number>
  pageSize: number
}

class Stopped extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super(`stopped by ${signal}`)
  }
}

/** Forks the guest; resolves with its result, rejects with why it gave none. */
function runChild(
  options: GuestOptions,
  limits: { timeoutMs?: number; stallMs: number; signal: AbortSignal },
  onProgress: (phase: GuestPhase, done: number, total: number) => void,
): Promise<GuestResult> {
  return new Promise((resolve, reject) => {
    const script = path.join(__dirname, 'guest.js')
    const child: ChildProcess = fork(script, [JSON.stringify(options)], {
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      execArgv: [],
    })
    let stderr = ''
    let result: GuestResult | undefined
    let failure: string | undefined
    child.stderr!.on('data', (d) => {
      stderr += d
    })
    const kill = (why: string): void => {
      failure ??= why
      child.kill('SIGKILL')
    }
    let stall = setTimeout(() => kill(`the guest made no progress for ${limits.stallMs / 1000} s`), limits.stallMs)
    const limit =
      limits.timeoutMs === undefined
        ? undefined
        : setTimeout(() => kill(`timed out after ${limits.timeoutMs} ms`), limits.timeoutMs)
    const onAbort = (): void => kill('stopped')
    limits.signal.addEventListener('abort', onAbort, { once: true })
    child.on('message', (m: GuestMessage) => {
      clearTimeout(stall)
      stall = setTimeout(() => kill(`the guest made no progress for ${limits.stallMs / 1000} s`), limits.stallMs)
      if (m.type === 'progress') onProgress(m.phase, m.done, m.total)
      else if (m.type === 'result') result = m.result
      else failure = m.message
    })
    child.on('close', (code, signal) => {
      clearTimeout(stall)
      if (limit) clearTimeout(limit)
      limits.signal.removeEventListener('abort', onAbort)
      if (limits.signal.aborted) reject(limits.signal.reason)
      else if (result !== undefined) resolve(result)
      else
        reject(
          new Error(
            `the guest (pid ${child.pid}) exited (${signal ?? `code ${code}`}) without a result${failure ? `: ${failure}` : ''}${stderr.trim() ? `\n${stderr.trim()}` : ''}`,
          ),
        )
    })
  })
}

function summarize(size: number, result: GuestResult, handler: FirecrackerHandler, wallMs: number): DemoSummary {
  const stats = handler.stats()
  const latency = LatencyHistogram.fromJSON(result.latency)
  const us = (q: number): number => latency.quantile(q) / 1000
  return {
    ok: result.mismatches === 0 && result.zeroMismatches === 0 && result.verifiedBytes === result.pages * PAGE_SIZE,
    sizeBytes: size,
    pages: result.pages,
    regions: result.regions,
    threads: result.threads,
    faults: stats.faults,
    pagesFaulted: stats.faults,
    pagesServed: stats.pagesServed,
    zeroPages: stats.zeroPages,
    removes: stats.removes,
    verifiedBytes: result.verifiedBytes,
    mismatches: result.mismatches,
    zeroChecked: result.zeroChecked,
    zeroMismatches: result.zeroMismatches,
    touchMs: result.elapsedMs,
    wallMs,
    mibPerSec: (result.pages * PAGE_SIZE) / 1048576 / (result.elapsedMs / 1000),
    faultLatencyUs: { p50: us(0.5), p90: us(0.9), p99: us(0.99), max: us(1) },
    faultLatencyHistogramUs: Object.fromEntries(latency.powersOfTwoUs()),
    pageSize: PAGE_SIZE,
  }
}

function printSummary(s: DemoSummary, latency: LatencyHistogram, log: (msg: string) => void): void {
  log('')
  log(
    `faults:        ${s.faults} for ${s.pages} pages + ${s.zeroChecked} after MADV_DONTNEED (each fault fills the missing pages around it)`,
  )
  log(
    `pages served:  ${s.pagesServed} from the snapshot, ${s.zeroPages} zero pages after ${s.removes} UFFD_EVENT_REMOVE`,
  )
  log(
    `verified:      ${(s.verifiedBytes / 1048576).toFixed(1)} MiB, ${s.mismatches} mismatching pages; ${s.zeroChecked} pages read zero after DONTNEED (${s.zeroMismatches} not)`,
  )
  log(
    `time:          ${s.touchMs.toFixed(1)} ms touching (${s.mibPerSec.toFixed(1)} MiB/s), ${s.wallMs.toFixed(1)} ms wall with the child's start`,
  )
  log(
    `fault latency: p50 ${s.faultLatencyUs.p50.toFixed(1)} us, p90 ${s.faultLatencyUs.p90.toFixed(1)} us, p99 ${s.faultLatencyUs.p99.toFixed(1)} us, max ${s.faultLatencyUs.max.toFixed(1)} us (touch latency seen by the guest, ~9% buckets)`,
  )
  const hist = latency.powersOfTwoUs()
  const peak = Math.max(...hist.map(([, n]) => n))
  const width = Math.max(11, ...hist.map(([label]) => label.length))
  for (const [label, n] of hist) {
    log(`  ${label.padStart(width)} us | ${'#'.repeat(Math.max(1, Math.round((n / peak) * 40)))} ${n}`)
  }
  log('')
  log(s.ok ? 'OK: every page matched the snapshot' : 'FAILED: see mismatches above')
}

/** Stops on SIGINT/SIGTERM (the temporary files are removed); returns the undo. */
function stopOnSignals(controller: AbortController): () => void {
  const onSignal = (signal: NodeJS.Signals): void => controller.abort(new Stopped(signal))
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)
  return () => {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

export async function demo(args: DemoArgs): Promise<number> {
  const controller = new AbortController()
  const { signal } = controller
  const undoSignals = stopOnSignals(controller)
  const dir = fs.mkdtempSync(path.join(args.tmpdir ?? os.tmpdir(), 'userfaultfd-demo-'))
  const memFile = path.join(dir, 'snapshot.mem')
  const socket = path.join(dir, 'uffd.sock')
  const size = args.sizeMiB * 1048576
  const pages = size / PAGE_SIZE
  const human = !args.json
  const log = (msg: string): void => {
    if (human) process.stdout.write(`${msg}\n`)
  }
  const progress = (label: string, total: number, unit: 'bytes' | 'count', noun = ''): Progress | undefined =>
    human ? new Progress(process.stderr, label, total, { unit, noun }) : undefined
  let handler: FirecrackerHandler | undefined
  let stoppedBy: NodeJS.Signals | undefined
  try {
    log(`snapshot: ${memFile} (${args.sizeMiB} MiB, every word encodes its offset)`)
    const writing = progress('writing snapshot', size, 'bytes')
    await writeSnapshotAsync(memFile, size, { signal, onProgress: (b) => writing?.update(b) })
    writing?.end()
    handler = await FirecrackerHandler.listen({ socketPath: socket, memFile, onRemove: 'zero' })
    log(`handler: listening on ${socket}`)
    log(
      `guest: child process maps ${args.sizeMiB} MiB, registers MISSING + EVENT_REMOVE, sends its uffd, touches every page from ${args.threads} thread(s)`,
    )
    const phases: Partial<Record<GuestPhase, Progress>> = {}
    const labels: Record<GuestPhase, string> = { touch: 'touching pages (faults)', verify: 'verifying pages' }
    const started = performance.now()
    const result = await runChild(
      { socket, memFile, threads: args.threads, dontneed: Math.min(size, 1048576) },
      { timeoutMs: args.timeoutMs, stallMs: args.stallMs ?? 30_000, signal },
      (phase, done, total) => {
        if (!human) return
        if (phase === 'verify') phases.touch?.end()
        phases[phase] ??= progress(labels[phase], total, 'count', 'pages')
        if (done >= total) phases[phase]?.end(done)
        else phases[phase]?.update(done)
      },
    )
    const wall = performance.now() - started
    // The guest's last fault was served before it could verify; give the handler's bookkeeping
    // of the final REMOVE and zero pages a moment (they were read before the guest's madvise returned).
    await new Promise((r) => setTimeout(r, 20))
    const summary = summarize(size, result, handler, wall)
    if (summary.pages !== pages) log(`guest memory: ${summary.pages} pages (${summary.regions} regions of whole pages)`)
    if (args.json) process.stdout.write(`${JSON.stringify(summary)}\n`)
    else printSummary(summary, LatencyHistogram.fromJSON(result.latency), log)
    return summary.ok ? 0 : 1
  } catch (err) {
    if (!signal.aborted) throw err
    stoppedBy = (signal.reason as Stopped).signal
  } finally {
    undoSignals()
    await handler?.close()
    fs.rmSync(dir, { recursive: true, force: true })
  }
  if (human) process.stderr.write(`\nuserfaultfd demo: stopped by ${stoppedBy}; temporary files removed\n`)
  return stoppedBy === 'SIGTERM' ? 143 : 130
}
