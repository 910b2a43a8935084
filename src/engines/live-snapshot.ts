// Live snapshots: a consistent copy of memory that other threads keep writing, without stopping
// them. takeSnapshot() write-protects the range (that instant is the snapshot), then a native
// thread copies each page out before the first write to it goes through, and copies the rest in
// the background. No JS runs per fault; see native/binding/live_snapshot.cc.
import * as fs from 'node:fs'
import { native, type SnapshotEngine } from '../addon/native'
import { Userfaultfd } from '../core/userfaultfd'
import { Feature, PAGE_SIZE } from '../core/constants'
import { UnsupportedError, type UffdError } from '../core/errors'
import { Mapping } from '../core/mapping'
import { checkAligned, describe, toRange, type Range, type RangeLike } from '../core/range'

/**
 * Where the pages go. File sinks get each page at `offset` + its offset in the range (so a
 * file snapshot restores with FaultServer's `{ file, offset }` source).
 */
export type SnapshotSink =
  | { path: string; offset?: number }
  | { fd: number; offset?: number }
  | { buffer: ArrayBuffer | ArrayBufferView }

/** Options of takeSnapshot(). */
export interface SnapshotOptions {
  /**
   * Fault every page in before protecting (MADV_POPULATE_WRITE). 'auto' (default): only where
   * the kernel lacks WP_UNPOPULATED, without which write-protection skips pages never touched.
   */
  populate?: boolean | 'auto'
  /** bytes copied per background step (default 2 MiB, at least a page); faults are served meanwhile */
  chunkSize?: number
  /**
   * On a writer's fault, also copy the pages not yet copied around it, within this aligned
   * window (default 64 KiB; 0 or a page size: only the faulting page). Fewer faults for writers
   * that move through memory; a little more latency per fault for writers that jump around.
   */
  faultAround?: number
  /** limit the background copy rate (faults are always served at once) */
  maxBytesPerSecond?: number
  /**
   * 'normal' (default), or 'idle': the background copy runs under SCHED_IDLE, only on CPU time
   * nobody else wants (writers keep more of the machine; the snapshot takes longer).
   */
  backgroundPriority?: 'normal' | 'idle'
  /** called with progress every progressIntervalMs while the snapshot runs, and once at the end */
  onProgress?: (progress: SnapshotProgress) => void
  /** Interval of onProgress calls (default 100 ms). */
  progressIntervalMs?: number
  /** aborting cancels the snapshot (done rejects with code 'ECANCELED') */
  signal?: AbortSignal
  /** page size of a plain { address, length } range over huge pages (a Mapping knows its own) */
  pageSize?: number
  /** @internal how a buffer sink is filled: 'auto' (process_vm_readv, else a pipe) */
  copyMethod?: 'auto' | 'process_vm_readv' | 'pipe'
  /** @internal false: do not ask for unmap/remove/remap events (tests the copy's own EFAULT path) */
  events?: boolean
}

/** How far a live snapshot is (LiveSnapshot.progress(), onProgress). */
export interface SnapshotProgress {
  /** Bytes in the range. */
  totalBytes: number
  /** Bytes in the sink so far. */
  bytesCopied: number
  /** Pages in the range. */
  totalPages: number
  /** Pages in the sink so far. */
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
  /** Every page is in the sink. */
  done: boolean
}

/** A finished live snapshot (LiveSnapshot.done). */
export interface SnapshotStats extends SnapshotProgress {
  /** the range was populated before protection (see SnapshotOptions.populate) */
  populated: boolean
  /** how pages were copied: 'pwrite' (file), 'process_vm_readv' or 'pipe' (buffer) */
  copyMethod: 'pwrite' | 'process_vm_readv' | 'pipe'
}

function memoryOf(range: unknown): 'anonymous' | 'shmem' | 'hugetlb' {
  if (range instanceof Mapping) return range.hugetlb ? 'hugetlb' : range.kind === 'memfd' ? 'shmem' : 'anonymous'
  return 'anonymous'
}

function checkOffset(value: unknown): number {
  const offset = value ?? 0
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
    throw new RangeError(`sink offset must be a non-negative integer (got ${describe(offset)})`)
  }
  return offset
}

/** A live snapshot under way (takeSnapshot()): its progress, its end (`done`), and cancel (close()). */
export class LiveSnapshot {
  /** The snapshotted range. */
  readonly range: Range
  /** Page size of the range (a huge page size for hugetlb memory). */
  readonly pageSize: number
  /** Resolves with the stats once every page is in the sink; rejects with a UffdError. */
  readonly done: Promise<SnapshotStats>
  #engine: SnapshotEngine
  #uffd: Userfaultfd

