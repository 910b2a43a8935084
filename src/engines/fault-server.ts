// FaultServer: a native engine (native/engine/fault_engine.cc) that serves a uffd's faults on its own
// threads, with no JS call per fault: from buffers, files or zeros, with fault-around and
// background prefetch, on base pages and on hugetlb huge pages alike, MISSING faults (UFFDIO_COPY)
// or MINOR faults of shared memory (the page cache filled once, then UFFDIO_CONTINUE). JS is
// involved only for { handler } sources (called with batches of requests, off the hot path), for
// events the policy hands to JS, and for errors and progress.
import type {
  BackgroundPriority,
  FaultEngine,
  FaultEngineNotice,
  FaultEngineRequest,
  FaultEngineStats,
  FaultMode,
  FaultStage,
  LatencySummary,
  PageClass,
  RemovePolicy,
  SourceErrorPolicy,
} from '../addon/binding'
import { native } from '../addon/native'
import { Feature, IoctlBit, PAGE_SIZE } from '../core/constants'
import { UffdError, uffdError } from '../core/errors'
import { unsupported } from '../core/kernel-features'
import { Mapping, hugePageSize, memoryKindOf } from '../core/mapping'
import { probe } from '../core/probe'
import { checkAligned, toRange, type Range, type RangeLike } from '../core/range'
import { Userfaultfd } from '../core/userfaultfd'
import { type FaultHandler, type FaultSource, engineSource, isBytes } from '../sources/fault-source'
import type { FeedStats } from '../sources/feed'
import type { WorkingSet } from '../sources/working-set'
import { FaultsTicker, debug, errorChannel, faultsChannel } from '../util/diagnostics'
import { type HistogramJSON, LatencyHistogram } from '../util/histogram'
import { TypedEmitter } from '../util/typed-emitter'
import { FaultTrace } from './fault-trace'
import { bool, checkRenamed, choice, describe, int, optionalInt, powerOfTwo } from '../util/validate'
import { faultServerMetrics, type MetricsOptions } from './fault-metrics'
import { FedRanges, isRemoteSpec, type RemoteSpec } from './fed-ranges'
import { NativePrefetches } from './native-prefetch'
import { type Backing, type PageCacheLease, leasePageCache } from './page-cache'

export type { FaultHandler, FaultRequest, FaultSource, PageBytes } from '../sources/fault-source'

export type {
  BackgroundPriority,
  FaultMode,
  FaultStage,
  LatencySummary,
  PageClass,
  ReadMethod,
  RemovePolicy,
  SourceErrorPolicy,
} from '../addon/binding'
export type { Backing } from './page-cache'
export type { MetricsOptions } from './fault-metrics'

/**
 * Options of a FaultServer. Sizes are in bytes; durations carry their unit in their name. The
 * same names (and units) are the native engine's (src/addon/binding.ts FaultEngineOptions).
 */
