// MigrationSource: the end that has the memory (its workload runs until the stop hook). It
// connects to a MigrationTarget, sends the memory in pre-copy rounds while the workload runs
// (DirtyTracker finds what was written since the last round), stops the workload, and then
// either sends the last dirty pages (pre-copy) or lets the target run at once and serves the
// pages still to come on demand while pushing them in the background (post-copy). The per-page
// work runs on native threads (native/engine/migration_source.cc); this class drives the phases.
import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import type * as tls from 'node:tls'
import type { MigrationNotice, MigrationSourceHandle } from '../addon/binding'
import { native } from '../addon/native'
import { PAGE_SIZE } from '../core/constants'
import { Mapping } from '../core/mapping'
import { toRange } from '../core/range'
import { choice, describe, optionalInt } from '../util/validate'
import { resolveSecret, type SecretOptions } from './auth'
import { DirtyTracker } from '../engines/dirty-tracker'
import { checkTracking, type DirtyTracking } from './dirty'
import { type Control, decodeControl, finite, type MigrationResult, type Phase, sleep } from './common'
import { DEFAULT_POSTCOPY_PRIORITY, POSTCOPY_PRIORITIES, type PostcopyPriority, postcopyTuning } from './common'
import {
  type AnySocket,
  dial,
  type MigrationEndpoint,
  FrameConn,
  handOver,
  parseEndpoint,
  sourceHandshake,
} from './transport'
import {
  type ChannelKind,
  encodeJson,
  encodeRuns,
  FrameType,
  type MemoryKind,
  type MigrationMode,
  type PageRun,
  ProtocolError,
  type MigrationRangeInfo,
  runsArray,
} from './wire'

export interface MigrationRange {
  address: bigint
  length: number
  /** what backs it (default 'anonymous'; a Mapping says so itself) */
  kind?: MemoryKind
}

export interface MigrationSourceOptions extends SecretOptions {
  /** the memory to migrate: Mappings, or ranges of this process's memory */
  ranges: ReadonlyArray<Mapping | MigrationRange>
  /** the target: 'HOST:PORT' or { host, port } */
  to: string | MigrationEndpoint
  /** TLS (node:tls connect options; true: TLS with the system's CAs) */
  tls?: tls.ConnectionOptions | boolean
  /** 'hybrid' (default: pre-copy rounds, then post-copy), 'precopy' or 'postcopy' */
  mode?: MigrationMode
  /** pauses the workload that writes the memory (called once, awaited); the downtime starts here */
  stop: () => unknown
  /** lets the workload run again if the migration fails before the target took over */
  resume?: () => unknown
  /** pre-copy ends when the dirty pages left would take at most this long to send (ms, default 20) */
  maxDowntime?: number
  /** pre-copy rounds at most (default 30) */
  maxRounds?: number
  /** send per-page hashes at the end so that the target checks every page (default false) */
  verify?: boolean | { maskOffset: number; maskLength: number }
  /** handed to the target's 'setup' event (JSON) */
  metadata?: unknown
  /** post-copy background push limit, bytes/s (default 0: none); demand pages are never limited */
  postcopyBandwidth?: number
  /** bytes per page frame (default 256 KiB) */
  chunkSize?: number
  /** a PING when a channel was idle this long (ms, default 100) */
  heartbeatIntervalMs?: number
  /** a channel silent this long is lost (ms, default 1000) */
  heartbeatTimeoutMs?: number
  /** give up reconnecting after this long (ms, default 30000) */
  reconnectTimeoutMs?: number
  /** handshake and connect timeout (ms, default 10000) */
  connectTimeoutMs?: number
  /**
   * Post-copy, at both ends: 'latency' (default) keeps demand faults from waiting behind the push
   * (short socket queues for the push; the demand path's threads SCHED_FIFO and the push's nice
   * -10 where permitted, CAP_SYS_NICE); 'throughput' pushes as fast as it can and a demand fault
   * waits behind the push (milliseconds). See docs/migration.md "Numbers".
   */
  postcopyPriority?: PostcopyPriority
  /**
   * How pre-copy finds the pages written since the last round: 'auto' (default) is 'async' where
   * the kernel has WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+: writes never block), 'sync' otherwise
   * (write protection: the first write to a page in each round waits for one WP fault).
   */
  dirtyTracking?: DirtyTracking
}

