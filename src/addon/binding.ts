// The native surface, declared in one place: every class and function the addon
// (build/Release/userfaultfd.node, from native/binding/) exports, with the names, argument order
// and units the C++ side uses. Nothing else in src/ declares native types or casts the addon.
// This module imports nothing: every other module may import it without making a cycle.
//
// Naming: options and fields have one name on both sides of the boundary, with the unit in the
// name for durations (spinUs, progressIntervalMs, watchdogMs) and none for sizes (bytes:
// faultAround, prefetchChunk, chunkSize, length) or counts (readSize: messages per read).

/** Caller memory the addon reads or writes synchronously: any ArrayBuffer or view. */
export type Bytes = ArrayBuffer | ArrayBufferView
/** An address, offset or length: a bigint, or a safe non-negative integer. */
export type U64 = bigint | number

/** What a failed native call throws (a UffdError once src/core/errors has registered its class). */
export interface NativeError extends Error {
  code: string
  errno: number
  syscall: string
  bytes?: number
}

// ---- constants (constants.cc) ----------------------------------------------------------------

export interface NativeConstants {
  Feature: Record<string, bigint>
  IoctlBit: Record<string, bigint>
  Ioctl: Record<string, number>
  Mode: Record<string, bigint>
  PagefaultFlag: Record<string, bigint>
  Event: Record<string, number>
  OpenFlag: Record<string, number>
  Prot: Record<string, number>
  Advice: Record<string, number>
  UFFD_API: number
  MSG_SIZE: number
  PAGE_SIZE: number
}

// ---- mappings (mapping.cc) -------------------------------------------------------------------

export interface MappingHandleOptions {
  hugetlb?: boolean
  populate?: boolean
  name?: string
  private?: boolean
  /** anonymous: MAP_SHARED */
  shared?: boolean
  /** kind 'fd': the fd to map (dup'ed) */
  fd?: number
}

/** new MappingHandle(kind, length, options, source?): anonymous, memfd, an fd's file, or an alias. */
export interface MappingHandle {
  address(): bigint
  length(): number
  fd(): number
  buffer(): ArrayBuffer
  unmap(): void
  madvise(offset: number, length: number, advice: number): void
  protect(offset: number, length: number, prot: number): void
  read(offset: number, target: Bytes): number
  write(offset: number, source: Bytes): number
}

export type MappingHandleConstructor = new (
  kind: 'anonymous' | 'memfd' | 'alias' | 'fd',
  length: number,
  options: MappingHandleOptions,
  source?: MappingHandle,
) => MappingHandle

// ---- event streams and fd readiness (event_reader.cc, fd_watcher.cc) ---------------------------

/**
 * new EventReader(fd, readSize, callback, watchdogMs, forkGuard): on each readable, one read(2) of
 * up to `readSize` messages into `buffer`; callback(count) or callback(error). With `forkGuard`, a
 * fork by the loop thread has its FORK event read on a helper thread (else the fork would wait for
 * a read that only this thread could do).
 */
export interface EventReader {
  readonly buffer: ArrayBuffer
  start(): void
  stop(): void
  ref(): void
  unref(): void
  close(): void
}

export type EventReaderConstructor = new (
  fd: number,
  readSize: number,
  callback: (result: number | NativeError) => void,
  watchdogMs: number,
  forkGuard: boolean,
) => EventReader

/** new FdWatcher(fd, callback): wait(events) calls back once (1 readable, 2 writable, 4 hang-up). */
export interface FdWatcher {
  wait(events: number): void
  stop(): void
  ref(): void
  unref(): void
  close(): void
}

export type FdWatcherConstructor = new (fd: number, callback: (result: number | NativeError) => void) => FdWatcher

// ---- fd passing (fd_passing.cc) ---------------------------------------------------------------

export interface RecvFdsResult {
  bytes: number
  fds: number[]
  truncated: boolean
  extraFds: boolean
  dropped: number
  payloadTruncated: boolean
}

export interface PeerCredentials {
  pid: number
  uid: number
  gid: number
}

// ---- the fault engine (fault_engine.cc) ---------------------------------------------------------

