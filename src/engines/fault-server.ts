// FaultServer: a native engine (native/engine/fault_engine.cc) that serves a uffd's faults on its own
// threads, with no JS call per fault: from buffers, files or zero pages, with fault-around and
// background prefetch. JS is involved only for { handler } sources (called with batches of
// requests, off the hot path), for events the policy hands to JS, and for errors and progress.
import { EventEmitter } from 'node:events'
import * as fs from 'node:fs'
import { native } from '../addon/native'
import { PAGE_SIZE } from '../core/constants'
import { type UffdError, uffdError } from '../core/errors'
import { Mapping } from '../core/mapping'
import { describe, toRange, type Range, type RangeLike } from '../core/range'
import { Userfaultfd } from '../core/userfaultfd'
import type { FeedStats } from '../sources/feed'
import type { WorkingSet } from '../sources/working-set'
import { FaultsTicker, debug, errorChannel, faultsChannel } from '../util/diagnostics'
import { FedRanges, isRemoteSpec, type RemoteSpec } from './fed-ranges'

/** Options of new FaultServer(). */
export interface FaultServerOptions {
  /**
   * Fault-around. By default it adapts per range, like readahead: a fault just past the window
   * filled for an earlier one doubles that stream's window (up to `faultAroundMax`); any other
   * fault fills one page, so random access installs only what it touches. A number of bytes (a
   * power of two from PAGE_SIZE, no fault-around, to 64 MiB) fixes an aligned window instead.
   */
  faultAround?: number | 'adaptive'
  /** The adaptive window's largest size, bytes (a power of two, PAGE_SIZE..64 MiB). Default 2 MiB. */
  faultAroundMax?: number
  /** Default of serve()'s `prefetch`: fill ranges in the background. Default false. */
  prefetch?: boolean
  /** Bytes per background copy (a multiple of PAGE_SIZE). Default 256 KiB. */
  prefetchChunk?: number
  /** Background copies run under SCHED_IDLE ('idle', default) or normal priority. */
  prefetchPriority?: 'idle' | 'normal'
  /**
   * Demand first: prefetch pauses while demand faults arrived within this many µs (default
   * 1000; 0: never pause). Under continuous demand, fault-around does the filling.
   */
  prefetchYield?: number
  /**
   * Longest spin (µs) on the uffd before sleeping, adapted at run time (grows on spin hits,
   * halves on misses). Default 0 (never spin): measured on a 2-vCPU VM whose scheduler packs the
   * faulting thread onto the handler's CPU, spinning only delayed the faulting threads.
   */
  spin?: number
  /**
   * Read nothing from the uffd until resume(): for a uffd whose ranges are registered already
   * (Firecracker's, say), so that no fault is read before serve() added the range serving it
   * (a fault outside every served range is served as zeros). Default false.
   */
  paused?: boolean
  /** Messages per read(2), 1..4096. Default 64. */
  batch?: number
  /** Minimum interval (ms) between 'progress' events. Default 100. */
  progressInterval?: number
  /** After MADV_DONTNEED/REMOVE in a served range: serve zeros ('zero', default) or the source again. */
  onRemove?: 'zero' | 'source'
  /** A FORK event's uffd (the child's): close it ('close', default) or emit it as 'fork'. */
  onFork?: 'close' | 'emit'
  /** Background requests in flight per { handler } range with prefetch. Default 4. */
  handlerConcurrency?: number
  /**
   * Deadlock watchdog for { handler } ranges (which need this JS thread): if this thread blocks
   * in a fault while handler requests wait for it this long (ms), print why and abort instead
   * of hanging forever. Default 1000; false disables it.
   */
  watchdog?: number | false
}

/** What a { handler } source is asked for: `length` bytes of the range at `address`. */
export interface FaultRequest {
  /** first byte to fill (page-aligned) */
  address: bigint
  /** the same position as an offset into the source (the range's `offset` + position) */
  offset: number
  length: number
  /** true for background prefetch, false for a thread waiting on a fault */
  prefetch: boolean
}