export interface SourceProgress {
  phase: Phase
  round: number
  pagesTotal: number
  /** pages sent in pre-copy so far (re-sends included) */
  pagesSent: number
  /** post-copy: pages pushed and sent on demand */
  pagesPushed: number
  pagesDemanded: number
  /** post-copy: pages still to send */
  pagesLeft: number
  bytesPerSecond: number
  /** estimated time to the end of the current round or of the push (ms) */
  etaMs: number
  wireBytes: number
}

export interface RoundInfo {
  round: number
  pages: number
  ms: number
  /** pages written during this round (sent in the next one, or after the stop) */
  dirtyPages: number
  bytesPerSecond: number
  /** time the dirty pages would take to send at this round's rate (ms) */
  estimatedMs: number
}

interface Range {
  address: bigint
  length: number
  pageSize: number
  kind: MemoryKind
  pages: number
  target: Mapping | MigrationRange
}

const ECANCELED = 125

const Handle = native.MigrationSourceHandle

/** When a control message was read off the socket (by the native reader), on performance.now()'s clock. */
const RECEIVED = new WeakMap<Control, number>()

/** A CLOCK_MONOTONIC time in ns (native) on performance.now()'s clock (the same clock, another origin). */
function perfTime(ns: bigint): number {
  return performance.now() - Number(process.hrtime.bigint() - ns) / 1e6
}

function receivedAt(c: Control): number {
  return RECEIVED.get(c) ?? performance.now()
}

/** The union of two run lists, each in (range, page) order: a linear merge (runs in the downtime). */
function mergeRuns(a: PageRun[], b: PageRun[]): PageRun[] {
  const out: PageRun[] = []
  const before = (x: PageRun, y: PageRun): boolean => x.range < y.range || (x.range === y.range && x.page <= y.page)
  let i = 0
  let j = 0
  while (i < a.length || j < b.length) {
    const r = j >= b.length || (i < a.length && before(a[i], b[j])) ? a[i++] : b[j++]
    const last = out[out.length - 1]
    if (last !== undefined && last.range === r.range && r.page <= last.page + last.count) {
      last.count = Math.max(last.count, r.page + r.count - last.page)
    } else {
      out.push({ range: r.range, page: r.page, count: r.count })
    }
  }
  return out
}

function rangesOf(list: unknown): Range[] {
  if (!Array.isArray(list) || list.length === 0)
    throw new TypeError(`ranges must be a non-empty array of Mappings or { address, length } (got ${describe(list)})`)
  return list.map((item, i) => {
    const r = toRange(item, `ranges[${i}]`)
    let kind: MemoryKind = 'anonymous'
    let pageSize = PAGE_SIZE
    if (item instanceof Mapping) {
      kind = item.hugetlb ? 'hugetlb' : item.kind === 'memfd' ? 'shmem' : 'anonymous'
      pageSize = item.pageSize
    } else {
      kind = choice((item as MigrationRange).kind, `ranges[${i}].kind`, ['anonymous', 'shmem', 'hugetlb'], 'anonymous')
      if (kind === 'hugetlb') pageSize = 2 * 1024 * 1024
    }
    if (r.length % pageSize !== 0 || r.address % BigInt(pageSize) !== 0n)
      throw new RangeError(`ranges[${i}] must be aligned to its page size (${pageSize})`)
    return { address: r.address, length: r.length, pageSize, kind, pages: r.length / pageSize, target: item }
  })
}

export class MigrationSource extends EventEmitter {
  readonly mode: MigrationMode
  readonly #ranges: Range[]
  readonly #to: MigrationEndpoint
  readonly #tls: tls.ConnectionOptions | undefined
  readonly #secret: Buffer | null
  readonly #stop: () => unknown
  readonly #resume: (() => unknown) | undefined
  readonly #maxDowntime: number
  readonly #maxRounds: number
  readonly #verify: { maskOffset: number; maskLength: number } | null
  readonly #metadata: unknown
  readonly #pushRate: number
  readonly #chunk: number
  readonly #pingMs: number
  readonly #timeoutMs: number
  readonly #reconnectMs: number
  readonly #connectMs: number
  readonly #priority: PostcopyPriority
  readonly #session = randomBytes(16).toString('hex')
  readonly #pagesTotal: number
  readonly #bytes: number