/** FaultEngine options: the FaultServerOptions, checked and with their defaults applied. */
export interface FaultEngineOptions {
  /** bytes of a fixed aligned window, or 0: adaptive (readahead-like, per range) */
  faultAround: number
  /** the adaptive window's largest size */
  faultAroundMax: number
  prefetchChunk: number
  spinUs: number
  readSize: number
  progressIntervalMs: number
  onRemove: RemovePolicy
  onFork: 'close' | 'emit'
  backgroundPriority: BackgroundPriority
  handlerConcurrency: number
  prefetchYieldUs: number
  watchdogMs: number
  /** the default huge page size: zeros for faults outside every range on hugetlb memory */
  hugePageSize: number
  /** read nothing from the uffd until resume() */
  startPaused: boolean
  /** FaultServer { trace }: records buffered between takeTrace() calls (0 or absent: no trace) */
  traceCapacity?: number
}

/** After MADV_DONTNEED/MADV_REMOVE in a served range: zeros, the source again, or unregister. */
export type RemovePolicy = 'zero' | 'source' | 'unregister'
/** A background thread under SCHED_IDLE (runs only on CPU time nobody else wants), or not. */
export type BackgroundPriority = 'idle' | 'normal'
/** How a file's bytes are read: from a private read-only mapping of it, or with pread(2). */
export type ReadMethod = 'mmap' | 'pread'

/** Which faults a range is served for: MISSING (UFFDIO_COPY) or MINOR (page cache + UFFDIO_CONTINUE). */
export type FaultMode = 'missing' | 'minor'
/** What to do where a source cannot give a page a thread waits on. */
export type SourceErrorPolicy = 'retry' | 'poison' | 'zero'

export interface FaultEngineRange {
  id: number
  address: bigint
  length: number
  /** the memory's page size: the base page, or its huge page size (hugetlb) */
  pageSize: number
  /** where in the source the range's first byte is */
  sourceOffset: number
  prefetch: boolean
  faultAround: number
  mode: FaultMode
  /** mode 'minor': the file's page cache, and where the range starts in its writer (bytes) */
  cache?: PageCacheHandle
  cacheOffset?: number
  onSourceError: SourceErrorPolicy
  /** 'retry' until this many ms after the first failure (0: for ever), then afterDeadline */
  retryDeadlineMs: number
  afterDeadline: 'poison' | 'zero'
}

/**
 * A shared file's page cache as MINOR ranges fill it (page_cache.cc): `uffd` (dup'ed) has the
 * writer [address, address + length) registered for MISSING faults; nothing else touches it.
 */
export interface PageCacheHandle {
  /** pages known to be in the page cache */
  cachedPages(): number
}

export type PageCacheConstructor = new (
  uffd: number,
  address: bigint,
  length: number,
  pageSize: number,
) => PageCacheHandle

export type FaultEngineSource =
  /**
   * shared: a view of a SharedArrayBuffer (which cannot be detached), used in place; else copied
   * into engine memory at once, so that nothing done to the buffer afterwards reaches the engine
   */
  | { kind: 'buffer'; bytes: Bytes; shared: boolean }
  /** memory the caller keeps mapped while the range is served (a Mapping) */
  | { kind: 'memory'; address: bigint; length: number }
  /** size: the file's size as its owner knows it (absent: its size now); short of it, reads fail */
  | { kind: 'file'; fd: number; offset: number; readMethod: ReadMethod; size?: number }
  | { kind: 'zero' }
  | { kind: 'handler'; id: number }

/** Latency in µs (log-linear histogram buckets, ~9% resolution: each value is its bucket's bound). */
export interface LatencySummary {
  count: number
  p50: number
  p90: number
  p99: number
  max: number
}

/** Pages and bytes present (or settled: removed under 'zero', unmapped) out of all served. */
export interface Settlement {
  pagesPresent: number
  pagesTotal: number
  bytesPresent: number
  bytesTotal: number
}

/** The engine's counters. Pages are each range's own pages (a 2 MiB huge page counts one). */
export interface FaultEngineStats extends Settlement {
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
  /** pages served as zeros */
  zeroPages: number
  bytes: number
  /** fills that found the page already present (EEXIST: benign races) */
  exists: number
  /** ops deferred by EAGAIN (an event pending), and their retries */
  deferred: number
  retries: number
  /** faults outside every served range (served as zeros), or WP/MINOR faults (left alone) */
  unhandled: number
  /** wake-ups of threads whose page someone else filled */
  wakes: number
  reads: number
  sleeps: number
  spinHits: number
  removes: number
  unmaps: number
  remaps: number
  forks: number
  /** { handler } requests made */
  requests: number
  errors: number
  /** times the prefetch paused for demand faults */
  prefetchPauses: number
  /** engine-side demand latency: message read to page filled */
  latencyUs: LatencySummary
  /** the adaptive spin's current budget */
  spinBudgetUs: number
  /** pages poisoned (onSourceError 'poison') */
  poisonedPages: number
  /** MINOR ranges: pages this server put into the page cache */
  cachedPages: number
  /** fills that failed (a source that could not give the bytes, a fill ioctl that failed) */
  sourceErrors: number
  /** time faulting threads spent blocked, read to resolved, summed over faults (µs) */
  blockedUs: number
  /** every range's stage histograms, ranges no longer served included */
  stageHistograms: EngineStageHistograms
}

