// A guest that behaves like Firecracker restoring a snapshot with a Uffd memory backend: maps
// guest memory, registers it (MISSING, with UFFD_EVENT_REMOVE), connects to the handler and
// sends the region JSON with its uffd attached, then touches every page in plain JavaScript
// (from its main thread, or from worker threads with `threads` > 1), verifies every byte
// against the snapshot file, MADV_DONTNEEDs a range and checks that it reads zeros afterwards.
//
// It is a separate process from the handler, so its threads may fault: the handler, elsewhere,
// resolves them. It hands its uffd over and closes its own copy, so if the handler goes away
// the kernel releases the registration and the guest reads zeros (reported as mismatches)
// instead of waiting forever.
//
// Run as a child process: `node guest.js '<GuestOptions JSON>'`. With an IPC channel
// (child_process.fork) it sends progress and then its result as messages; without one it
// prints the result as one line of JSON. Either way it ends by itself (no process.exit).
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as path from 'node:path'
import { Worker } from 'node:worker_threads'
import { Userfaultfd } from '../../core/userfaultfd'
import { hugePageSize } from '../../core/mapping'
import { Feature, PAGE_SIZE } from '../../core/constants'
import { sendFds } from '../../ipc/fd-passing'
import { LatencyHistogram, type HistogramJSON } from '../../util/histogram'
import {
  Counter,
  RegionOwner,
  type MappedRegion,
  type RegionSpec,
  type TouchResult,
  type VerifyResult,
  type ZeroResult,
} from './guest-memory'
import type { WorkerData, WorkerHello, WorkerReply, WorkerRequest } from './guest-worker'

export interface GuestOptions {
  socket: string
  memFile: string
  /** guest memory size in bytes (default: the whole file) */
  size?: number
  /**
   * split guest memory into at least this many regions (default 1), each its own mapping; there
   * are also at least `threads` regions, and none is larger than 1 GiB
   */
  regions?: number
  /** file offset of the first region (default 0) */
  offset?: number
  /** send page_size_kib only, as older Firecracker versions do (in bytes, despite the name) */
  legacyPageSize?: boolean
  /** threads touching pages (default 1: the main thread; N > 1: N worker threads) */
  threads?: number
  /** touch every `stride`-th page only (default 1: all) */
  stride?: number
  /** bytes to MADV_DONTNEED (from the start of the first region) and expect zeros in, after */
  dontneed?: number
  /** back guest memory with huge pages (MAP_HUGETLB): regions get page_size = the huge page size */
  hugetlb?: boolean
  /** back guest memory with a shared memfd (MFD_HUGETLB with `hugetlb`) instead of anonymous memory */
  memfd?: boolean
  /** SIGKILL itself a few ms after the touching started (the "dies mid-stream" test) */
  dieMidway?: boolean
}

export interface GuestResult {
  pid: number
  pages: number
  regions: number
  threads: number
  touched: number
  verifiedBytes: number
  mismatches: number
  zeroChecked: number
  zeroMismatches: number
  elapsedMs: number
  /** latency of each touch seen by the touching threads (a LatencyHistogram, ns) */
  latency: HistogramJSON
}

export type GuestPhase = 'touch' | 'verify'

/** Messages a guest sends over its IPC channel. */
export type GuestMessage =
  | { type: 'progress'; phase: GuestPhase; done: number; total: number }
  | { type: 'result'; result: GuestResult }
  | { type: 'error'; message: string }

/** No region is larger than this: a Mapping's ArrayBuffer is limited to 4 GiB. */
const MAX_REGION = 1 << 30
const PROGRESS_MS = 250

/** The thread(s) owning guest memory: the main thread, or a worker. */
interface Owner {
  regions: MappedRegion[]
  touch(): Promise<TouchResult>
  verify(memFile: string): Promise<VerifyResult>
  zeros(index: number, length: number): Promise<ZeroResult>
  close(): Promise<void>
}