export interface FaultServerOptions {
  /**
   * Fault-around. By default ('adaptive') it adapts per range, like readahead: a fault just past
   * the window filled for an earlier one doubles that stream's window (up to `faultAroundMax`);
   * any other fault fills one page, so random access installs only what it touches. A number of
   * bytes (a power of two from PAGE_SIZE, no fault-around, to 64 MiB) fixes an aligned window
   * instead (clipped to the range, skipping pages already present). On huge pages a window is at
   * least one huge page.
   */
  faultAround?: number | 'adaptive'
  /** The adaptive window's largest size, bytes (a power of two, PAGE_SIZE..64 MiB). Default 2 MiB. */
  faultAroundMax?: number
  /** Default of serve()'s `prefetch`: fill ranges in the background. Default false. */
  prefetch?: boolean
  /** Bytes per background copy (a multiple of PAGE_SIZE; at least one page of the range). Default 256 KiB. */
  prefetchChunk?: number
  /**
   * The prefetch thread's priority: 'idle' (default: SCHED_IDLE, it runs only on CPU time nobody
   * else wants, the demand thread first) or 'normal'. The prefetch only fetches early what demand
   * faults would fetch anyway, so by default it yields to everything.
   */
  backgroundPriority?: BackgroundPriority
  /**
   * Demand first: prefetch pauses while demand faults arrived within this many µs (default
   * 1000; 0: never pause). Under continuous demand, fault-around does the filling.
   */
  prefetchYieldUs?: number
  /**
   * Longest spin (µs) on the uffd before sleeping, adapted at run time: it learns whether spins
   * hit (a fault arrived while spinning) and stops spinning when they do not, probing again now
   * and then. Default 50; 0 never spins. Spinning saves a cross-CPU wake-up per fault when the
   * faulting thread runs on another CPU; when it shares the engine's CPU, spins miss and stop.
   */
  spinUs?: number
  /**
   * Read nothing from the uffd until resume(): for a uffd whose ranges are registered already
   * (Firecracker's, say), so that no fault is read before serve() added the range serving it
   * (a fault outside every served range is served as zeros). Default false.
   */
  paused?: boolean
  /** Messages per read(2), 1..4096 (the same option as events()'s). Default 64. */
  readSize?: number
  /** Minimum interval between 'progress' events (ms). Default 100. */
  progressIntervalMs?: number
  /**
   * After MADV_DONTNEED/MADV_REMOVE in a served range (EVENT_REMOVE): serve zeros there ('zero',
   * default: a balloon freed them), serve the source again ('source'), or unregister the removed
   * pages ('unregister': later faults there are the kernel's own, zeros for anonymous memory,
   * and never reach the server).
   */
  onRemove?: RemovePolicy
  /** A FORK event's uffd (the child's): close it ('close', default) or emit it as 'fork'. */
  onFork?: 'close' | 'emit'
  /** Background requests in flight per { handler } range with prefetch. Default 4. */
  handlerConcurrency?: number
  /**
   * Deadlock watchdog for { handler } ranges (which need this JS thread): if this thread blocks
   * in a fault while handler requests wait for it this long (ms), print why and abort instead of
   * hanging forever. Default 1000; 0 disables it.
   */
  watchdogMs?: number
  /**
   * Record every fault (address, kind, wait, faulting thread) in a Chrome trace-event file that
   * Perfetto opens and `userfaultfd report` draws: a path (created, and completed on close()),
   * or a FaultTrace shared by several servers (you close it, after them). The faulting thread
   * is known only if the uffd was opened with Feature.THREAD_ID. Default: no trace.
   */
  trace?: string | FaultTrace
  /** Default of serve()'s `onSourceError` ('retry'). */
  onSourceError?: SourceErrorPolicy
  /** Default of serve()'s `retryDeadlineMs` (0: retry for ever). */
  retryDeadlineMs?: number
  /** Default of serve()'s `afterDeadline` ('poison'). */
  afterDeadline?: 'poison' | 'zero'
}

/** Options renamed in 0.2 (old -> new): passing an old name is a TypeError naming the new one. */
const RENAMED_OPTIONS = {
  spin: 'spinUs',
  progressInterval: 'progressIntervalMs',
  prefetchYield: 'prefetchYieldUs',
  prefetchPriority: 'backgroundPriority',
  watchdog: 'watchdogMs',
  batch: 'readSize',
} as const

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
   * Record this range's working set: every first touch faults (one-page fault-around, no
   * prefetch), in order; server.workingSet() returns it.
   */
  recordWorkingSet?: boolean
  /** Fill this range in the background too (default: the server's `prefetch`). */
  prefetch?: boolean
  /** Fault-around for this range: bytes (fixed window) or 'adaptive' (default: the server's). */
  faultAround?: number | 'adaptive'
  /** Register the range with the uffd for MISSING faults first (default true). */
  register?: boolean
  /**
   * The memory's page size: a Mapping knows its own; for a plain { address, length } over
   * hugetlb memory give its huge page size (hugePageSize()). Default PAGE_SIZE.
   */
  pageSize?: number
  /**
   * Which faults: 'missing' (default: pages copied in, UFFDIO_COPY) or 'minor' (shared memory:
   * shmem, memfd, hugetlbfs). In 'minor' mode the range is registered for MINOR and MISSING
   * faults; a page's bytes go into the file's page cache once (through the server's own mapping
   * of the file, never overwriting a page already there), then UFFDIO_CONTINUE maps them, with
   * no copy; a page already in the page cache (pushed before serving, or filled for another
   * mapping of the file, another process's included) needs only the CONTINUE.
   */
  mode?: FaultMode
  /**
   * mode 'minor': the file whose page cache the range maps: a Mapping of it (a memfd, shared
   * anonymous memory) or an fd of it. Default: the range itself, when it is a Mapping. A plain
   * { address, length } (another process's memory, served through its uffd) needs it.
   */
  backing?: Backing
  /** mode 'minor': where the range's first byte is in `backing`, in bytes (default 0). */
  backingOffset?: number
  /**
   * Where the source cannot give a page a thread waits on (a file truncated or failing with EIO,
   * a handler that throws, a remote that is gone): 'retry' (default: again with backoff, 10 ms
   * doubling to 1 s, until `retryDeadlineMs` if set, then `afterDeadline`), 'poison'
   * (UFFDIO_POISON: the thread gets SIGBUS; Linux 6.6+) or 'zero' (zeros). Every failure is an
   * 'error' event with the page's `address`, the `cause` and the `action` taken.
   */
  onSourceError?: SourceErrorPolicy
  /** 'retry': give up this many ms after the page's first failure, then `afterDeadline` (0: never). */
  retryDeadlineMs?: number
  /** 'retry' past its deadline: 'poison' (default) or 'zero'. */
  afterDeadline?: 'poison' | 'zero'
}