/** A native latency histogram: count, sum (ns) and non-empty buckets as [index, count] (src/util/histogram.ts). */
export interface EngineHistogram {
  count: number
  sum: number
  buckets: Array<[number, number]>
}

/** The stages of serving a fault (native/engine/fault_metrics.h), and read to resolved ('total'). */
export type FaultStage = 'read' | 'source' | 'fill' | 'wake' | 'total'
export type EngineStageHistograms = Record<FaultStage, EngineHistogram>

/** Pages by class: why a page was put in place, and with what; each page counts in one class. */
export type PageClass = 'demand' | 'around' | 'prefetch' | 'zero' | 'removed' | 'poisoned'

/** One served range's metrics, as the engine keeps them (FaultEngine.metrics()). */
export interface EngineRangeMetrics {
  id: number
  address: bigint
  length: number
  pageSize: number
  mode: FaultMode
  pagesPresent: number
  pagesTotal: number
  /** fault messages in the range (one per blocked thread) */
  faults: number
  /** their blocked time, read to resolved (ns) */
  blockedNs: number
  cachedPages: number
  sourceErrors: number
  pages: Record<PageClass, number>
  stages: EngineStageHistograms
}

/** A { handler } source is asked for `length` bytes at `address` (`offset` in the source). */
export interface FaultEngineRequest {
  id: number
  handler: number
  range: number
  address: bigint
  offset: number
  length: number
  prefetch: boolean
  /** demand requests: the faulting page's address */
  fault?: bigint
}

export type FaultEngineNotice =
  /** action: what onSourceError did about a failing fill ('retry' in retryInMs, 'poison', 'zero') */
  | { type: 'error'; error: NativeError; address?: bigint; action?: SourceErrorPolicy; retryInMs?: number }
  | { type: 'progress' }
  | { type: 'fork'; fd: number }
  | { type: 'requests'; requests: FaultEngineRequest[] }
  /** a native NBD prefetch has ended: prefetchResult(id) has its outcome */
  | { type: 'prefetched'; id: number }

export interface NbdPrefetchOptions {
  /** reads in flight per connection (default 256) */
  depth?: number
  /** no new read while the engine holds this many provided bytes (default 64 MiB) */
  maxQueued?: number
  /** reads in flight and nothing received for this long: failed (ms, default 30000) */
  timeoutMs?: number
  exportSize: number
}

export interface NbdPrefetchResult {
  /** per read: 1 where its bytes went to the engine */
  provided: Uint8Array
  bytes: number
  /** the first failure ('ECANCELED' when stopped), or null */
  error: NativeError | null
}

export interface FaultEngine {
  addRange(range: FaultEngineRange, source: FaultEngineSource): void
  /** stops serving every range inside [start, end); returns how many */
  removeRange(start: bigint, end: bigint): number
  /** a handler's bytes for a request (null: it failed) */
  complete(requestId: number, bytes: Bytes | null): void
  /**
   * Lends bytes fetched in the background (the source's bytes at `sourceOffset`) to the engine,
   * which installs them where range `rangeId`'s pages are still missing, between demand faults.
   * Referenced until installed: internal use only, with buffers nobody else can detach. Returns
   * the bytes queued.
   */
  provide(rangeId: number, sourceOffset: number, bytes: Bytes): number
  /** bytes provided and not yet installed */
  providedQueued(): number
  /** starts reading the uffd (an engine created with startPaused) */
  resume(): void
  /** working-set record: log demand faults (range id, base-page source offset) in order */
  recordTouches(on: boolean): void
  takeTouches(): { ranges: Uint32Array; offsets: Float64Array }
  /** a demand request its handler could not answer: the faulting page poisoned or zeroed */
  resolve(requestId: number, action: 'poison' | 'zero'): void
  stats(): FaultEngineStats
  metrics(): EngineRangeMetrics[]
  /** the demand-latency histogram's non-empty buckets (src/util/histogram.ts HistogramJSON) */
  latencyHistogram(): { count: number; buckets: Array<[number, number]> }
  settled(): Settlement
  /**
   * The fault records since the last call (null without traceCapacity): 40-byte
   * FaultTraceRecords (native/engine/fault_trace.h), and how many did not fit meanwhile.
   */
  takeTrace(): FaultEngineTrace | null
  /**
   * Reads [offset, length] pairs (in this order) from an NBD export in native code over dups of
   * `fds` (connected, past the handshake, simple replies) and provides them for range `rangeId`.
   * Ends with a 'prefetched' notice; never retries (JS reads what it did not provide).
   */
  prefetchNbd(rangeId: number, fds: number[], reads: Float64Array, options: NbdPrefetchOptions): number
  /** the outcome once the prefetch has ended (then forgotten), else null */
  prefetchResult(id: number): NbdPrefetchResult | null
  /** ends a prefetch and returns its outcome (then forgotten); null if unknown */
  prefetchStop(id: number): NbdPrefetchResult | null
  close(): void
  ref(): void
  unref(): void
}

