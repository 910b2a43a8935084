// Live snapshots: a consistent copy of memory that other threads keep writing, without stopping
// them. takeSnapshot() write-protects the range (that instant is the snapshot), then a native
// thread copies each page out before the first write to it goes through, and copies the rest in
// the background. No JS runs per fault; see native/engine/snapshot_engine.h.
import * as fs from 'node:fs'
import { types } from 'node:util'
import type {
  BackgroundPriority,
  SnapshotEngine,
  SnapshotEngineSink,
  SnapshotEngineStats as SnapshotStats,
} from '../addon/binding'
import { native } from '../addon/native'
import { Feature, PAGE_SIZE } from '../core/constants'
import { UnsupportedError, type UffdError } from '../core/errors'
import { unsupported } from '../core/kernel-features'
import { Mapping, memoryKindOf } from '../core/mapping'
import { checkAligned, toRange, type Range, type RangeLike } from '../core/range'
import { Userfaultfd } from '../core/userfaultfd'
import { choice, describe, func, nonNegative, optionalInt, powerOfTwo } from '../util/validate'

/**
 * Where the pages go. File sinks get each page at `offset` + its offset in the range (so a
 * file snapshot restores with FaultServer's `{ file, offset }` source). A `buffer` sink is an
 * ArrayBuffer or view (the pages are gathered in engine memory and copied into it when the
 * snapshot is done: a buffer detached meanwhile makes `done` reject with EFAULT, and nothing is
 * written into freed memory), a SharedArrayBuffer or a view of one (written in place: it cannot
 * be detached), or a Mapping (written in place; its unmap() waits until `done` settles).
 */
export type SnapshotSink =
  | { path: string; offset?: number }
  | { fd: number; offset?: number }
  | { buffer: ArrayBuffer | SharedArrayBuffer | ArrayBufferView | Mapping }

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
   * The background copy's priority: 'normal' (default) or 'idle' (SCHED_IDLE: only on CPU time
   * nobody else wants; writers keep more of the machine, the snapshot takes longer). The default
   * differs from the FaultServer's prefetch ('idle') on purpose: the background copy IS the
   * snapshot (under busy writers an idle one might never finish), while a prefetch only fetches
   * early what demand faults fetch anyway.
   */
  backgroundPriority?: BackgroundPriority
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

// The snapshot's counters (LiveSnapshot.done), as the engine returns them (src/addon/binding.ts).
export type { SnapshotStats }
export type { BackgroundPriority, CopyMethod } from '../addon/binding'

/** How far a live snapshot is (LiveSnapshot.progress(), onProgress): the stats without what is known only at the end. */
export type SnapshotProgress = Omit<SnapshotStats, 'populated' | 'copyMethod'>

function checkOffset(value: unknown): number {
  return optionalInt(value, 'sink offset', 0, 0)
}

/** A live snapshot under way (takeSnapshot()): its progress, its end (`done`), and cancel (close()). */
export class LiveSnapshot {
  /** The snapshotted range. */
  readonly range: Range
  /** Page size of the range (a huge page size for hugetlb memory). */
  readonly pageSize: number
  /** Resolves with the stats once every page is in the sink; rejects with a UffdError. */
  readonly done: Promise<SnapshotStats>
  /**
   * Which path it took: true when the range was populated before it was protected (kernels
   * without WP_UNPOPULATED, before 6.4, or populate: true), false when WP_UNPOPULATED covered it.
   */
  readonly populated: boolean
  #engine: SnapshotEngine
  #uffd: Userfaultfd