/** One served range in stats(): its pages, faults, blocked time, pages by class and stage latencies. */
export interface FaultServerRangeStats {
  address: bigint
  length: number
  pageSize: number
  mode: FaultMode
  pagesPresent: number
  pagesTotal: number
  /** fault messages in the range (one per blocked thread) */
  faults: number
  /** the time its faulting threads spent blocked, read to resolved, summed (µs): QEMU's postcopy blocktime */
  blockedUs: number
  /** mode 'minor': pages this range put into the page cache (the rest were there: CONTINUE only) */
  cachedPages: number
  /** fills that failed (the source, or the fill ioctl) */
  sourceErrors: number
  /** pages by class: demand, around, prefetch (source bytes, by why), zero, removed, poisoned */
  pages: Record<PageClass, number>
  /** latency per stage of serving a fault (read, source, fill, wake) and read to resolved (total) */
  stages: Record<FaultStage, LatencySummary>
}

/** The engine's counters (FaultServer.stats()). */
export interface FaultServerStats extends Omit<FaultEngineStats, 'stageHistograms'> {
  /** every range's stage latencies, ranges no longer served included */
  stages: Record<FaultStage, LatencySummary>
  /** per range served now */
  ranges: FaultServerRangeStats[]
  /** faults waiting for bytes from JavaScript (remote sources, handlers) now */
  sourceWaiting: number
  /** bytes fetched in the background and handed to the engine, not yet installed */
  providedQueued: number
  /** remote and working-set ranges: demand requests, background reads, working-set progress */
  fed: FeedStats
}

export interface FaultServerProgress {
  /** pages present (or settled: removed under 'zero', unmapped), each range's own pages */
  pagesPresent: number
  pagesTotal: number
  bytesPresent: number
  bytesTotal: number
  /** bytesPresent / bytesTotal, 0..1 */
  fraction: number
}

/**
 * An 'error' event: a UffdError from the engine, or what a { handler } threw, with the address.
 * A source failure (the engine's or a handler's) is a UffdError with the failing call's code
 * and syscall, its `cause` (the source's own error), and the `action` onSourceError took:
 * 'retry' (again in `retryInMs`), 'poison', 'zero', or 'none' (no thread waits on the page:
 * fault-around or prefetch; a fault on it meets the policy then).
 */
export type FaultServerError = (UffdError | Error) & {
  address?: bigint
  action?: SourceErrorPolicy | 'none'
  retryInMs?: number
  cause?: unknown
}

/** The events of a FaultServer and their listeners' arguments. */
export interface FaultServerEvents {
  progress: [progress: FaultServerProgress]
  error: [error: FaultServerError]
  /** with onFork: 'emit': the child's uffd, ready (yours to close) */
  fork: [uffd: Userfaultfd]
}

interface SourcePolicy {
  onSourceError: SourceErrorPolicy
  retryDeadlineMs: number
  afterDeadline: 'poison' | 'zero'
}

/** What onSourceError does about a demand read failing since `firstFailure` (Date.now()). */
function actionFor(policy: SourcePolicy, firstFailure: number): SourceErrorPolicy {
  const retry = policy.onSourceError === 'retry'
  if (retry && policy.retryDeadlineMs > 0 && Date.now() - firstFailure >= policy.retryDeadlineMs)
    return policy.afterDeadline
  return policy.onSourceError
}

interface Served {
  range: Range
  /** what must stay alive while the engine copies from it */
  keep: unknown
  registered: boolean
  /** lets go of a Mapping source (its unmap() waits for this) */
  release?: () => void
  policy: SourcePolicy
  /** mode 'minor': the page cache it fills */
  cache?: PageCacheLease
}

// Fault records buffered natively between drains (40 bytes each): 64 Ki records per 100 ms is
// 650 000 faults a second before any is dropped (and counted as dropped).
const TRACE_CAPACITY = 1 << 16
const TRACE_DRAIN_MS = 100

const MAX_WINDOW = 64 * 1024 * 1024
const MAX_PAGE = 1024 * 1024 * 1024

/** The engine's fault-around: bytes of a fixed window, or 0 (adaptive). */
function aroundOption(value: unknown, fallback: number): number {
  if (value === undefined) return fallback
  if (value === 'adaptive') return 0
  if (typeof value !== 'number')
    throw new TypeError(`faultAround must be a byte count or 'adaptive' (got ${describe(value)})`)
  return powerOfTwo(value, 'faultAround', PAGE_SIZE, MAX_WINDOW)
}