export interface FaultEngineTrace {
  records: ArrayBuffer
  dropped: number
}

export type FaultEngineConstructor = new (
  uffd: number,
  options: FaultEngineOptions,
  notify: (notices: FaultEngineNotice[]) => void,
) => FaultEngine

// ---- the live snapshot engine (snapshot_engine.cc) --------------------------------------------------

export type CopyMethod = 'pwrite' | 'process_vm_readv' | 'pipe'

export interface SnapshotEngineOptions {
  chunkSize: number
  faultAround: number
  maxBytesPerSecond: number
  backgroundPriority: BackgroundPriority
  populate: boolean
  copyMethod: 'auto' | 'process_vm_readv' | 'pipe'
}

export type SnapshotEngineSink =
  | { fd: number; offset: number }
  /** memory the caller keeps mapped until `done` settles (a Mapping) */
  | { address: bigint; length: number }
  /** shared: a SharedArrayBuffer's view, written in place; else staged and copied in at the end */
  | { buffer: ArrayBufferView | ArrayBuffer; shared: boolean }

export interface SnapshotEngineStats {
  totalBytes: number
  bytesCopied: number
  totalPages: number
  pagesCopied: number
  /** pages copied because a writer hit them first */
  faultCopies: number
  /** pages copied by the background pass */
  backgroundCopies: number
  /** write faults received */
  faults: number
  /** faults on pages already copied (only woken) */
  wakes: number
  /** time to write-protect the range (writers stall on the range meanwhile) */
  protectMs: number
  /** since the snapshot instant */
  elapsedMs: number
  done: boolean
  /** the range was populated before protection */
  populated: boolean
  /** how pages were copied: 'pwrite' (file), 'process_vm_readv' or 'pipe' (memory) */
  copyMethod: CopyMethod
}

export interface SnapshotEngine {
  readonly done: Promise<SnapshotEngineStats>
  progress(): SnapshotEngineStats
  cancel(): void
  /** cancels (unless finished), joins the thread and settles `done` now */
  join(): void
}

export type SnapshotEngineConstructor = new (
  uffd: number,
  start: bigint,
  length: number,
  pageSize: number,
  sink: SnapshotEngineSink,
  options: SnapshotEngineOptions,
) => SnapshotEngine

// ---- migration (migration.cc, workload.cc) -------------------------------------------------------

/** What a migration session reports to JS, in batches, from its native threads. */
export interface MigrationNotice {
  kind: string
  /** CLOCK_MONOTONIC ns: when a frame was read */
  at?: bigint
  channel?: string
  errno?: number
  error?: Error
  /** the peer broke the protocol (a ProtocolError, not a lost connection) */
  protocol?: boolean
  message?: string
  id?: number
  payload?: Buffer
}

/** A range of a migration session: memory of this process (the source's, or the target's mapping). */
export interface MigrationSessionRange {
  address: bigint
  length: number
  pageSize: number
  /** target, memfd/hugetlbfs: an unregistered mapping of the same file (pages land there) */
  alias?: bigint
  /** target, memfd/hugetlbfs: the file (for FALLOC_FL_PUNCH_HOLE) */
  memfd?: number
}

