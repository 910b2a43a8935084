// `userfaultfd demo`: the package's main job end to end. Writes a memory snapshot file, starts
// the Firecracker-compatible handler, and spawns a child process that does what Firecracker
// does on snapshot restore with a Uffd backend: maps guest memory, registers it (MISSING +
// EVENT_REMOVE), hands its uffd over the socket with the region JSON, then touches every page
// (served lazily, one fault at a time), verifies every byte against the snapshot, and
// MADV_DONTNEEDs a range that must read back as zeros.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { spawn } from 'node:child_process'
import { FirecrackerHandler } from '../../firecracker/handler'
import { writeSnapshot } from './snapshot'
import type { GuestResult } from './guest'
import { PAGE_SIZE } from '../../core/constants'

export interface DemoArgs {
  sizeMiB: number
  threads: number
  json: boolean
  timeoutMs: number
}

function histogram(values: number[]): Array<[string, number]> {
  const buckets = new Map<number, number>()
  for (const v of values) {
    const b = v < 1 ? 0 : Math.floor(Math.log2(v)) + 1
    buckets.set(b, (buckets.get(b) ?? 0) + 1)
  }
  return [...buckets.keys()]
    .sort((a, b) => a - b)
    .map((b) => [b === 0 ? '<1' : `${2 ** (b - 1)}-${2 ** b}`, buckets.get(b)!])
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

function runChild(script: string, options: object, timeoutMs: number): Promise<GuestResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, JSON.stringify(options)], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.on('data', (d) => {
      out += d
    })
    child.stderr.on('data', (d) => {
      err += d
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      try {
        resolve(JSON.parse(out) as GuestResult)
      } catch {
        reject(new Error(`guest exited (${signal ?? code}) without a result: ${err.trim()}`))
      }
    })
  })
}

export async function demo(args: DemoArgs): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'userfaultfd-demo-'))
  const memFile = path.join(dir, 'snapshot.mem')
  const socket = path.join(dir, 'uffd.sock')
  const size = args.sizeMiB * 1048576
  const log = (msg: string): void => {
    if (!args.json) process.stdout.write(`${msg}\n`)
  }
  let handler: FirecrackerHandler | undefined
  try {
    log(`snapshot: ${memFile} (${args.sizeMiB} MiB, every word encodes its offset)`)
    writeSnapshot(memFile, size)
    handler = await FirecrackerHandler.listen({ socketPath: socket, memFile, onRemove: 'zero' })
    log(`handler: listening on ${socket}`)
    const dontneed = Math.min(size, 1048576)
    log(
      `guest: child process maps ${args.sizeMiB} MiB, registers MISSING + EVENT_REMOVE, sends its uffd, touches every page from ${args.threads} thread(s)`,
    )
    const script = path.join(__dirname, 'guest.js')
    const started = performance.now()
    const result = await runChild(script, { socket, memFile, threads: args.threads, dontneed }, args.timeoutMs)
    const wall = performance.now() - started
    await new Promise((r) => setTimeout(r, 20)) // let the handler see the end
    const stats = handler.stats()
    const sorted = [...result.latencyUs].sort((a, b) => a - b)
    const ok = result.mismatches === 0 && result.zeroMismatches === 0 && result.verifiedBytes === size
    const summary = {
      ok,
      sizeBytes: size,
      pages: result.pages,
      pagesFaulted: stats.faults,
      pagesServed: stats.pagesServed,
      zeroPages: stats.zeroPages,
      removes: stats.removes,
      verifiedBytes: result.verifiedBytes,
      mismatches: result.mismatches,
      zeroChecked: result.zeroChecked,
      zeroMismatches: result.zeroMismatches,
      touchMs: result.elapsedMs,
      wallMs: wall,
      mibPerSec: size / 1048576 / (result.elapsedMs / 1000),
      faultLatencyUs: {
        p50: percentile(sorted, 0.5),
        p90: percentile(sorted, 0.9),
        p99: percentile(sorted, 0.99),
        max: sorted[sorted.length - 1] ?? 0,
      },
      faultLatencyHistogramUs: Object.fromEntries(histogram(result.latencyUs)),
      pageSize: PAGE_SIZE,
    }
    if (args.json) {
      process.stdout.write(`${JSON.stringify(summary)}\n`)
    } else {
      log('')
      log(
        `pages faulted: ${summary.pagesFaulted} (${summary.pages} pages + ${summary.zeroChecked} after MADV_DONTNEED)`,
      )
      log(
        `pages served:  ${summary.pagesServed} from the snapshot, ${summary.zeroPages} zero pages after ${summary.removes} UFFD_EVENT_REMOVE`,
      )
      log(
        `verified:      ${(summary.verifiedBytes / 1048576).toFixed(1)} MiB, ${summary.mismatches} mismatching pages; ${summary.zeroChecked} pages read zero after DONTNEED (${summary.zeroMismatches} not)`,
      )
      log(
        `time:          ${summary.touchMs.toFixed(1)} ms touching (${summary.mibPerSec.toFixed(1)} MiB/s), ${summary.wallMs.toFixed(1)} ms wall with the child's start`,
      )
      log(
        `fault latency: p50 ${summary.faultLatencyUs.p50.toFixed(1)} us, p90 ${summary.faultLatencyUs.p90.toFixed(1)} us, p99 ${summary.faultLatencyUs.p99.toFixed(1)} us, max ${summary.faultLatencyUs.max.toFixed(1)} us`,
      )
      const hist = histogram(result.latencyUs)
      const peak = Math.max(...hist.map(([, n]) => n))
      for (const [label, n] of hist) {
        log(`  ${label.padStart(11)} us | ${'#'.repeat(Math.max(1, Math.round((n / peak) * 40)))} ${n}`)
      }
      log('')
      log(ok ? 'OK: every page matched the snapshot' : 'FAILED: see mismatches above')
    }
    return ok ? 0 : 1
  } finally {
    await handler?.close()
    fs.rmSync(dir, { recursive: true, force: true })
  }
}