function localOwner(specs: RegionSpec[], data: Omit<WorkerData, 'specs'>): Owner {
  const owner = new RegionOwner(specs, data)
  return {
    regions: owner.regions,
    touch: () => owner.touch(),
    verify: (memFile) => owner.verify(memFile),
    zeros: async (index, length) => owner.zeros(index, length),
    close: async () => owner.close(),
  }
}

async function workerOwner(specs: RegionSpec[], data: Omit<WorkerData, 'specs'>): Promise<Owner> {
  const worker = new Worker(path.join(__dirname, 'guest-worker.js'), {
    workerData: { ...data, specs } satisfies WorkerData,
  })
  const exited = new Promise<number>((resolve) => worker.once('exit', resolve))
  const hello = await new Promise<WorkerHello>((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
    void exited.then((code) => reject(new Error(`guest worker exited (${code}) before mapping its memory`)))
  })
  if (hello.op === 'failed') throw new Error(`guest worker: ${hello.error}`)
  let nextId = 1
  const waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>()
  worker.on('message', (reply: WorkerReply) => {
    const w = waiting.get(reply.id)
    waiting.delete(reply.id)
    if (reply.ok) w?.resolve(reply.value)
    else w?.reject(new Error(`guest worker: ${reply.error}`))
  })
  const failAll = (err: Error): void => {
    for (const w of waiting.values()) w.reject(err)
    waiting.clear()
  }
  worker.on('error', failAll)
  void exited.then((code) => failAll(new Error(`guest worker exited (${code}) with requests pending`)))
  const ask = <T>(request: Omit<WorkerRequest, 'id'>): Promise<T> =>
    new Promise((resolve, reject) => {
      const id = nextId++
      waiting.set(id, { resolve: resolve as (v: unknown) => void, reject })
      worker.postMessage({ ...request, id })
    })
  return {
    regions: hello.regions,
    touch: () => ask<TouchResult>({ op: 'touch' }),
    verify: (memFile) => ask<VerifyResult>({ op: 'verify', memFile } as Omit<WorkerRequest, 'id'>),
    zeros: (index, length) => ask<ZeroResult>({ op: 'zeros', index, length } as Omit<WorkerRequest, 'id'>),
    close: async () => {
      worker.postMessage({ op: 'close', id: 0 } satisfies WorkerRequest)
      await exited
    },
  }
}

/** Splits `size` bytes into regions of whole pages: at least `minimum`, none above MAX_REGION. */
export function planRegions(size: number, minimum: number, pageSize: number, offset: number): RegionSpec[] {
  const count = Math.max(minimum, Math.ceil(size / MAX_REGION))
  const per = Math.floor(size / count / pageSize) * pageSize
  if (per === 0) throw new RangeError(`${size} bytes cannot make ${count} regions of whole ${pageSize}-byte pages`)
  return Array.from({ length: count }, (_, index) => ({ index, length: per, offset: offset + index * per }))
}