  /** @internal use takeSnapshot() */
  constructor(range: Range, pageSize: number, engine: SnapshotEngine, uffd: Userfaultfd, done: Promise<SnapshotStats>) {
    this.range = range
    this.pageSize = pageSize
    this.#engine = engine
    this.#uffd = uffd
    this.done = done
  }

  /** Progress so far (cheap: reads counters). */
  progress(): SnapshotProgress {
    return strip(this.#engine.progress())
  }

  /**
   * Stops the snapshot: pages not yet copied are released to the writers uncopied, and `done`
   * rejects with code 'ECANCELED' (unless it had already finished). Waits for the native thread.
   */
  async cancel(): Promise<void> {
    this.close()
    await this.done.catch(() => {})
  }

  /** Synchronous cancel(): stops and joins the native thread, releases the writers. Idempotent. */
  close(): void {
    // An explicit stop: the ECANCELED rejection is expected, not an unhandled error.
    this.done.catch(() => {})
    this.#engine.join()
    this.#uffd.close()
  }

  /** close(), then waits for the engine to stop: for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.cancel()
  }
}

function strip(p: SnapshotStats | SnapshotProgress): SnapshotProgress {
  const { populated: _p, copyMethod: _c, ...rest } = p as SnapshotStats
  return rest
}

/**
 * Takes a live snapshot of `range` (memory of this process: a Mapping, or { address, length })
 * into `sink`. When this returns, the range is write-protected: the snapshot is the memory as
 * of that instant, whatever is written afterwards. Writers keep running; each first write to a
 * page waits until that page was copied. Await `done` for the result.
 *
 * Needs userfaultfd write-protection (Linux 5.7+ for anonymous memory, WP_HUGETLBFS_SHMEM
 * (5.19+) for shmem/hugetlb). Throws UnsupportedError where the kernel lacks it.
 */
export function takeSnapshot(
  range: Mapping | RangeLike,
  sink: SnapshotSink,
  options: SnapshotOptions = {},
): LiveSnapshot {
  if (options === null || typeof options !== 'object')
    throw new TypeError(`options must be an object (got ${describe(options)})`)
  const r = toRange(range)
  const pageSize = range instanceof Mapping ? range.pageSize : (options.pageSize ?? PAGE_SIZE)
  if (!Number.isSafeInteger(pageSize) || pageSize < PAGE_SIZE || (pageSize & (pageSize - 1)) !== 0) {
    throw new RangeError(`pageSize must be a power of two >= ${PAGE_SIZE} (got ${describe(pageSize)})`)
  }
  checkAligned(r.address, r.length, 'takeSnapshot', pageSize)
  const chunkSize = options.chunkSize ?? 2 * 1024 * 1024
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1)
    throw new RangeError(`chunkSize must be a positive integer (got ${describe(chunkSize)})`)
  const faultAround = options.faultAround ?? 64 * 1024
  if (!Number.isSafeInteger(faultAround) || faultAround < 0)
    throw new RangeError(`faultAround must be a non-negative integer (got ${describe(faultAround)})`)
  const maxBytesPerSecond = options.maxBytesPerSecond ?? 0
  if (typeof maxBytesPerSecond !== 'number' || !(maxBytesPerSecond >= 0)) {
    throw new RangeError(`maxBytesPerSecond must be a non-negative number (got ${describe(maxBytesPerSecond)})`)
  }
  const interval = options.progressIntervalMs ?? 100
  if (!Number.isSafeInteger(interval) || interval < 1)
    throw new RangeError(`progressIntervalMs must be a positive integer (got ${describe(interval)})`)
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function')
    throw new TypeError('onProgress must be a function')
  const backgroundPriority = options.backgroundPriority ?? 'normal'
  if (backgroundPriority !== 'normal' && backgroundPriority !== 'idle') {
    throw new TypeError(`backgroundPriority must be 'normal' or 'idle' (got ${describe(backgroundPriority)})`)
  }
  if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted')

  const probe = Userfaultfd.probe()
  if (!probe.supported)
    throw new UnsupportedError(`live snapshots need userfaultfd: ${probe.reason ?? 'not available'}`)
  const offered = probe.features
  const memory = memoryOf(range)
  if ((offered & Feature.PAGEFAULT_FLAG_WP) === 0n) {
    throw new UnsupportedError(
      `live snapshots need userfaultfd write-protection (Linux 5.7+), which this kernel (${probe.kernel}) lacks`,
    )
  }
  if (memory !== 'anonymous' && (offered & Feature.WP_HUGETLBFS_SHMEM) === 0n) {
    throw new UnsupportedError(
      `a live snapshot of ${memory} memory needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+), which this kernel (${probe.kernel}) lacks`,
    )
  }
  const wpUnpopulated = (offered & Feature.WP_UNPOPULATED) !== 0n
  const populate = options.populate === undefined || options.populate === 'auto' ? !wpUnpopulated : options.populate
  if (typeof populate !== 'boolean')
    throw new TypeError(`populate must be a boolean or 'auto' (got ${describe(options.populate)})`)

  // Events that change the range while it is copied (munmap, mremap, MADV_DONTNEED) would lose
  // pages not yet copied: with them the engine sees that and fails the snapshot.
  let features = Feature.PAGEFAULT_FLAG_WP | (offered & Feature.WP_HUGETLBFS_SHMEM)
  if (options.events !== false) features |= offered & (Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP)
  if (!populate && wpUnpopulated) features |= Feature.WP_UNPOPULATED

  const nativeSink = openSink(sink, r.length)
  const uffd = Userfaultfd.open({ features })
  let engine: SnapshotEngine
  try {
    uffd.register(r, { wp: true })
    engine = new native.SnapshotEngine(uffd.fd, r.address, r.length, pageSize, nativeSink.sink, {
      chunkSize: Math.max(chunkSize, pageSize),
      faultAround,
      maxBytesPerSecond,
      backgroundPriority,
      populate,
      copyMethod: options.copyMethod ?? 'auto',
    })
  } catch (err) {
    uffd.close()
    nativeSink.close()
    throw err
  }

  let timer: NodeJS.Timeout | undefined
  const report = (p: SnapshotProgress): void => {
    try {
      options.onProgress!(p)
    } catch (err) {
      process.nextTick(() => {
        throw err
      })
    }
  }
  if (options.onProgress !== undefined) {
    timer = setInterval(() => report(strip(engine.progress())), interval)
    timer.unref()
  }
  const onAbort = (): void => snapshot.close()
  const finish = (): void => {
    if (timer !== undefined) clearInterval(timer)
    options.signal?.removeEventListener('abort', onAbort)
    // At once, in this same turn: until the fd is closed, an munmap of the range elsewhere
    // would wait for its event to be read.
    uffd.close()
    nativeSink.close()
  }
  const done = engine.done.then(
    (stats) => {
      finish()
      if (options.onProgress !== undefined) report(strip(stats))
      return stats
    },
    (err: UffdError) => {
      finish()
      throw err
    },
  )
  const snapshot = new LiveSnapshot(r, pageSize, engine, uffd, done)
  options.signal?.addEventListener('abort', onAbort, { once: true })
  return snapshot
}

function openSink(
  sink: SnapshotSink,
  length: number,
): { sink: { fd: number; offset: number } | { buffer: ArrayBuffer | ArrayBufferView }; close: () => void } {
  if (sink === null || typeof sink !== 'object')
    throw new TypeError(`sink must be { path }, { fd } or { buffer } (got ${describe(sink)})`)
  if ('buffer' in sink) {
    const b = sink.buffer
    if (!(b instanceof ArrayBuffer) && !ArrayBuffer.isView(b))
      throw new TypeError(`sink.buffer must be an ArrayBuffer or a view (got ${describe(b)})`)
    if (b.byteLength < length) throw new RangeError(`sink.buffer holds ${b.byteLength} bytes; the range has ${length}`)
    return { sink: { buffer: b }, close: () => {} }
  }
  if ('fd' in sink) {
    if (!Number.isSafeInteger(sink.fd) || sink.fd < 0)
      throw new TypeError(`sink.fd must be a non-negative integer (got ${describe(sink.fd)})`)
    return { sink: { fd: sink.fd, offset: checkOffset(sink.offset) }, close: () => {} }
  }
  if ('path' in sink) {
    if (typeof sink.path !== 'string') throw new TypeError(`sink.path must be a string (got ${describe(sink.path)})`)
    const offset = checkOffset(sink.offset)
    const fd = fs.openSync(sink.path, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600)
    try {
      if (fs.fstatSync(fd).size < offset + length) fs.ftruncateSync(fd, offset + length)
    } catch (err) {
      fs.closeSync(fd)
      throw err
    }
    let open = true
    return {
      sink: { fd, offset },
      close: () => {
        if (open) fs.closeSync(fd)
        open = false
      },
    }
  }
  throw new TypeError('sink must be { path }, { fd } or { buffer }')
}