  #handle: MigrationSourceHandle | undefined
  #phase: Phase = 'connecting'
  #started: Promise<MigrationResult> | undefined
  #closed = false
  #trackers: DirtyTracker[] = []
  readonly #dirtyTracking: DirtyTracking
  #round = 0
  #roundWaiters = new Map<number, { resolve: () => void; reject: (e: Error) => void }>()
  #controlWaiters: Array<{ t: string; resolve: (c: Control) => void }> = []
  #inbox: Control[] = []
  #failure: Error | undefined
  #failed: ((e: Error) => void) | undefined
  #switchoverSent = false
  #postcopyStarted = false
  #stopCalled = false
  #toCome: PageRun[] = []
  #reconnecting: Promise<void> | undefined
  #reconnects = 0
  #ticker: NodeJS.Timeout | undefined
  #relays: Array<() => void> = []
  #gens: Record<string, number> = { main: 0, demand: 0 }
  #lastProgress = { at: 0, sent: 0 }
  #rate = 0
  #roundPages = 0
  #roundStart = 0
  #targetStats: Record<string, unknown> = {}
  #verified: boolean | null = null
  #mismatches = 0
  #dirtyAtStop = 0
  #times = { start: 0, precopy: 0, stop: 0, switchover: 0, resumed: 0, done: 0 }
  #rttMs = 0
  /** where the downtime went (diagnostics) */
  #parts: {
    hookMs?: number
    collectMs?: number
    sendMs?: number
    sourceMs?: number
    rttMs?: number
    targetMs?: number
    target?: Record<string, number>
  } = {}
  /** the target's share of the downtime (switchover read to workload released), ms */
  #targetMs: number | undefined

  constructor(options: MigrationSourceOptions) {
    super()
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    this.#ranges = rangesOf(options.ranges)
    this.#to = parseEndpoint(options.to, 'to')
    this.#tls = options.tls === true ? {} : options.tls === false || options.tls === undefined ? undefined : options.tls
    if (this.#tls !== undefined && (this.#tls === null || typeof this.#tls !== 'object'))
      throw new TypeError(`tls must be true or node:tls connect options (got ${describe(options.tls)})`)
    this.#secret = resolveSecret(options)
    this.mode = choice(options.mode, 'mode', ['precopy', 'postcopy', 'hybrid'] as const, 'hybrid')
    if (typeof options.stop !== 'function') throw new TypeError('stop must be a function that pauses the workload')
    this.#stop = options.stop
    if (options.resume !== undefined && typeof options.resume !== 'function')
      throw new TypeError(`resume must be a function (got ${describe(options.resume)})`)
    this.#resume = options.resume
    this.#maxDowntime = optionalInt(options.maxDowntime, 'maxDowntime', 20, 0, 3_600_000)
    this.#maxRounds = optionalInt(options.maxRounds, 'maxRounds', 30, 1, 10_000)
    this.#dirtyTracking = choice(options.dirtyTracking, 'dirtyTracking', ['auto', 'async', 'sync'] as const, 'auto')
    const v = options.verify
    if (v === undefined || v === false) this.#verify = null
    else if (v === true) this.#verify = { maskOffset: 0, maskLength: 0 }
    else if (typeof v === 'object' && v !== null) {
      this.#verify = {
        maskOffset: optionalInt(v.maskOffset, 'verify.maskOffset', 0, 0, 2 ** 21),
        maskLength: optionalInt(v.maskLength, 'verify.maskLength', 0, 0, 2 ** 21),
      }
    } else throw new TypeError(`verify must be a boolean or { maskOffset, maskLength } (got ${describe(v)})`)
    this.#metadata = options.metadata
    if (options.metadata !== undefined && encodeJson(options.metadata).length > 16384)
      throw new RangeError('metadata must be JSON of at most 16 KiB')
    this.#pushRate = optionalInt(options.postcopyBandwidth, 'postcopyBandwidth', 0, 0, Number.MAX_SAFE_INTEGER)
    this.#chunk = optionalInt(options.chunkSize, 'chunkSize', 256 * 1024, PAGE_SIZE, 4 << 20)
    this.#pingMs = optionalInt(options.heartbeatIntervalMs, 'heartbeatIntervalMs', 100, 10, 60_000)
    this.#timeoutMs = optionalInt(options.heartbeatTimeoutMs, 'heartbeatTimeoutMs', 1000, 50, 600_000)
    this.#reconnectMs = optionalInt(options.reconnectTimeoutMs, 'reconnectTimeoutMs', 30_000, 0, 86_400_000)
    this.#connectMs = optionalInt(options.connectTimeoutMs, 'connectTimeoutMs', 10_000, 100, 600_000)
    this.#priority = choice(
      options.postcopyPriority,
      'postcopyPriority',
      POSTCOPY_PRIORITIES,
      DEFAULT_POSTCOPY_PRIORITY,
    )
    this.#pagesTotal = this.#ranges.reduce((n, r) => n + r.pages, 0)
    this.#bytes = this.#ranges.reduce((n, r) => n + r.length, 0)
    // A kernel that cannot track writes is refused here, before anything connects (and after
    // every option is checked: a bad option is a TypeError/RangeError on every kernel).
    if (this.mode !== 'postcopy') for (const r of this.#ranges) checkTracking(r.kind, this.#dirtyTracking)
  }

  get phase(): Phase {
    return this.#phase
  }

  /** Runs the migration; resolves when the target has every page (rejects on failure). */
  start(): Promise<MigrationResult> {
    if (this.#started === undefined) {
      this.#started = this.#run()
      this.#started.catch(() => {})
    }
    return this.#started
  }

  /** The completion promise (start() must have been called). */
  get done(): Promise<MigrationResult> {
    return this.start()
  }

  stats(): Record<string, number> {
    return this.#handle?.stats() ?? {}
  }

  /**
   * Stops everything: connections, threads, dirty tracking. A migration still running fails (its
   * `done` rejects); after the switchover the target is then left to its source-loss policy.
   */
  close(): void {
    if (this.#closed) return
    this.#closed = true
    if (this.#phase !== 'complete') this.#fail(new Error('the migration source was closed'))
    this.#teardown()
  }

  [Symbol.dispose](): void {
    this.close()
  }

  // ---- the phases ---------------------------------------------------------------------------

  async #run(): Promise<MigrationResult> {
    const failure = new Promise<never>((_, reject) => {
      this.#failed = reject
    })
    failure.catch(() => {})
    try {
      return await Promise.race([this.#migrate(), failure])
    } catch (err) {
      this.#setPhase('failed')
      const e = err instanceof Error ? err : new Error(String(err))
      if (this.#stopCalled && !this.#switchoverSent && this.#resume !== undefined) {
        // The target never took over: the workload carries on here.
        try {
          await this.#resume()
        } catch (resumeErr) {
          this.#emitError(resumeErr as Error)
        }
      }
      throw e
    } finally {
      this.#teardown()
    }
  }

  async #migrate(): Promise<MigrationResult> {
    this.#times.start = performance.now()
    this.#setPhase('connecting')
    this.#handle = new Handle(
      this.#ranges.map((r) => ({ address: r.address, length: r.length, pageSize: r.pageSize })),
      {
        pingMs: this.#pingMs,
        chunkBytes: this.#chunk,
        ...postcopyTuning(this.#priority, this.#chunk).source,
      },
      (notices) => this.#onNotices(notices),
    )
    this.#handle.setPushRate(this.#pushRate)
    await this.#connect('main', false)
    await this.#connect('demand', false)
    this.#ticker = setInterval(() => this.#tick(), this.#pingMs)
    this.#ticker.unref?.()

    let finalRuns: PageRun[] = []
    if (this.mode === 'postcopy') {
      await this.#stopWorkload()
      finalRuns = this.#ranges.map((r, i) => ({ range: i, page: 0, count: r.pages }))
    } else {
      for (const r of this.#ranges) {
        const range = r.target instanceof Mapping ? r.target : { address: r.address, length: r.length }
        const mode = checkTracking(r.kind, this.#dirtyTracking)
        this.#trackers.push(DirtyTracker.start(range, { memory: r.kind, mode, pageSize: r.pageSize }))
      }
      this.#setPhase('precopy')
      this.#times.precopy = performance.now()
      let runs: PageRun[] = this.#ranges.map((r, i) => ({ range: i, page: 0, count: r.pages }))
      let previous = Number.POSITIVE_INFINITY
      let growing = 0
      let converged = false
      const round = async (): Promise<boolean> => {
        const info = await this.#sendRound(runs)
        runs = this.#collect()
        const dirty = runs.reduce((n, r) => n + r.count, 0)
        const bytes = this.#pagesBytes(runs)
        info.dirtyPages = dirty
        info.estimatedMs = info.bytesPerSecond > 0 ? (bytes / info.bytesPerSecond) * 1000 : 0
        this.emit('round', info)
        return dirty === 0 || info.estimatedMs <= this.#maxDowntime
      }
      while (true) {
        if (await round()) {
          converged = true
          break
        }
        if (this.#round >= this.#maxRounds) break
        // Not converging: the workload dirties about as fast as the link sends.
        const now = runs.reduce((n, r) => n + r.count, 0)
        growing = now >= previous * 0.9 ? growing + 1 : 0
        if (growing >= 2) break
        previous = now
      }
      // Hybrid: what the last round found dirty goes before the stop, not after. Each page listed
      // at the stop costs downtime (found, encoded, dropped at the target: ~2.5 us each here, so
      // the 9,000 pages a 64 MiB/s writer dirties during a 1 GiB first round cost 20-30 ms) and,
      // in post-copy, a fault where the workload touches it; sent now it costs neither. What the
      // workload dirties during this short round is all that is left for the stop. (Pre-copy
      // sends the same pages in the stop: there the estimate is the downtime.)
      if (this.mode === 'hybrid' && converged && runs.length > 0 && this.#round < this.#maxRounds) await round()
      await this.#stopWorkload()
      // Still to send: what the last round's collect found, and what was written since.
      let t = performance.now()
      const last = mergeRuns(runs, this.#collect())
      this.#parts.collectMs = performance.now() - t
      t = performance.now()
      this.#dirtyAtStop = last.reduce((n, r) => n + r.count, 0)
      if (this.mode === 'precopy') {
        if (last.length > 0) await this.#sendRound(last)
      } else {
        finalRuns = last
        for (const payload of encodeRuns(last)) this.#send(FrameType.DISCARD, payload)
      }
      this.#parts.sendMs = performance.now() - t
    }
    this.#toCome = finalRuns
    const toCome = finalRuns.reduce((n, r) => n + r.count, 0)
    const resumed = this.#waitControl('resumed')
    // Demand requests may come as soon as the target runs, before 'resumed' reaches us: serve
    // them from now on. The push waits for 'resumed' (before it, the target may still be
    // writing pre-copy pages straight into place).
    this.#startPostcopy(false)
    this.#times.switchover = performance.now()
    this.#control({ t: 'switchover', toCome })
    this.#switchoverSent = true
    const r = await resumed
    this.#times.resumed = receivedAt(r)
    if (typeof r.targetMs === 'number' && Number.isFinite(r.targetMs)) this.#targetMs = r.targetMs
    if (r.parts !== null && typeof r.parts === 'object') this.#parts.target = r.parts as Record<string, number>
    const done = this.#waitControl('done')
    if (toCome > 0) {
      this.#setPhase('postcopy')
      this.#handle?.setPush(true)
    }
    const doneMsg = await done
    this.#times.done = receivedAt(doneMsg)
    // Only now: unregistering walks the whole range (and would hold the JS thread in post-copy).
    for (const t of this.#trackers.splice(0)) t.stop()
    this.#targetStats = (doneMsg.stats as Record<string, unknown>) ?? {}
    if (this.#verify !== null) {
      this.#setPhase('verifying')
      const verified = this.#waitControl('verified')
      this.#sendHashes()
      const v = await verified
      this.#verified = v.verified === null ? null : v.verified === true
      this.#mismatches = finite(v.mismatches)
    }
    this.#control({ t: 'bye' })
    this.#setPhase('complete')
    const result = this.#result()
    await sleep(20) // let the keeper flush 'bye'
    return result
  }

  async #stopWorkload(): Promise<void> {
    this.#setPhase('stopping')
    this.#times.stop = performance.now()
    if (this.#times.precopy === 0) this.#times.precopy = this.#times.stop
    this.#stopCalled = true
    await this.#stop()
    this.#parts.hookMs = performance.now() - this.#times.stop
  }

  #startPostcopy(push: boolean): void {
    if (this.#postcopyStarted) return
    this.#postcopyStarted = true
    this.#handle?.startPostcopy(runsArray(this.#toCome), push)
  }

  #collect(): PageRun[] {
    const runs: PageRun[] = []
    this.#trackers.forEach((t, i) => {
      const ps = this.#ranges[i].pageSize
      for (const d of t.collect()) {
        const first = Math.floor(d.offset / ps)
        const end = Math.ceil((d.offset + d.length) / ps)
        const last = runs[runs.length - 1]
        if (last !== undefined && last.range === i && last.page + last.count === first) last.count += end - first
        else runs.push({ range: i, page: first, count: end - first })
      }
    })
    return runs
  }

  #pagesBytes(runs: PageRun[]): number {
    return runs.reduce((n, r) => n + r.count * this.#ranges[r.range].pageSize, 0)
  }

  async #sendRound(runs: PageRun[]): Promise<RoundInfo> {
    const round = ++this.#round
    const pages = runs.reduce((n, r) => n + r.count, 0)
    const bytes = this.#pagesBytes(runs)
    this.#roundPages = pages
    this.#roundStart = performance.now()
    const t0 = performance.now()
    await new Promise<void>((resolve, reject) => {
      this.#roundWaiters.set(round, { resolve, reject })
      this.#handle?.sendRuns(round, runsArray(runs))
    })
    const ms = performance.now() - t0
    const bytesPerSecond = ms > 0 ? (bytes / ms) * 1000 : 0
    if (bytes >= 1 << 20 || this.#rate === 0) this.#rate = bytesPerSecond
    this.#control({ t: 'round', round, pages })
    return { round, pages, ms, dirtyPages: 0, bytesPerSecond: this.#rate, estimatedMs: 0 }
  }

  #sendHashes(): void {
    const v = this.#verify
    if (v === null) return
    this.#ranges.forEach((r, i) => {
      const hashes = native.pageHashes(r.address, r.length, r.pageSize, v.maskOffset, v.maskLength)
      const per = (1 << 20) / 8
      for (let p = 0; p < hashes.length; p += per) {
        const slice = hashes.subarray(p, Math.min(p + per, hashes.length))
        this.#send(FrameType.HASHES, new Uint8Array(slice.buffer, slice.byteOffset, slice.byteLength), i, BigInt(p))
      }
    })
    this.#control({ t: 'hashes-done' })
  }

  // ---- connections --------------------------------------------------------------------------

  async #connect(channel: ChannelKind, resume: boolean): Promise<Record<string, unknown>> {
    let socket: AnySocket | undefined
    try {
      // A reconnect tries often: a SYN into a link that is down is lost, not refused.
      socket = await dial(
        this.#to,
        this.#tls,
        resume ? Math.min(this.#connectMs, Math.max(1000, this.#timeoutMs)) : this.#connectMs,
      )
      const conn = new FrameConn(socket)
      const timing = { rttMs: 0 }
      const accept = await sourceHandshake(
        conn,
        {
          secret: this.#secret,
          channel,
          timeoutMs: this.#connectMs,
          setup: {
            session: this.#session,
            resume,
            mode: this.mode,
            ranges: this.#ranges.map(
              (r): MigrationRangeInfo => ({ length: r.length, pageSize: r.pageSize, kind: r.kind }),
            ),
            verify: this.#verify !== null,
            metadata: { user: this.#metadata, verifyMask: this.#verify, postcopyPriority: this.#priority },
          },
        },
        timing,
      )
      if (channel === 'main' && !resume) this.#rttMs = timing.rttMs
      if (accept.state === 'aborted' || accept.state === 'unknown') return accept
      const handle = this.#handle
      if (handle === undefined) throw new Error('closed')
      this.#relays.push(
        handOver(conn, (fd, initial) => {
          this.#gens[channel] = channel === 'main' ? handle.attachMain(fd, initial) : handle.attachDemand(fd, initial)
        }),
      )
      return accept
    } catch (err) {
      socket?.destroy()
      throw err
    }
  }

  #lost(reason: Error): void {
    if (this.#closed || this.#failure !== undefined || this.#reconnecting !== undefined) return
    if (this.#phase === 'complete') return
    if (this.#phase === 'verifying') {
      // The target has every page already: only the check is lost.
      this.#emitError(new Error(`the connection was lost before the target checked the pages: ${reason.message}`))
      this.#resolveControl({ t: 'verified', verified: null, mismatches: 0 })
      return
    }
    if (!this.#switchoverSent) {
      // The target has not taken over: nothing is lost, the workload stays here.
      this.#fail(
        Object.assign(new Error(`the connection to the target was lost before the switchover: ${reason.message}`), {
          code: (reason as { code?: string }).code ?? 'ECONNRESET',
          cause: reason,
        }),
      )
      return
    }
    this.#reconnecting = this.#reconnect(reason).finally(() => {
      this.#reconnecting = undefined
    })
  }

  async #reconnect(reason: Error): Promise<void> {
    this.#handle?.detach()
    for (const r of this.#relays.splice(0)) r()
    const previous = this.#phase
    this.#setPhase('disconnected')
    this.emit('disconnect', { reason: reason.message })
    const deadline = performance.now() + this.#reconnectMs
    let delay = 50
    for (let attempt = 1; !this.#closed; attempt++) {
      try {
        const accept = await this.#connect('main', true)
        if (accept.state === 'aborted' || accept.state === 'unknown')
          throw Object.assign(new Error('the target gave the migration up'), { fatal: true })
        if (accept.state === 'complete') {
          this.#reconnects++
          this.emit('reconnect', { attempt, reconnects: this.#reconnects })
          this.#resolveControl({ t: 'resumed', targetMs: (accept.stats as { targetMs?: number })?.targetMs })
          this.#resolveControl({ t: 'done', stats: accept.stats })
          return
        }
        this.#resolveControl({ t: 'resumed', targetMs: accept.targetMs })
        this.#startPostcopy(true)
        this.#handle?.setPush(true)
        // The target's HAVE bitmap came before this (same channel, in order): the rest is exact.
        await this.#waitControlFor('have-done', this.#connectMs)
        await this.#connect('demand', true)
        this.#handle?.resumePush()
        this.#reconnects++
        this.#setPhase(previous === 'disconnected' ? 'postcopy' : previous)
        this.emit('reconnect', { attempt, reconnects: this.#reconnects })
        return
      } catch (err) {
        const e = err as Error & { fatal?: boolean }
        this.#handle?.detach()
        for (const r of this.#relays.splice(0)) r()
        if (e.fatal || e.name === 'AuthError' || performance.now() + delay > deadline) {
          this.#fail(
            Object.assign(new Error(`could not reconnect to the target: ${e.message}`), {
              code: 'ECONNLOST',
              cause: e,
            }),
          )
          return
        }
        await sleep(delay)
        delay = Math.min(delay * 2, 1000)
      }
    }
  }

  // ---- notices from the native session ------------------------------------------------------

  #onNotices(notices: MigrationNotice[]): void {
    for (const n of notices) {
      switch (n.kind) {
        case 'round': {
          const w = this.#roundWaiters.get(n.id ?? -1)
          this.#roundWaiters.delete(n.id ?? -1)
          if (n.errno === undefined) w?.resolve()
          else {
            const err = n.error ?? new Error('sending a round failed')
            w?.reject(err)
            this.#lost(err)
          }
          break
        }
        case 'control': {
          let c: Control
          try {
            c = decodeControl(n.payload ?? Buffer.alloc(0))
          } catch (err) {
            this.#protocol(err as Error)
            break
          }
          if (n.at !== undefined) RECEIVED.set(c, perfTime(n.at))
          this.#resolveControl(c)
          break
        }
        case 'closed':
          // A channel we shut down ourselves, or one replaced since: nothing to do.
          if (n.errno === ECANCELED || n.id !== this.#gens[n.channel ?? '']) break
          if (n.protocol) this.#protocol(new ProtocolError(n.message ?? 'protocol error'))
          else this.#lost(n.error ?? new Error(`the ${n.channel} channel closed`))
          break
        case 'pushed':
          this.emit('pushed')
          break
        default:
          break
      }
    }
  }

  #protocol(err: Error): void {
    this.#emitError(err)
    this.#lost(err)
  }

  #waitControlFor(t: string, ms: number): Promise<Control> {
    let timer: NodeJS.Timeout | undefined
    let entry: { t: string; resolve: (c: Control) => void } | undefined
    const wait = new Promise<Control>((resolve, reject) => {
      const i = this.#inbox.findIndex((c) => c.t === t)
      if (i >= 0) {
        resolve(this.#inbox.splice(i, 1)[0])
        return
      }
      entry = { t, resolve }
      this.#controlWaiters.push(entry)
      timer = setTimeout(() => {
        const k = this.#controlWaiters.indexOf(entry!)
        if (k >= 0) this.#controlWaiters.splice(k, 1)
        reject(new Error(`the target did not send '${t}' within ${ms} ms`))
      }, ms)
    })
    return wait.finally(() => clearTimeout(timer))
  }

  #waitControl(t: string): Promise<Control> {
    const i = this.#inbox.findIndex((c) => c.t === t)
    if (i >= 0) return Promise.resolve(this.#inbox.splice(i, 1)[0])
    return new Promise((resolve) => this.#controlWaiters.push({ t, resolve }))
  }

  #resolveControl(c: Control): void {
    if (c.t === 'error') {
      this.#fail(new Error(`the target failed: ${String(c.message)}`))
      return
    }
    const i = this.#controlWaiters.findIndex((w) => w.t === c.t)
    if (i >= 0) this.#controlWaiters.splice(i, 1)[0].resolve(c)
    else if (this.#inbox.length < 64) this.#inbox.push(c)
  }

  #control(c: Control): void {
    this.#send(FrameType.CONTROL, encodeJson(c))
  }

  #send(type: number, payload: Uint8Array, range = 0, page = 0n): void {
    this.#handle?.send('main', type, range, page, payload)
  }

  #tick(): void {
    const h = this.#handle
    if (h === undefined || this.#closed) return
    const s = h.stats()
    if (this.#reconnecting === undefined && s.silentMs > this.#timeoutMs)
      this.#lost(Object.assign(new Error(`nothing received for ${Math.round(s.silentMs)} ms`), { code: 'ETIMEDOUT' }))
    const now = performance.now()
    const sent = s.precopyPages + s.pushedPages + s.demandPages
    const dt = now - this.#lastProgress.at
    let rate = this.#rate
    if (this.#lastProgress.at > 0 && dt > 0) rate = ((sent - this.#lastProgress.sent) * PAGE_SIZE * 1000) / dt
    this.#lastProgress = { at: now, sent }
    let etaMs = 0
    if (this.#phase === 'precopy') {
      const done = (now - this.#roundStart) * (this.#rate / 1000)
      etaMs = this.#rate > 0 ? Math.max(0, ((this.#roundPages * PAGE_SIZE - done) / this.#rate) * 1000) : 0
    } else if (this.#phase === 'postcopy' && rate > 0) {
      etaMs = ((s.unsent * PAGE_SIZE) / rate) * 1000
    }
    this.emit('progress', {
      phase: this.#phase,
      round: this.#round,
      pagesTotal: this.#pagesTotal,
      pagesSent: s.precopyPages,
      pagesPushed: s.pushedPages,
      pagesDemanded: s.demandPages,
      pagesLeft: this.#phase === 'postcopy' ? s.unsent : 0,
      bytesPerSecond: rate,
      etaMs,
      wireBytes: s.wireBytes,
    } satisfies SourceProgress)
  }

  #result(): MigrationResult {
    const s = this.#handle?.stats() ?? {}
    const t = this.#targetStats
    const times = this.#times
    return {
      mode: this.mode,
      bytes: this.#bytes,
      totalMs: times.done - times.start,
      precopyMs: this.mode === 'postcopy' ? 0 : times.stop - times.precopy,
      // The source's share (stop to switchover sent), half a round trip, the target's share:
      // robust to a 'resumed' that came late (a link that failed right after the switchover).
      downtimeMs:
        this.#targetMs === undefined
          ? times.resumed - times.stop
          : times.switchover - times.stop + this.#rttMs / 2 + this.#targetMs,
      postcopyMs: Math.max(0, times.done - times.resumed),
      wireBytes: finite(s.wireBytes),
      demandP50Us: finite(t.demandP50us),
      demandP99Us: finite(t.demandP99us),
      verified: this.#verified,
      reconnects: this.#reconnects,
      poisonedPages: finite(t.poisonedPages),
      rounds: this.#round,
      pagesTotal: this.#pagesTotal,
      precopyPages: finite(s.precopyPages),
      pushedPages: finite(s.pushedPages),
      demandPages: finite(s.demandPages),
      duplicatePages: finite(t.duplicatePages),
      resentPages: finite(s.resentPages),
      requestsForPushed: finite(s.requestsForSent),
      dirtyAtStop: this.#dirtyAtStop,
      zeroedPages: finite(t.zeroedPages),
      mismatches: this.#mismatches,
      downtimeParts: {
        ...this.#parts,
        sourceMs: times.switchover - times.stop,
        rttMs: this.#rttMs,
        targetMs: this.#targetMs,
      },
    }
  }

  #setPhase(phase: Phase): void {
    if (this.#phase === phase) return
    this.#phase = phase
    this.emit('phase', { phase, at: performance.now() })
  }

  #fail(err: Error): void {
    if (this.#failure !== undefined) return
    this.#failure = err
    for (const w of this.#roundWaiters.values()) w.reject(err)
    this.#roundWaiters.clear()
    this.#emitError(err)
    this.#failed?.(err)
  }

  #emitError(err: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', err)
  }

  #teardown(): void {
    if (this.#ticker !== undefined) clearInterval(this.#ticker)
    this.#ticker = undefined
    for (const t of this.#trackers.splice(0)) t.stop()
    this.#handle?.close()
    for (const r of this.#relays.splice(0)) r()
  }
}