// One reader per uffd: two servers would take each other's faults (and serve them as zeros).
const serving = new WeakSet<Userfaultfd>()
// A server collected without close() (its engine is stopped by its native finalizer) frees it.
const released = new FinalizationRegistry<Userfaultfd>((uffd) => serving.delete(uffd))

/**
 * Serves a uffd's MISSING faults on native threads, with no JavaScript per fault: from buffers,
 * files or zeros (or a JavaScript { handler }), with fault-around and background prefetch, on base
 * pages and hugetlb huge pages. Events (typed, FaultServerEvents): 'progress', 'error' (the
 * server keeps serving), 'fork'.
 */
export class FaultServer extends TypedEmitter<FaultServerEvents> {
  readonly #uffd: Userfaultfd
  readonly #handle: FaultEngine
  readonly #faultAround: number
  readonly #prefetch: boolean
  readonly #policy: SourcePolicy
  readonly #served = new Map<number, Served>()
  readonly #handlers = new Map<number, FaultHandler>()
  readonly #fed: FedRanges
  readonly #prefetches: NativePrefetches
  /** { handler } demand requests not yet answered */
  #handlerWaiting = 0
  #nextId = 1
  #closed = false
  #drainWaiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = []
  #ticker: FaultsTicker | undefined = new FaultsTicker({ source: 'FaultServer', server: this })
  #trace: { file: FaultTrace; owned: boolean; threadIds: boolean; timer: NodeJS.Timeout } | undefined