  /** @internal use takeSnapshot() */
  constructor(
    range: Range,
    pageSize: number,
    engine: SnapshotEngine,
    uffd: Userfaultfd,
    done: Promise<SnapshotStats>,
    populated: boolean,
  ) {
    this.range = range
    this.pageSize = pageSize
    this.#engine = engine
    this.#uffd = uffd
    this.done = done
    this.populated = populated
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
 * (5.19+) for shmem/hugetlb; both 6.10+ on arm64). Throws UnsupportedError where the kernel
 * lacks it.
 */
export function takeSnapshot(
  range: Mapping | RangeLike,
  sink: SnapshotSink,
  options: SnapshotOptions = {},
): LiveSnapshot {
  if (options === null || typeof options !== 'object')
    throw new TypeError(`options must be an object (got ${describe(options)})`)
  const r = toRange(range)
  const pageSize =
    range instanceof Mapping
      ? range.pageSize
      : options.pageSize === undefined
        ? PAGE_SIZE
        : powerOfTwo(options.pageSize, 'pageSize', PAGE_SIZE, 1 << 30)
  checkAligned(r.address, r.length, 'takeSnapshot', pageSize)
  const chunkSize = optionalInt(options.chunkSize, 'chunkSize', 2 * 1024 * 1024, 1)
  const faultAround = optionalInt(options.faultAround, 'faultAround', 64 * 1024, 0)
  const maxBytesPerSecond = nonNegative(options.maxBytesPerSecond, 'maxBytesPerSecond', 0)
  const interval = optionalInt(options.progressIntervalMs, 'progressIntervalMs', 100, 1)
  if (options.onProgress !== undefined) func(options.onProgress, 'onProgress')
  const backgroundPriority = choice(
    options.backgroundPriority,
    'backgroundPriority',
    ['normal', 'idle'] as const,
    'normal',
  )
  if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted')

  const probe = Userfaultfd.probe()
  if (!probe.supported)
    throw new UnsupportedError(`live snapshots need userfaultfd: ${probe.reason ?? 'not available'}`, {
      syscall: 'takeSnapshot',
    })
  const offered = probe.features
  const memory = memoryKindOf(range)
  // Write protection: 5.7 on x86_64, 6.10 on arm64 (kernelRelease() knows).
  if ((offered & Feature.PAGEFAULT_FLAG_WP) === 0n) throw unsupported('PAGEFAULT_FLAG_WP', 'takeSnapshot()')
  if (memory !== 'anonymous' && (offered & Feature.WP_HUGETLBFS_SHMEM) === 0n)
    throw unsupported('WP_HUGETLBFS_SHMEM', `takeSnapshot() of ${memory} memory`)
  const wpUnpopulated = (offered & Feature.WP_UNPOPULATED) !== 0n
  const populate = options.populate === undefined || options.populate === 'auto' ? !wpUnpopulated : options.populate
  if (typeof populate !== 'boolean')
    throw new TypeError(`populate must be a boolean or 'auto' (got ${describe(options.populate)})`)
  // Without WP_UNPOPULATED a page never touched stays writable: a write there would change the
  // snapshot after its instant. 'auto' populates first; an explicit `false` cannot be honoured.
  if (!populate && !wpUnpopulated && memory === 'anonymous')
    throw unsupported('WP_UNPOPULATED', 'takeSnapshot() with { populate: false }')

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
  const snapshot = new LiveSnapshot(r, pageSize, engine, uffd, done, populate)
  options.signal?.addEventListener('abort', onAbort, { once: true })
  return snapshot
}

function openSink(sink: SnapshotSink, length: number): { sink: SnapshotEngineSink; close: () => void } {
  if (sink === null || typeof sink !== 'object')
    throw new TypeError(`sink must be { path }, { fd } or { buffer } (got ${describe(sink)})`)
  if ('buffer' in sink) {
    const b = sink.buffer
    if (b instanceof Mapping) {
      if (b.length < length) throw new RangeError(`sink.buffer holds ${b.length} bytes; the range has ${length}`)
      return { sink: { address: b.address, length: b.length }, close: b._pin() }
    }
    const bytes = types.isSharedArrayBuffer(b) ? new Uint8Array(b) : b
    if (!(bytes instanceof ArrayBuffer) && !ArrayBuffer.isView(bytes))
      throw new TypeError(
        `sink.buffer must be an ArrayBuffer, a SharedArrayBuffer, a view or a Mapping (got ${describe(b)})`,
      )
    if (bytes.byteLength < length)
      throw new RangeError(`sink.buffer holds ${bytes.byteLength} bytes; the range has ${length}`)
    const shared = ArrayBuffer.isView(bytes) && types.isSharedArrayBuffer(bytes.buffer)
    return { sink: { buffer: bytes, shared }, close: () => {} }
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