/** Runs the guest; `progress` is called a few times a second while pages are touched and verified. */
export async function runGuest(
  options: GuestOptions,
  progress: (phase: GuestPhase, done: number, total: number) => void = () => {},
): Promise<GuestResult> {
  const fileSize = fs.statSync(options.memFile).size
  const offset = options.offset ?? 0
  const size = options.size ?? fileSize - offset
  const threads = options.threads ?? 1
  const stride = options.stride ?? 1
  const pageSize = options.hugetlb ? hugePageSize() : PAGE_SIZE
  const specs = planRegions(size, Math.max(options.regions ?? 1, threads), pageSize, offset)
  const counters = new SharedArrayBuffer(Counter.size * 4)
  const count = new Int32Array(counters)
  const data = { hugetlb: options.hugetlb === true, memfd: options.memfd === true, stride, counters }

  const owners: Owner[] = []
  try {
    if (threads === 1) owners.push(localOwner(specs, data))
    else {
      const shares = Array.from({ length: threads }, (_, t) => specs.filter((s) => s.index % threads === t))
      owners.push(...(await Promise.all(shares.map((share) => workerOwner(share, data)))))
    }
    const regions = owners.flatMap((o) => o.regions).sort((a, b) => a.index - b.index)

    // Register, hand the uffd over with the region JSON, and close this process's copy.
    const uffd = Userfaultfd.open({ features: Feature.EVENT_REMOVE })
    try {
      for (const r of regions) uffd.register({ address: r.address, length: r.length }, { missing: true })
      const body = regions.map((r) => ({
        base_host_virt_addr: Number(r.address),
        size: r.length,
        offset: specs[r.index].offset,
        page_size_kib: pageSize,
        ...(options.legacyPageSize ? {} : { page_size: pageSize }),
      }))
      const socket = net.connect(options.socket)
      socket.pause()
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve)
        socket.once('error', reject)
      })
      await sendFds(socket, JSON.stringify(body), uffd)
      socket.destroy()
    } finally {
      uffd.close()
    }

    const pagesPerRegion = Math.ceil(specs[0].length / (PAGE_SIZE * stride))
    const total = pagesPerRegion * specs.length
    const report = (phase: GuestPhase, slot: number): NodeJS.Timeout => {
      const timer = setInterval(() => progress(phase, Atomics.load(count, slot), total), PROGRESS_MS)
      timer.unref()
      return timer
    }

    progress('touch', 0, total)
    let timer = report('touch', Counter.touched)
    const start = performance.now()
    const touching = Promise.all(owners.map((o) => o.touch()))
    if (options.dieMidway) {
      // Faults in flight on the touching threads while the process dies.
      setTimeout(() => process.kill(process.pid, 'SIGKILL'), 5)
      await new Promise(() => {})
    }
    const touched = await touching
    const elapsedMs = performance.now() - start
    clearInterval(timer)
    progress('touch', total, total)

    progress('verify', 0, total)
    timer = report('verify', Counter.verified)
    const verified = await Promise.all(owners.map((o) => o.verify(options.memFile)))
    clearInterval(timer)
    progress('verify', total, total)

    let zeros: ZeroResult = { zeroChecked: 0, zeroMismatches: 0 }
    if (options.dontneed !== undefined && options.dontneed > 0) zeros = await owners[0].zeros(0, options.dontneed)

    const latency = new LatencyHistogram()
    for (const t of touched) latency.merge(t.latency)
    return {
      pid: process.pid,
      pages: Math.ceil((specs[0].length * specs.length) / PAGE_SIZE),
      regions: specs.length,
      threads,
      touched: touched.reduce((n, t) => n + t.touched, 0),
      verifiedBytes: verified.reduce((n, v) => n + v.verifiedBytes, 0),
      mismatches: verified.reduce((n, v) => n + v.mismatches, 0),
      ...zeros,
      elapsedMs,
      latency: latency.toJSON(),
    }
  } finally {
    await Promise.all(owners.map((o) => o.close()))
  }
}

function main(): void {
  const send = process.send?.bind(process)
  const finish = (message: GuestMessage, code: number): void => {
    process.exitCode = code
    if (send) send(message, () => process.disconnect())
    else if (message.type === 'result') process.stdout.write(`${JSON.stringify(message.result)}\n`)
    else if (message.type === 'error') process.stderr.write(`guest: ${message.message}\n`)
  }
  let options: GuestOptions
  try {
    options = JSON.parse(process.argv[2] ?? '') as GuestOptions
  } catch (err) {
    finish({ type: 'error', message: `bad options JSON (${(err as Error).message}): ${process.argv[2]}` }, 2)
    return
  }
  // The parent went away: nobody is left to report to.
  process.once('disconnect', () => {
    if (process.exitCode === undefined) process.kill(process.pid, 'SIGKILL')
  })
  const onProgress = send
    ? (phase: GuestPhase, done: number, total: number) => send({ type: 'progress', phase, done, total })
    : undefined
  runGuest(options, onProgress).then(
    (result) => finish({ type: 'result', result }, result.mismatches === 0 && result.zeroMismatches === 0 ? 0 : 1),
    (err: Error) => finish({ type: 'error', message: err.stack ?? String(err) }, 2),
  )
}

if (require.main === module) main()