/** The postcopyPriority knobs (src/migration/common.ts postcopyTuning); 0: left as it is. */
export interface MigrationTuning {
  /** post-copy: the main channel's SO_SNDBUF (source) or SO_RCVBUF (target), bytes */
  postcopyBuffer?: number
  /** the demand path's threads SCHED_FIFO where permitted */
  realtimeDemand?: boolean
}

export interface MigrationSourceOptions extends MigrationTuning {
  pingMs: number
  /** bytes per PAGES frame in the rounds and the push */
  chunkBytes: number
  /** bytes per PAGES frame of the post-copy push (0: chunkBytes) */
  pushChunkBytes?: number
  /** post-copy: the main channel's TCP_NOTSENT_LOWAT, bytes */
  notsentLowat?: number
  /** post-copy: the push thread's nice value (-20..19; below 0 where permitted) */
  pushNice?: number
}

export interface MigrationTargetOptions extends MigrationTuning {
  pingMs: number
  spinUs: number
  readSize?: number
  /** post-copy: the main channel's receiving thread's nice value (-20..19; below 0 where permitted) */
  bulkNice?: number
}

/** The source's session: sends rounds, serves demand requests, pushes the rest in post-copy. */
export interface MigrationSourceHandle {
  /** hands a connected socket to the session (dup'ed): the main or the demand channel; `initial`: stream bytes already read */
  attachMain(fd: number, initial?: Uint8Array): number
  attachDemand(fd: number, initial?: Uint8Array): number
  detach(): void
  close(): void
  send(channel: 'main' | 'demand', type: number, range: number, page: bigint, payload?: Uint8Array): void
  /** sends the pages of [range, page, count] triples (a round); a 'sent' notice with `id` when done */
  sendRuns(id: number, runs: Float64Array): void
  startPostcopy(runs: Float64Array, push: boolean): void
  resumePush(): void
  setPush(on: boolean): void
  setPushRate(bytesPerSecond: number): void
  stats(): Record<string, number>
  ref(): void
  unref(): void
}

export type MigrationSourceHandleConstructor = new (
  ranges: MigrationSessionRange[],
  options: MigrationSourceOptions,
  notify: (notices: MigrationNotice[]) => void,
) => MigrationSourceHandle

/** The target's session: receives pages into place, serves the workload's faults (a FaultEngine whose ranges delegate to it). */
export interface MigrationTargetHandle {
  attachMain(fd: number, initial?: Uint8Array): number
  attachDemand(fd: number, initial?: Uint8Array): number
  detach(): void
  close(): void
  send(channel: 'main', type: number, range: number, page: bigint, payload?: Uint8Array): void
  startServing(uffd: number): void
  registered(uffd: number): void
  dropUnreceived(): void
  populate(): void
  stopServing(): void
  resendRequests(): void
  /** a bitmap of the pages of `range` received */
  have(range: number): Buffer
  /** pages never received: poisoned (true) or zero-filled; returns how many */
  settle(poison: boolean): number
  verify(range: number, maskOffset: number, maskLength: number): Float64Array | null
  stats(): Record<string, number>
}

export type MigrationTargetHandleConstructor = new (
  ranges: MigrationSessionRange[],
  options: MigrationTargetOptions,
  notify: (notices: MigrationNotice[]) => void,
) => MigrationTargetHandle

export interface WorkloadHandleOptions {
  /** bytes of pages dirtied per second by the writers together (0: as fast as they can) */
  writeRate?: number
  /** where in each page the writers put their u64 stamp (a multiple of 8) */
  writeOffset?: number
  writers?: number
  /** threads reading random pages as fast as they can */
  readers?: number
  seed?: number
  /** the high bits of every stamp (tag << 40 | thread << 32 | count) */
  tag?: number
}

export interface WorkloadHandleStats {
  writes: number
  reads: number
  /** accesses that raised SIGBUS (a poisoned page): the thread stopped there */
  sigbus: number
  sigbusAddress: bigint
  /** accesses slower than 2 us (faults), and their latency */
  faults: number
  faultP50us: number
  faultP99us: number
  faultMaxUs: number
  running: number
}

/** new Workload(address, length, pageSize, options): writer and reader threads on a range (workload.cc). */
export interface WorkloadHandle {
  /** parks the writers (true once all are parked); readers go on */
  pause(timeoutMs?: number): boolean
  resume(): void
  /** ends the threads; returns how many could not end (blocked in a fault) and were left behind */
  stop(timeoutMs?: number): number
  stats(): WorkloadHandleStats
  /** the last stamp written to each page (0n: none) */
  stamps(): BigUint64Array
}