  constructor(uffd: Userfaultfd, options: FaultServerOptions = {}) {
    super()
    if (!(uffd instanceof Userfaultfd)) throw new TypeError(`uffd must be a Userfaultfd (got ${describe(uffd)})`)
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    checkRenamed(options, RENAMED_OPTIONS, 'FaultServer')
    const o = options
    this.#faultAround = aroundOption(o.faultAround, 0)
    this.#prefetch = bool(o.prefetch, 'prefetch', false)
    this.#policy = sourcePolicy(o, { onSourceError: 'retry', retryDeadlineMs: 0, afterDeadline: 'poison' })
    const prefetchChunk = optionalInt(o.prefetchChunk, 'prefetchChunk', 256 * 1024, PAGE_SIZE, MAX_WINDOW)
    if (prefetchChunk % PAGE_SIZE !== 0)
      throw new RangeError(`prefetchChunk must be a multiple of ${PAGE_SIZE} (got ${prefetchChunk})`)
    const engineOptions = {
      faultAround: this.#faultAround,
      faultAroundMax:
        o.faultAroundMax === undefined
          ? 2 * 1024 * 1024
          : powerOfTwo(o.faultAroundMax, 'faultAroundMax', PAGE_SIZE, MAX_WINDOW),
      prefetchChunk,
      spinUs: optionalInt(o.spinUs, 'spinUs', 50, 0, 100_000),
      readSize: optionalInt(o.readSize, 'readSize', 64, 1, 4096),
      progressIntervalMs: optionalInt(o.progressIntervalMs, 'progressIntervalMs', 100, 0, 3_600_000),
      onRemove: choice(o.onRemove, 'onRemove', ['zero', 'source', 'unregister'] as const, 'zero'),
      onFork: choice(o.onFork, 'onFork', ['close', 'emit'] as const, 'close'),
      backgroundPriority: choice(o.backgroundPriority, 'backgroundPriority', ['idle', 'normal'] as const, 'idle'),
      handlerConcurrency: optionalInt(o.handlerConcurrency, 'handlerConcurrency', 4, 1, 1024),
      prefetchYieldUs: optionalInt(o.prefetchYieldUs, 'prefetchYieldUs', 1000, 0, 1_000_000),
      watchdogMs: optionalInt(o.watchdogMs, 'watchdogMs', 1000, 0, 3_600_000),
      hugePageSize: hugePageSize(),
      startPaused: bool(o.paused, 'paused', false),
      traceCapacity: o.trace === undefined ? 0 : TRACE_CAPACITY,
    }
    if (o.trace !== undefined && typeof o.trace !== 'string' && !(o.trace instanceof FaultTrace))
      throw new TypeError(`trace must be a file path or a FaultTrace (got ${describe(o.trace)})`)
    if (o.trace instanceof FaultTrace && o.trace.closed) throw new TypeError('trace: this FaultTrace is closed')
    if (o.trace === '') throw new TypeError('trace must be a file path (got an empty string)')
    if (serving.has(uffd))
      throw uffdError('EBUSY', 'FaultServer', 'this userfaultfd already has a FaultServer; close it first')
    this.#uffd = uffd
    const file = typeof o.trace === 'string' ? new FaultTrace(o.trace) : o.trace
    try {
      this.#handle = new native.FaultEngine(uffd.fd, engineOptions, (notices) => this.#onNotices(notices))
    } catch (err) {
      if (typeof o.trace === 'string') file?.close()
      throw err
    }
    if (file !== undefined) {
      // A weak reference: the timer must not keep a server that was dropped without close() alive.
      const self = new WeakRef(this)
      const timer: NodeJS.Timeout = setInterval(() => {
        const server = self.deref()
        if (server === undefined) clearInterval(timer)
        else server.#drainTrace()
      }, TRACE_DRAIN_MS)
      timer.unref()
      const threadIds = (uffd.features & Feature.THREAD_ID) !== 0n
      this.#trace = { file, owned: typeof o.trace === 'string', threadIds, timer }
    }
    const h = this.#handle
    this.#prefetches = new NativePrefetches(() => (this.#closed ? null : h))
    this.#fed = new FedRanges(
      {
        provide: (id, offset, bytes) => (this.#closed ? 0 : h.provide(id, offset, bytes)),
        providedQueued: () => (this.#closed ? 0 : h.providedQueued()),
        complete: (id, bytes) => {
          if (!this.#closed) h.complete(id, bytes)
        },
        resolve: (id, action) => {
          if (!this.#closed) h.resolve(id, action)
        },
        recordTouches: (on) => h.recordTouches(on),
        takeTouches: () =>
          this.#closed ? { ranges: new Uint32Array(0), offsets: new Float64Array(0) } : h.takeTouches(),
      },
      (err: FaultServerError, address, action, retryInMs) => {
        // the source's own error (a SourceError), with the faulting address and, for a demand
        // read, what onSourceError did about it
        if (address !== undefined && err.address === undefined) err.address = address
        if (action !== undefined) err.action = action
        if (retryInMs !== undefined) err.retryInMs = retryInMs
        this.#error(err)
      },
      this.#prefetches,
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
   * Serves faults in `range` from `source`. The range is registered with the uffd (MISSING; with
   * { mode: 'minor' }, MINOR and MISSING) unless { register: false }; it must not overlap a
   * range already served. hugetlb memory is served in whole huge pages: a Mapping knows its page
   * size, a plain range says it with { pageSize }.
   */
  serve(range: RangeLike, source: FaultSource, options: ServeOptions = {}): this {
    this.#live('serve')
    if (options === null || typeof options !== 'object')
      throw new TypeError(`serve options must be an object (got ${describe(options)})`)
    const r = toRange(range)
    const pageSize = this.#pageSize(range, options.pageSize)
    checkAligned(r.address, r.length, 'serve', pageSize)
    const prefetch = bool(options.prefetch, 'prefetch', this.#prefetch)
    const faultAround = aroundOption(options.faultAround, this.#faultAround)
    const register = bool(options.register, 'register', true)
    const mode = choice(options.mode, 'mode', ['missing', 'minor'] as const, 'missing')
    const policy = sourcePolicy(options, this.#policy)
    const minor = mode === 'minor' ? minorBacking(range, options, r.length) : undefined
    const id = this.#nextId++
    const remote = source !== null && typeof source === 'object' && isRemoteSpec(source)
    const local = remote ? null : engineSource(source as Exclude<FaultSource, RemoteSpec>, r.length, id)
    // Remote sources, and local ones replaying or recording a working set, are fed from JS.
    const fed = this.#fed.prepare(id, r, source as unknown as Record<string, unknown>, local, {
      prefetch,
      workingSet: options.workingSet,
      recordWorkingSet: options.recordWorkingSet,
      demandPolicy: (first) => actionFor(policy, first),
    })
    const spec = fed?.spec ?? local!.spec
    const offset = fed?.offset ?? local!.offset
    if (local?.handler !== undefined) this.#handlers.set(id, local.handler)
    let registered = false
    let cache: PageCacheLease | undefined
    try {
      if (minor !== undefined) {
        cache = leasePageCache(minor.backing, minor.offset + r.length)
        if (cache.pageSize !== pageSize)
          throw new RangeError(
            `serve: the backing file's pages are ${cache.pageSize} bytes, the range's ${pageSize} (give { pageSize })`,
          )
      }
      let ioctls: bigint | undefined
      if (register) {
        ioctls = this.#uffd.register(r, minor ? { missing: true, minor: true } : { missing: true })
        registered = true
        checkPageSize(ioctls, pageSize)
      }
      checkPoison(policy, ioctls)
      this.#handle.addRange(
        {
          id,
          address: r.address,
          length: r.length,
          pageSize,
          sourceOffset: offset,
          prefetch: fed ? fed.prefetch : prefetch,
          faultAround: fed?.faultAround ?? faultAround,
          mode,
          ...(cache ? { cache: cache.handle, cacheOffset: minor!.offset } : {}),
          ...policy,
        },
        spec,
      )
    } catch (err) {
      if (registered) this.#unregister(r)
      this.#handlers.delete(id)
      local?.release?.()
      fed?.abort()
      cache?.release()
      throw err
    } finally {
      local?.close?.()
    }
    this.#served.set(id, { range: r, keep: local?.keep ?? null, registered, release: local?.release, policy, cache })
    fed?.attach()
    if (debug.enabled)
      debug(
        'FaultServer: serve 0x%s +%d (%d-byte pages, %s) from %s%s',
        r.address.toString(16),
        r.length,
        pageSize,
        mode,
        remote ? 'remote' : local!.spec.kind,
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
        s.release?.()
        s.cache?.release()
        this.#served.delete(id)
        this.#handlers.delete(id)
        this.#fed.detach([id])
      }
    }
    this.#checkDrained()
    return n
  }

  /** The engine's counters now, with per-stage latencies and per-range figures. */
  stats(): FaultServerStats {
    const { stageHistograms, ...totals } = this.#handle.stats()
    const fed = this.#fed.stats()
    return {
      ...totals,
      fed,
      sourceWaiting: this.#handlerWaiting + fed.demandWaiting,
      providedQueued: this.#closed ? 0 : this.#handle.providedQueued(),
      stages: summaries(stageHistograms),
      ranges: this.#handle.metrics().map((m) => ({
        address: m.address,
        length: m.length,
        pageSize: m.pageSize,
        mode: m.mode,
        pagesPresent: m.pagesPresent,
        pagesTotal: m.pagesTotal,
        faults: m.faults,
        blockedUs: m.blockedNs / 1000,
        cachedPages: m.cachedPages,
        sourceErrors: m.sourceErrors,
        pages: m.pages,
        stages: summaries(m.stages),
      })),
    }
  }

  /**
   * The demand-latency histogram (what stats().latencyUs summarises), to merge with others
   * (src/util/histogram.ts LatencyHistogram.merge): the Firecracker handler sums its connections'.
   */
  latencyHistogram(): HistogramJSON {
    return this.#closed ? { count: 0, buckets: [] } : this.#handle.latencyHistogram()
  }

  /**
   * The server's metrics in the Prometheus text format (version 0.0.4): per range, faults,
   * blocked time, pages by class, pages present, and a histogram per stage of serving a fault.
   * `labels` are added to every sample (e.g. { vm: 'a' } where several servers are scraped as one).
   */
  metrics(options: MetricsOptions = {}): string {
    if (this.#closed) return ''
    return faultServerMetrics([{ stats: this.#handle.stats(), ranges: this.#handle.metrics() }], options)
  }

  /** @internal the engine's raw metrics, for metrics pages that merge several servers */
  _metricsSource(): { stats: FaultEngineStats; ranges: ReturnType<FaultEngine['metrics']> } | undefined {
    if (this.#closed) return undefined
    return { stats: this.#handle.stats(), ranges: this.#handle.metrics() }
  }

  /** Resolves when every page of every served range is present (rejects if closed first). */
  drained(): Promise<void> {
    if (this.#closed) return Promise.reject(uffdError('EBADF', 'FaultServer.drained', 'the server is closed'))
    return new Promise((resolve, reject) => {
      this.#drainWaiters.push({ resolve, reject })
      this.#checkDrained()
    })
  }

  /**
   * @internal A server inside another publisher (the Firecracker handler, which publishes each
   * connection's fault counts as its own) stays off the faults channel.
   */
  _leaveFaultsChannel(): void {
    this.#ticker = undefined
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
    this.#fed.close() // stops the feeds, and so their native prefetches
    this.#prefetches.close()
    this.#closed = true
    if (debug.enabled) debug('FaultServer: close (uffd %d)', this.#uffd.fd)
    this.#handle.close() // joins the engine's threads: nothing reads the sources any more
    if (this.#trace !== undefined) {
      clearInterval(this.#trace.timer)
      this.#drainTrace() // what the engine recorded before it stopped
      if (this.#trace.owned) this.#trace.file.close()
    }
    serving.delete(this.#uffd)
    released.unregister(this)
    for (const s of this.#served.values()) {
      s.release?.()
      s.cache?.release()
    }
    this.#served.clear()
    this.#handlers.clear()
    const err = uffdError('EBADF', 'FaultServer.drained', 'the server was closed before every page was present')
    for (const w of this.#drainWaiters.splice(0)) w.reject(err)
  }

  /** close(), for `using server = new FaultServer(uffd)`. */
  [Symbol.dispose](): void {
    this.close()
  }

  // A Mapping's page size is its own; a plain range's is { pageSize } (default: the base page).
  #pageSize(range: RangeLike, given: unknown): number {
    const own = range instanceof Mapping ? range.pageSize : undefined
    if (given === undefined) return own ?? PAGE_SIZE
    const size = powerOfTwo(given, 'pageSize', PAGE_SIZE, MAX_PAGE)
    if (own !== undefined && own !== size)
      throw new RangeError(`pageSize ${size} given for a mapping whose pages are ${own} bytes`)
    return size
  }

  #drainTrace(): void {
    const t = this.#trace
    if (t === undefined || t.file.closed) return
    const taken = this.#handle.takeTrace()
    if (taken !== null) t.file.addRecords(taken.records, taken.dropped, t.threadIds)
  }

  #unregister(r: Range): void {
    if (this.#uffd.closed) return
    try {
      this.#uffd.unregister(r)
    } catch {
      /* unmapped or moved meanwhile: nothing left to unregister */
    }
  }

  #onNotices(notices: FaultEngineNotice[]): void {
    if (this.#closed) {
      for (const n of notices) if (n.type === 'fork') native.close(n.fd)
      return
    }
    let progress = false
    for (const n of notices) {
      switch (n.type) {
        case 'error':
          if (n.action !== undefined) this.#error(sourceFailure(n.error, n.address ?? 0n, n.action, n.retryInMs))
          else {
            // the address the engine was filling when it failed (a faulting thread may wait on it)
            if (n.address !== undefined) (n.error as FaultServerError).address = n.address
            this.#error(n.error)
          }
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
        case 'prefetched':
          this.#prefetches.ended(n.id)
          break
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
        this.#ticker?.tick({ faults: s.faults, pages: s.bytes / PAGE_SIZE, bytes: s.bytes, zeroPages: s.zeroPages })
      }
      const settled = this.#handle.settled()
      this.emit('progress', {
        ...settled,
        fraction: settled.bytesTotal === 0 ? 1 : settled.bytesPresent / settled.bytesTotal,
      })
      this.#checkDrained()
    }
  }

  // A demand request that fails meets its range's onSourceError: 'retry' (with backoff, 10 ms
  // doubling to 1 s: a thread is blocked on it and nothing else would wake it; past the
  // deadline, afterDeadline), 'poison' or 'zero' (the engine does it to the faulting page). Each
  // failure is an 'error' event. A failed prefetch request gives its pages back to demand faults
  // and stops prefetching the range.
  #request(q: FaultEngineRequest, attempt = 0, firstFailure = 0): void {
    const handler = this.#handlers.get(q.handler)
    if (handler === undefined || this.#closed) {
      if (!this.#closed) this.#handle.complete(q.id, null)
      return
    }
    if (attempt === 0 && !q.prefetch) this.#handlerWaiting++
    const fail = (err: unknown): void => {
      if (this.#closed) return
      const cause = err instanceof Error ? err : new Error(String(err))
      const address = q.fault ?? q.address
      if (q.prefetch) {
        this.#handle.complete(q.id, null)
        this.#error(sourceFailure(cause, address, 'none'))
        return
      }
      const first = firstFailure || Date.now()
      const action = actionFor(this.#served.get(q.range)?.policy ?? this.#policy, first)
      if (action === 'retry') {
        const delay = Math.min(10 * 2 ** attempt, 1000)
        setTimeout(() => this.#request(q, attempt + 1, first), delay).unref()
        this.#error(sourceFailure(cause, address, 'retry', delay))
      } else {
        this.#error(sourceFailure(cause, address, action))
        this.#handlerWaiting--
        this.#handle.resolve(q.id, action)
      }
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

  #error(err: FaultServerError): void {
    if (errorChannel.hasSubscribers) errorChannel.publish({ source: 'FaultServer', server: this, error: err })
    if (debug.enabled) debug('FaultServer: error %s', err.message)
    // An 'error' event without a listener would throw from a native callback: warn instead.
    if (this.listenerCount('error') > 0) this.emit('error', err)
    else process.emitWarning(`FaultServer: ${err.message}`, 'UffdWarning')
  }

  #checkDrained(): void {
    if (this.#drainWaiters.length === 0 || this.#closed) return
    const { pagesPresent, pagesTotal } = this.#handle.settled()
    if (pagesPresent < pagesTotal) return
    for (const w of this.#drainWaiters.splice(0)) w.resolve()
  }

  #live(op: string): void {
    if (this.#closed) throw uffdError('EBADF', `FaultServer.${op}`, 'the server is closed')
  }
}

function sourcePolicy(o: Partial<SourcePolicy>, defaults: SourcePolicy): SourcePolicy {
  return {
    onSourceError: choice(
      o.onSourceError,
      'onSourceError',
      ['retry', 'poison', 'zero'] as const,
      defaults.onSourceError,
    ),
    retryDeadlineMs: optionalInt(o.retryDeadlineMs, 'retryDeadlineMs', defaults.retryDeadlineMs, 0, 86_400_000),
    afterDeadline: choice(o.afterDeadline, 'afterDeadline', ['poison', 'zero'] as const, defaults.afterDeadline),
  }
}

// 'poison' (or 'retry' with a deadline, then 'poison') needs UFFDIO_POISON (Linux 6.6): refused
// up front on kernels without it, rather than falling back silently when a page fails.
function checkPoison(policy: SourcePolicy, ioctls: bigint | undefined): void {
  const poisons =
    policy.onSourceError === 'poison' ||
    (policy.onSourceError === 'retry' && policy.retryDeadlineMs > 0 && policy.afterDeadline === 'poison')
  if (!poisons) return
  const available =
    ioctls !== undefined ? (ioctls & IoctlBit.POISON) !== 0n : (probe().features & Feature.POISON) !== 0n
  if (available) return
  const what =
    policy.onSourceError === 'poison'
      ? "FaultServer.serve({ onSourceError: 'poison' })"
      : "FaultServer.serve({ onSourceError: 'retry', retryDeadlineMs }) (afterDeadline 'poison' by default)"
  const err = unsupported('POISON', what)
  err.message +=
    ": use onSourceError 'retry' (a thread waits until the source recovers) or 'zero', or afterDeadline: 'zero'"
  throw err
}

// mode 'minor': the file whose page cache the range maps, and where the range starts in it.
function minorBacking(range: RangeLike, options: ServeOptions, length: number): { backing: Backing; offset: number } {
  if (range instanceof Mapping && !range.shared)
    throw new TypeError(
      `serve: mode 'minor' needs shared memory (shmem, memfd, hugetlbfs; this mapping is ${memoryKindOf(range)}, private): MINOR faults come from a page cache, which private memory does not share`,
    )
  const backing = options.backing ?? (range instanceof Mapping ? range : undefined)
  if (backing === undefined)
    throw new TypeError(
      "serve: mode 'minor' over a plain { address, length } needs { backing }: a Mapping or an fd of the memory's file",
    )
  if (!(backing instanceof Mapping)) int(backing, 'backing', 0, 0x7fffffff)
  const offset = optionalInt(options.backingOffset, 'backingOffset', 0, 0)
  if (backing instanceof Mapping && offset + length > backing.length)
    throw new RangeError(
      `backingOffset: [${offset}, ${offset + length}) lies outside the backing mapping (length ${backing.length})`,
    )
  return { backing, offset }
}

// A source failure as an 'error' event: the failing call's code, the cause, what was done.
function sourceFailure(
  cause: Error,
  address: bigint,
  action: SourceErrorPolicy | 'none',
  retryInMs?: number,
): FaultServerError {
  const c = cause as Partial<UffdError>
  const done =
    action === 'retry'
      ? `retrying in ${retryInMs} ms`
      : action === 'poison'
        ? 'poisoned: a touch raises SIGBUS'
        : action === 'zero'
          ? 'served as zeros'
          : 'no thread waits on it'
  const e = new UffdError(
    `the source could not give the page at 0x${address.toString(16)}: ${cause.message} (${done})`,
  ) as UffdError & FaultServerError
  e.code = typeof c.code === 'string' ? c.code : 'EIO'
  e.errno = typeof c.errno === 'number' ? c.errno : 5
  e.syscall = typeof c.syscall === 'string' ? c.syscall : 'FaultServer source'
  e.address = address
  e.action = action
  if (retryInMs !== undefined) e.retryInMs = retryInMs
  e.cause = cause
  return e
}

function summaries(h: FaultEngineStats['stageHistograms']): Record<FaultStage, LatencySummary> {
  const out = {} as Record<FaultStage, LatencySummary>
  for (const [stage, json] of Object.entries(h) as Array<[FaultStage, (typeof h)[FaultStage]]>)
    out[stage] = LatencyHistogram.fromJSON(json).summary()
  return out
}

// UFFDIO_REGISTER offers no ZEROPAGE on hugetlb memory, and only there: so it tells whether the
// page size the range was served with is the memory's.
function checkPageSize(ioctls: bigint, pageSize: number): void {
  const hugetlb = (ioctls & IoctlBit.ZEROPAGE) === 0n
  if (hugetlb && pageSize === PAGE_SIZE)
    throw new RangeError(
      `serve: this range is hugetlb memory; give its huge page size ({ pageSize: ${hugePageSize()} }), or serve the Mapping itself`,
    )
  if (!hugetlb && pageSize !== PAGE_SIZE)
    throw new RangeError(`serve: pageSize ${pageSize} given, but this range is not hugetlb memory`)
}