/** Bytes a FaultServer copies from: an ArrayBuffer or a view of one. */
export type PageBytes = ArrayBuffer | ArrayBufferView
/** A { handler } source: the bytes of a request, or a promise of them. */
export type FaultHandler = (request: FaultRequest) => PageBytes | Promise<PageBytes>

/**
 * Where a served range's pages come from: bytes in memory, a file (path or fd), zero pages, or a
 * JavaScript function. `offset` is where in the source the range's first byte is.
 */
export type FaultSource =
  | { buffer: PageBytes | Mapping; offset?: number }
  | { file: string | number; offset?: number; mode?: 'mmap' | 'pread' }
  | { zero: true }
  | { handler: FaultHandler; offset?: number }
  | RemoteSpec

/** Options of FaultServer.serve(). */
export interface ServeOptions {
  /**
   * Fetch these snapshot pages first, in their recorded order, in large batched reads, while
   * demand faults still go first: a WorkingSet, or the path of a working-set file. A file
   * recorded on another snapshot version is refused (WorkingSetError 'ESTALE': thrown here for
   * local sources; an 'error' event for remote ones, whose identity takes reads).
   */
  workingSet?: WorkingSet | string
  /**
   * Record this range's working set: every first touch faults (4 KiB fault-around, no
   * prefetch), in order; server.workingSet() returns it.
   */
  recordWorkingSet?: boolean
  /** Fill this range in the background too (default: the server's `prefetch`). */
  prefetch?: boolean
  /** Fault-around for this range: bytes (fixed window) or 'adaptive' (default: the server's). */
  faultAround?: number | 'adaptive'
  /** Register the range with the uffd for MISSING faults first (default true). */
  register?: boolean
}

/** The engine's counters (FaultServer.stats()). */
export interface FaultServerStats {
  /** fault messages read */
  faults: number
  /** pages copied for faults (including fault-around) */
  demandPages: number
  /** of which around the faulting page */
  aroundPages: number
  /** pages copied in the background */
  prefetchPages: number
  /** pages copied from { handler } bytes */
  handlerPages: number
  /** pages served as zero pages */
  zeroPages: number
  /** Bytes filled (copies and zero pages). */
  bytes: number
  /** fills that found the page already present (benign races) */
  eexist: number
  /** ops deferred by EAGAIN (an event pending), and their retries */
  deferred: number
  /** Deferred ops retried. */
  retries: number
  /** faults outside every served range (served as zeros), or WP/MINOR faults (left alone) */
  unhandled: number
  /** read(2) calls on the uffd. */
  reads: number
  /** Times the engine slept in poll(2). */
  sleeps: number
  /** Times the adaptive spin found a message before sleeping. */
  spinHits: number
  /** UFFD_EVENT_REMOVE events. */
  removes: number
  /** UFFD_EVENT_UNMAP events. */
  unmaps: number
  /** UFFD_EVENT_REMAP events. */
  remaps: number
  /** UFFD_EVENT_FORK events. */
  forks: number
  /** { handler } requests made */
  requests: number
  /** Errors ('error' events). */
  errors: number
  /** times the prefetch paused for demand faults */
  prefetchPauses: number
  /** engine-side demand latency (message read to page filled), µs */
  latencyP50us: number
  /** 99th percentile of the same, µs. */
  latencyP99us: number
  /** the adaptive spin's current budget, µs */
  spinBudgetUs: number
  /** pages present (or settled: removed with the 'zero' policy, unmapped) / pages served */
  pagesPresent: number
  /** Pages of every served range. */
  pagesTotal: number
  /** faults waiting for bytes from JavaScript (remote sources, handlers) now */
  sourceWaiting: number
  /** bytes fetched in the background and handed to the engine, not yet installed */
  providedQueued: number
  /** remote and working-set ranges: demand requests, background reads, working-set progress */
  fed: FeedStats
}

/** A 'progress' event: how much of the served memory is present. */
export interface FaultServerProgress {
  /** Pages present (or settled). */
  pagesPresent: number
  /** Pages of every served range. */
  pagesTotal: number
  /** 0..1 */
  fraction: number
}