export type WorkloadHandleConstructor = new (
  address: bigint,
  length: number,
  pageSize: number,
  options: WorkloadHandleOptions,
) => WorkloadHandle

// ---- synchronous dirty tracking (wp_dirty_tracker.cc) -----------------------------------------

/**
 * new WpDirtyTracker(uffd, start, length, pageSize, missing): a native thread serves the range's
 * write-protect faults (marks the page written, unprotects it) where WP_ASYNC is missing.
 */
export interface WpDirtyTracker {
  /** page addresses written since the last collect; with `reprotect`, protects them again */
  collect(reprotect: boolean): BigUint64Array
  stats(): { wpFaults: number; missingFaults: number }
  stop(): void
}

export type WpDirtyTrackerConstructor = new (
  uffd: number,
  start: bigint,
  length: number,
  pageSize: number,
  missing: boolean,
) => WpDirtyTracker

// ---- the whole addon ----------------------------------------------------------------------------

export interface Binding {
  constants: NativeConstants
  /** errors.cc: the class native errors are made with */
  setErrorClass(ctor: new (message: string) => Error): void
  // uffd_open.cc
  openSyscall(flags: number): number
  openDevice(flags: number, path?: string): number
  /** UFFDIO_API: [granted features, ioctls] */
  api(fd: number, features: bigint): [bigint, bigint]
  close(fd: number): void
  adopt(fd: number): void
  // uffd_ioctls.cc: one ioctl each; the fill ioctls return bytes done
  register(fd: number, start: U64, length: U64, mode: bigint): bigint
  unregister(fd: number, start: U64, length: U64): void
  wake(fd: number, start: U64, length: U64): void
  copy(fd: number, dst: U64, src: U64 | Bytes, length: U64, mode: bigint): number
  zeropage(fd: number, start: U64, length: U64, mode: bigint): number
  continue(fd: number, start: U64, length: U64, mode: bigint): number
  poison(fd: number, start: U64, length: U64, mode: bigint): number
  move(fd: number, dst: U64, src: U64, length: U64, mode: bigint): number
  writeProtect(fd: number, start: U64, length: U64, mode: bigint): void
  // uffd_read.cc
  readMessages(fd: number, view: ArrayBufferView): number
  // event_reader.cc, fd_watcher.cc
  EventReader: EventReaderConstructor
  FdWatcher: FdWatcherConstructor
  /** uv poll handles (event readers, fd watchers) this environment has open: leak checks */
  openPollHandles(): number
  // mapping.cc
  MappingHandle: MappingHandleConstructor
  // fd_passing.cc
  socketpair(type: 'stream' | 'seqpacket' | 'dgram'): [number, number]
  /** bytes sent, or -1 when the socket would block */
  sendFds(sock: number, payload: ArrayBufferView, fds?: number[]): number
  /** null when nothing is pending */
  recvFds(sock: number, buffer: ArrayBufferView, maxFds: number): RecvFdsResult | null
  peerCred(sock: number): PeerCredentials
  pidfdOpen(pid: number): number
  fdFlags(fd: number): { cloexec: boolean; nonblock: boolean }
  // pagemap_scan.cc
  pagemapScan(
    pid: number,
    start: U64,
    end: U64,
    flags: U64,
    categoryInverted: U64,
    categoryMask: U64,
    categoryAnyofMask: U64,
    returnMask: U64,
    maxPages: U64,
    maxRegions: U64,
  ): { regions: BigUint64Array; walkEnd: bigint }
  /** errno of a deliberately invalid call: EINVAL = the ioctl exists, ENOTTY = it does not */
  pagemapScanProbe(): number
  // fault_engine.cc, snapshot_engine.cc
  FaultEngine: FaultEngineConstructor
  // page_cache.cc
  PageCache: PageCacheConstructor
  SnapshotEngine: SnapshotEngineConstructor
  // migration.cc, workload.cc
  MigrationSourceHandle: MigrationSourceHandleConstructor
  MigrationTargetHandle: MigrationTargetHandleConstructor
  /** one 64-bit hash per page; bytes [maskOffset, maskOffset + maskLength) of each page left out */
  pageHashes(address: bigint, length: number, pageSize: number, maskOffset: number, maskLength: number): BigUint64Array
  Workload: WorkloadHandleConstructor
  // wp_dirty_tracker.cc
  WpDirtyTracker: WpDirtyTrackerConstructor
}