interface NativeHandle {
  addRange(
    id: number,
    address: bigint,
    length: number,
    source: object,
    sourceOffset: number,
    prefetch: boolean,
    faultAround: number,
  ): void
  removeRange(start: bigint, end: bigint): number
  complete(id: number, bytes: PageBytes | null): void
  provide(rangeId: number, sourceOffset: number, bytes: PageBytes): number
  resume(): void
  providedQueued(): number
  recordTouches(on: boolean): void
  takeTouches(): { ranges: Uint32Array; offsets: Float64Array }
  stats(): FaultServerStats
  settled(): [number, number]
  close(): void
  ref(): void
  unref(): void
}

type Notice =
  | { type: 'error'; error: UffdError; address?: bigint }
  | { type: 'progress' }
  | { type: 'fork'; fd: number }
  | {
      type: 'requests'
      requests: Array<{
        id: number
        handler: number
        range: number
        address: bigint
        offset: number
        length: number
        prefetch: boolean
        /** the faulting page (demand requests) */
        fault?: bigint
      }>
    }

interface Served {
  range: Range
  /** what must stay alive while the engine copies from it */
  keep: unknown
  registered: boolean
}

const MAX_WINDOW = 64 * 1024 * 1024

// One reader per uffd: two servers would take each other's faults (and serve them as zeros).
const serving = new WeakSet<Userfaultfd>()
// A server collected without close() (its engine is stopped by its native finalizer) frees it.
const released = new FinalizationRegistry<Userfaultfd>((uffd) => serving.delete(uffd))

function isBytes(value: unknown): value is PageBytes {
  return value instanceof ArrayBuffer || ArrayBuffer.isView(value)
}

function checkInt(value: unknown, name: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer ${min}..${max} (got ${describe(value)})`)
  }
  return value
}

function checkWindow(value: unknown, name: string): number {
  const v = checkInt(value, name, PAGE_SIZE, MAX_WINDOW)
  if ((v & (v - 1)) !== 0) throw new RangeError(`${name} must be a power of two (got ${v})`)
  return v
}

/** The engine's fault-around: bytes of a fixed window, or 0 (adaptive). */
function aroundOption(value: unknown, fallback: number): number {
  if (value === undefined) return fallback
  if (value === 'adaptive') return 0
  if (typeof value !== 'number')
    throw new TypeError(`faultAround must be a byte count or 'adaptive' (got ${describe(value)})`)
  return checkWindow(value, 'faultAround')
}

function checkChoice<T extends string>(value: unknown, name: string, choices: readonly T[]): T {
  if (!choices.includes(value as T))
    throw new TypeError(`${name} must be ${choices.map((c) => `'${c}'`).join(' or ')} (got ${describe(value)})`)
  return value as T
}

/**
 * Serves a uffd's MISSING faults on native threads, with no JavaScript per fault: from buffers,
 * files or zero pages (or a JavaScript { handler }), with fault-around and background prefetch.
 * Events: 'progress' (FaultServerProgress), 'error' (the server keeps serving), 'fork'.
 */
export class FaultServer extends EventEmitter {
  readonly #uffd: Userfaultfd
  readonly #handle: NativeHandle
  readonly #faultAround: number
  readonly #prefetch: boolean
  readonly #served = new Map<number, Served>()
  readonly #handlers = new Map<number, FaultHandler>()
  readonly #fed: FedRanges
  /** { handler } demand requests not yet answered */
  #handlerWaiting = 0
  #nextId = 1
  #closed = false
  #drainWaiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = []
  readonly #ticker = new FaultsTicker({ source: 'FaultServer', server: this })

  constructor(uffd: Userfaultfd, options: FaultServerOptions = {}) {
    super()
    if (!(uffd instanceof Userfaultfd)) throw new TypeError(`uffd must be a Userfaultfd (got ${describe(uffd)})`)
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    const o = options
    this.#faultAround = aroundOption(o.faultAround, 0)
    const faultAroundMax =
      o.faultAroundMax === undefined ? 2 * 1024 * 1024 : checkWindow(o.faultAroundMax, 'faultAroundMax')
    if (o.prefetch !== undefined && typeof o.prefetch !== 'boolean')
      throw new TypeError(`prefetch must be a boolean (got ${describe(o.prefetch)})`)
    this.#prefetch = o.prefetch ?? false
    const prefetchChunk =
      o.prefetchChunk === undefined ? 256 * 1024 : checkInt(o.prefetchChunk, 'prefetchChunk', PAGE_SIZE, MAX_WINDOW)
    if (prefetchChunk % PAGE_SIZE !== 0)
      throw new RangeError(`prefetchChunk must be a multiple of ${PAGE_SIZE} (got ${prefetchChunk})`)
    const spinUs = o.spin === undefined ? 0 : checkInt(o.spin, 'spin', 0, 100_000)
    const batch = o.batch === undefined ? 64 : checkInt(o.batch, 'batch', 1, 4096)
    const progressMs =
      o.progressInterval === undefined ? 100 : checkInt(o.progressInterval, 'progressInterval', 0, 3_600_000)
    const onRemove =
      o.onRemove === undefined ? 'zero' : checkChoice(o.onRemove, 'onRemove', ['zero', 'source'] as const)
    const onFork = o.onFork === undefined ? 'close' : checkChoice(o.onFork, 'onFork', ['close', 'emit'] as const)
    const priority =
      o.prefetchPriority === undefined
        ? 'idle'
        : checkChoice(o.prefetchPriority, 'prefetchPriority', ['idle', 'normal'] as const)
    const handlerConcurrency =
      o.handlerConcurrency === undefined ? 4 : checkInt(o.handlerConcurrency, 'handlerConcurrency', 1, 1024)
    const prefetchYieldUs =
      o.prefetchYield === undefined ? 1000 : checkInt(o.prefetchYield, 'prefetchYield', 0, 1_000_000)
    const watchdogMs =
      o.watchdog === false ? 0 : o.watchdog === undefined ? 1000 : checkInt(o.watchdog, 'watchdog', 1, 3_600_000)
    if (o.paused !== undefined && typeof o.paused !== 'boolean')
      throw new TypeError(`paused must be a boolean (got ${describe(o.paused)})`)
    if (serving.has(uffd))
      throw uffdError('EBUSY', 'FaultServer', 'this userfaultfd already has a FaultServer; close it first')
    this.#uffd = uffd
    const Handle = (
      native as unknown as {
        FaultServerHandle: new (fd: number, options: object, notify: (n: Notice[]) => void) => NativeHandle
      }
    ).FaultServerHandle
    this.#handle = new Handle(
      uffd.fd,
      {
        faultAround: this.#faultAround,
        faultAroundMax,
        prefetchChunk,
        spinUs,
        batch,
        progressMs,
        handlerConcurrency,
        watchdogMs,
        prefetchYieldUs,
        removeToZero: onRemove === 'zero',
        forkEmit: onFork === 'emit',
        prefetchIdle: priority === 'idle',
        startPaused: o.paused === true,
      },
      (notices) => this.#onNotices(notices),
    )
    const h = this.#handle
    this.#fed = new FedRanges(
      {
        provide: (id, offset, bytes) => (this.#closed ? 0 : h.provide(id, offset, bytes)),
        providedQueued: () => (this.#closed ? 0 : h.providedQueued()),
        complete: (id, bytes) => {
          if (!this.#closed) h.complete(id, bytes)
        },
        recordTouches: (on) => h.recordTouches(on),
        takeTouches: () =>
          this.#closed ? { ranges: new Uint32Array(0), offsets: new Float64Array(0) } : h.takeTouches(),
      },
      (err, address) => {
        if (address !== undefined && (err as { address?: bigint }).address === undefined)
          (err as { address?: bigint }).address = address
        this.#error(err)
      },
    )
    serving.add(uffd)
    released.register(this, uffd, this)
    if (debug.enabled)
      debug('FaultServer: serving uffd %d (faultAround %d, prefetch %s)', uffd.fd, this.#faultAround, this.#prefetch)
  }

  /** True after close(). */
  get closed(): boolean {
    return this.#closed
  }

  /**
   * Serves faults in `range` from `source`. The range is registered with the uffd (MISSING)
   * unless { register: false }; it must not overlap a range already served.
   */
  serve(range: RangeLike, source: FaultSource, options: ServeOptions = {}): this {
    this.#live('serve')
    if (range instanceof Mapping && range.pageSize !== PAGE_SIZE) {
      throw new RangeError(
        `FaultServer serves ${PAGE_SIZE}-byte pages; this mapping has ${range.pageSize}-byte (hugetlb) pages: resolve those with uffd.events()`,
      )
    }
    const r = toRange(range)
    if (options === null || typeof options !== 'object')
      throw new TypeError(`serve options must be an object (got ${describe(options)})`)
    const prefetch = options.prefetch ?? this.#prefetch
    if (typeof prefetch !== 'boolean') throw new TypeError(`prefetch must be a boolean (got ${describe(prefetch)})`)
    const faultAround = aroundOption(options.faultAround, this.#faultAround)
    const register = options.register ?? true
    const id = this.#nextId++
    const remote = source !== null && typeof source === 'object' && isRemoteSpec(source)
    const local = remote ? null : this.#source(source, r, id)
    // remote sources, and local ones replaying or recording a working set, are fed from JS
    const fed = this.#fed.prepare(id, r, source as unknown as Record<string, unknown>, local, {
      prefetch,
      workingSet: options.workingSet,
      recordWorkingSet: options.recordWorkingSet,
    })
    const spec = fed?.spec ?? local!.spec
    const offset = fed?.offset ?? local!.offset
    let registered = false
    try {
      if (register) {
        this.#uffd.register(r, { missing: true })
        registered = true
      }
      this.#handle.addRange(
        id,
        r.address,
        r.length,
        spec,
        offset,
        fed ? fed.prefetch : prefetch,
        fed?.faultAround ?? faultAround,
      )
    } catch (err) {
      if (registered) this.#unregister(r)
      this.#handlers.delete(id)
      fed?.abort()
      throw err
    } finally {
      local?.close?.()
    }
    this.#served.set(id, { range: r, keep: local?.keep ?? null, registered })
    fed?.attach()
    if (debug.enabled)
      debug(
        'FaultServer: serve 0x%s +%d from %s%s',
        r.address.toString(16),
        r.length,
        remote ? 'remote' : (spec as { kind: string }).kind,
        prefetch ? ' with prefetch' : '',
      )
    return this
  }

  /**
   * The working set recorded so far (ranges served with { recordWorkingSet: true }), tied to
   * their snapshot: save it with `.save(path)`. With `range`, only the recorded ranges inside it.
   */
  workingSet(range?: RangeLike): Promise<WorkingSet> {
    this.#live('workingSet')
    if (range === undefined) return this.#fed.workingSet()
    const r = toRange(range)
    const end = r.address + BigInt(r.length)
    const ids = [...this.#served]
      .filter(([, s]) => s.range.address >= r.address && s.range.address + BigInt(s.range.length) <= end)
      .map(([id]) => id)
    return this.#fed.workingSet(ids)
  }

  /** Stops serving every served range inside `range` (and unregisters what serve() registered). */
  remove(range: RangeLike): number {
    this.#live('remove')
    const r = toRange(range)
    const end = r.address + BigInt(r.length)
    const n = this.#handle.removeRange(r.address, end)
    for (const [id, s] of this.#served) {
      if (s.range.address >= r.address && s.range.address + BigInt(s.range.length) <= end) {
        if (s.registered) this.#unregister(s.range)
        this.#served.delete(id)
        this.#handlers.delete(id)
        this.#fed.detach([id])
      }
    }
    this.#checkDrained()
    return n
  }

  /** The engine's counters now. */
  stats(): FaultServerStats {
    const s = this.#handle.stats()
    s.fed = this.#fed.stats()
    s.sourceWaiting = this.#handlerWaiting + s.fed.demandWaiting
    s.providedQueued = this.#handle.providedQueued()
    return s
  }

  /** Resolves when every page of every served range is present (rejects if closed first). */
  drained(): Promise<void> {
    if (this.#closed) return Promise.reject(uffdError('EBADF', 'FaultServer.drained', 'the server is closed'))
    return new Promise((resolve, reject) => {
      this.#drainWaiters.push({ resolve, reject })
      this.#checkDrained()
    })
  }

  /** Starts reading the uffd (a server created with { paused: true }). Idempotent. */
  resume(): this {
    if (!this.#closed) this.#handle.resume()
    return this
  }

  /** Lets the process exit while the server runs (like server.unref()). */
  unref(): this {
    if (!this.#closed) this.#handle.unref()
    return this
  }

  /** Undoes unref(). */
  ref(): this {
    if (!this.#closed) this.#handle.ref()
    return this
  }

  /**
   * Stops and joins the engine's threads. Faults still pending stay blocked until something
   * resolves them or the uffd is closed (then the kernel wakes them; anonymous memory reads as
   * zeros). The uffd stays open and registered. Idempotent.
   */
  close(): void {
    if (this.#closed) return
    this.#fed.close()
    this.#closed = true
    if (debug.enabled) debug('FaultServer: close (uffd %d)', this.#uffd.fd)
    this.#handle.close()
    serving.delete(this.#uffd)
    released.unregister(this)
    this.#served.clear()
    this.#handlers.clear()
    const err = uffdError('EBADF', 'FaultServer.drained', 'the server was closed before every page was present')
    for (const w of this.#drainWaiters.splice(0)) w.reject(err)
  }

  /** close(), for `using server = new FaultServer(uffd)`. */
  [Symbol.dispose](): void {
    this.close()
  }

  #source(
    source: FaultSource,
    r: Range,
    id: number,
  ): { spec: object; offset: number; keep: unknown; close?: () => void } {
    if (source === null || typeof source !== 'object')
      throw new TypeError(
        `source must be { buffer }, { file }, { zero: true } or { handler } (got ${describe(source)})`,
      )
    const s = source as Record<string, unknown>
    const offset = s.offset === undefined ? 0 : checkInt(s.offset, 'source offset', 0, Number.MAX_SAFE_INTEGER)
    if ('buffer' in s) {
      const b = s.buffer
      if (b instanceof Mapping) {
        if (offset + r.length > b.length)
          throw new RangeError(
            `buffer: [${offset}, ${offset + r.length}) lies outside the mapping (length ${b.length})`,
          )
        return { spec: { kind: 'memory', address: b.address, length: b.length }, offset, keep: b }
      }
      if (!isBytes(b))
        throw new TypeError(`buffer must be an ArrayBuffer, a typed array or a Mapping (got ${describe(b)})`)
      if (offset + r.length > b.byteLength)
        throw new RangeError(`buffer: ${b.byteLength} bytes cannot cover [${offset}, ${offset + r.length})`)
      return { spec: { kind: 'buffer', bytes: b }, offset, keep: b }
    }
    if ('file' in s) {
      const mode = s.mode === undefined ? 'mmap' : checkChoice(s.mode, 'mode', ['mmap', 'pread'] as const)
      const f = s.file
      if (typeof f === 'string') {
        const fd = fs.openSync(f, 'r')
        return {
          spec: { kind: 'file', fd, offset, mmap: mode === 'mmap' },
          offset: 0,
          keep: null,
          close: () => fs.closeSync(fd),
        }
      }
      if (typeof f === 'number' && Number.isSafeInteger(f) && f >= 0) {
        return { spec: { kind: 'file', fd: f, offset, mmap: mode === 'mmap' }, offset: 0, keep: null }
      }
      throw new TypeError(`file must be a path or an fd (got ${describe(f)})`)
    }
    if ('zero' in s) {
      if (s.zero !== true) throw new TypeError(`zero must be true (got ${describe(s.zero)})`)
      return { spec: { kind: 'zero' }, offset: 0, keep: null }
    }
    if ('handler' in s) {
      if (typeof s.handler !== 'function')
        throw new TypeError(`handler must be a function (got ${describe(s.handler)})`)
      this.#handlers.set(id, s.handler as FaultHandler)
      return { spec: { kind: 'handler', id }, offset, keep: null }
    }
    throw new TypeError('source must have one of: buffer, file, zero, handler')
  }

  #unregister(r: Range): void {
    if (this.#uffd.closed) return
    try {
      this.#uffd.unregister(r)
    } catch {
      /* unmapped or moved meanwhile: nothing left to unregister */
    }
  }

  #onNotices(notices: Notice[]): void {
    if (this.#closed) {
      for (const n of notices) if (n.type === 'fork') native.close(n.fd)
      return
    }
    let progress = false
    for (const n of notices) {
      switch (n.type) {
        case 'error':
          this.#error(n.error)
          break
        case 'progress':
          progress = true
          break
        case 'fork': {
          const child = Userfaultfd.fromFd(n.fd, { features: this.#uffd.features, ioctls: this.#uffd.ioctls })
          if (this.listenerCount('fork') > 0) this.emit('fork', child)
          else child.close()
          break
        }
        case 'requests':
          for (const q of n.requests) {
            if (this.#fed.handles(q.handler)) this.#fed.request(q.handler, q)
            else this.#request(q)
          }
          break
      }
    }
    if (progress) {
      this.#fed.tick()
      if (faultsChannel.hasSubscribers) {
        const s = this.#handle.stats()
        this.#ticker.tick({ faults: s.faults, pages: s.bytes / PAGE_SIZE, bytes: s.bytes, zeroPages: s.zeroPages })
      }
      const [present, total] = this.#handle.settled()
      this.emit('progress', {
        pagesPresent: present,
        pagesTotal: total,
        fraction: total === 0 ? 1 : present / total,
      } satisfies FaultServerProgress)
      this.#checkDrained()
    }
  }

  // A demand request that fails is retried with backoff (10 ms doubling to 1 s): a thread is
  // blocked on it and nothing else would wake it. Each failure is an 'error' event. A failed
  // prefetch request gives its pages back to demand faults and stops prefetching the range.
  #request(
    q: { id: number; handler: number; address: bigint; offset: number; length: number; prefetch: boolean },
    attempt = 0,
  ): void {
    const handler = this.#handlers.get(q.handler)
    if (handler === undefined || this.#closed) {
      if (!this.#closed) this.#handle.complete(q.id, null)
      return
    }
    if (attempt === 0 && !q.prefetch) this.#handlerWaiting++
    const fail = (err: unknown): void => {
      if (this.#closed) return
      const e = err instanceof Error ? err : new Error(String(err))
      ;(e as { address?: bigint }).address = q.address
      if (q.prefetch) this.#handle.complete(q.id, null)
      else setTimeout(() => this.#request(q, attempt + 1), Math.min(10 * 2 ** attempt, 1000)).unref()
      this.#error(e)
    }
    try {
      Promise.resolve(handler({ address: q.address, offset: q.offset, length: q.length, prefetch: q.prefetch }))
        .then((bytes) => {
          if (this.#closed) return
          if (!isBytes(bytes))
            throw new TypeError(`handler must return an ArrayBuffer or a typed array (got ${describe(bytes)})`)
          if (!q.prefetch) this.#handlerWaiting--
          this.#handle.complete(q.id, bytes)
        })
        .catch(fail)
    } catch (err) {
      fail(err)
    }
  }

  #error(err: Error): void {
    if (errorChannel.hasSubscribers) errorChannel.publish({ source: 'FaultServer', server: this, error: err })
    if (debug.enabled) debug('FaultServer: error %s', err.message)
    // An 'error' event without a listener would throw from a native callback: warn instead.
    if (this.listenerCount('error') > 0) this.emit('error', err)
    else process.emitWarning(`FaultServer: ${err.message}`, 'UffdWarning')
  }

  #checkDrained(): void {
    if (this.#drainWaiters.length === 0 || this.#closed) return
    const [present, total] = this.#handle.settled()
    if (present < total) return
    for (const w of this.#drainWaiters.splice(0)) w.resolve()
  }

  #live(op: string): void {
    if (this.#closed) throw uffdError('EBADF', `FaultServer.${op}`, 'the server is closed')
  }
}
