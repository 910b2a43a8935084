// FaultResolver: resolves faults the way every handler must but few do. EEXIST means another
// resolver (or fault-around) got there first: done. EAGAIN with bytes > 0 is partial progress:
// continue with the rest. EAGAIN with bytes 0 means a FORK/REMAP/REMOVE/UNMAP event is pending
// (mmap_changing): the op is deferred and retried after the uffd's next read and on a short
// backoff timer, never in a tight loop on the thread that must read that event.
import type { UffdError } from './errors'
import type { CopyOptions, Userfaultfd, WakeOption } from './userfaultfd'
import type { RangeLike } from './range'

/** What a resolver call did: 'done', 'exists' (EEXIST: someone filled it first) or 'deferred' (EAGAIN: queued until the pending event is read). */
export type ResolveOutcome = 'done' | 'exists' | 'deferred'

/** Options of new FaultResolver(). */
export interface FaultResolverOptions {
  /** Called when a deferred op finally fails with something other than EAGAIN/EEXIST. */
  onError?: (error: UffdError) => void
}

type Op = (offset: number) => number

function sourceAt(src: ArrayBuffer | ArrayBufferView | bigint, offset: number, len: number): Uint8Array | bigint {
  if (typeof src === 'bigint') return src + BigInt(offset)
  const view = ArrayBuffer.isView(src)
  return new Uint8Array(view ? src.buffer : src, (view ? src.byteOffset : 0) + offset, len - offset)
}

interface Deferred {
  op: Op
  length: number
  offset: number
}

const MAX_BACKOFF_MS = 50

/**
 * Resolves faults the way every handler must: EEXIST counts as done, partial progress (EAGAIN
 * with bytes > 0) continues with the rest, and EAGAIN with bytes 0 (an event is pending) defers
 * the op until the uffd's next read, never retrying in a tight loop. It is the path for fault
 * handlers written in JavaScript (events() + resolver); the package's own servers (FaultServer,
 * the Firecracker handler, `userfaultfd serve`) use the native engine instead (docs/architecture.md).
 */
export class FaultResolver {
  readonly #uffd: Userfaultfd
  readonly #onError: (error: UffdError) => void
  #deferred: Deferred[] = []
  #timer: NodeJS.Timeout | undefined
  #backoff = 1
  #retries = 0
  #detach: () => void

  constructor(uffd: Userfaultfd, options: FaultResolverOptions = {}) {
    this.#uffd = uffd
    this.#onError =
      options.onError ??
      ((e) => {
        process.emitWarning(`FaultResolver: ${e.message}`, 'UffdWarning')
      })
    this.#detach = uffd._onRead(() => this.#scheduleRetry(true))
  }

  /** Ops waiting for a pending event to be read. */
  get pending(): number {
    return this.#deferred.length
  }

  /** How many deferred retries were attempted (for stats and tests). */
  get retries(): number {
    return this.#retries
  }

  /**
   * UFFDIO_COPY of `length` bytes (default: src's size) with EEXIST/EAGAIN handled. A deferred
   * copy keeps a copy of the bytes, so `src` may be reused at once; an address `src` must stay
   * valid until the op is done.
   */
  copy(
    dst: bigint,
    src: ArrayBuffer | ArrayBufferView | bigint,
    length?: number,
    options?: CopyOptions,
  ): ResolveOutcome {
    const len = length ?? (typeof src === 'bigint' ? undefined : src.byteLength)
    if (len === undefined) throw new TypeError('copy: length is required when src is an address')
    const first: Op = (offset) => {
      if (offset === 0) return this.#uffd.copy(dst, src, len, options)
      return this.#uffd.copy(dst + BigInt(offset), sourceAt(src, offset, len), len - offset, options)
    }
    // A deferred copy keeps its own snapshot of the bytes: callers may reuse their buffer.
    const later = (offset: number): Op => {
      if (typeof src === 'bigint') return first
      const kept = (sourceAt(src, offset, len) as Uint8Array).slice()
      return (at) => this.#uffd.copy(dst + BigInt(at), kept.subarray(at - offset), len - at, options)
    }
    return this.#run(first, len, later)
  }

  /** UFFDIO_ZEROPAGE with EEXIST/EAGAIN handled. */
  zeropage(range: RangeLike, options?: WakeOption): ResolveOutcome {
    const len = Number(range.length)
    return this.#run(
      (offset) => this.#uffd.zeropage({ address: range.address + BigInt(offset), length: len - offset }, options),
      len,
    )
  }

  /** UFFDIO_CONTINUE with EEXIST/EAGAIN handled. */
  continue(range: RangeLike, options?: CopyOptions): ResolveOutcome {
    const len = Number(range.length)
    return this.#run(
      (offset) => this.#uffd.continue({ address: range.address + BigInt(offset), length: len - offset }, options),
      len,
    )
  }

  /** Retries deferred ops now; returns how many remain deferred. */
  retry(): number {
    const ops = this.#deferred
    this.#deferred = []
    for (const d of ops) {
      this.#retries++
      try {
        this.#continueFrom(d.op, d.length, d.offset)
      } catch (err) {
        this.#onError(err as UffdError)
      }
    }
    return this.#deferred.length
  }

  /** Stops listening to the uffd and cancels the backoff timer (deferred ops are dropped). */
  close(): void {
    this.#detach()
    if (this.#timer !== undefined) clearTimeout(this.#timer)
    this.#timer = undefined
    this.#deferred = []
  }

  #run(op: Op, length: number, later?: (offset: number) => Op): ResolveOutcome {
    return this.#continueFrom(op, length, 0, later)
  }

  #continueFrom(op: Op, length: number, offset: number, later?: (offset: number) => Op): ResolveOutcome {
    while (offset < length) {
      try {
        offset += op(offset)
      } catch (err) {
        const e = err as UffdError
        if (e.code === 'EEXIST') return 'exists'
        if (e.code === 'EAGAIN' && (e.bytes ?? 0) > 0) {
          offset += e.bytes!
          continue
        }
        if (e.code === 'EAGAIN') {
          this.#deferred.push({ op: later !== undefined ? later(offset) : op, length, offset })
          this.#scheduleRetry(false)
          return 'deferred'
        }
        if (this.#uffd.closed) return 'done'
        throw e
      }
    }
    return 'done'
  }

  #scheduleRetry(afterRead: boolean): void {
    if (this.#deferred.length === 0) {
      this.#backoff = 1
      return
    }
    if (afterRead) this.#backoff = 1
    if (this.#timer !== undefined) return
    // The event that caused EAGAIN may just have been read, but mmap_changing only drops once
    // the thread that caused it runs again: retry on a short, growing timer.
    this.#timer = setTimeout(() => {
      this.#timer = undefined
      this.retry()
      this.#backoff = Math.min(this.#backoff * 2, MAX_BACKOFF_MS)
      this.#scheduleRetry(false)
    }, this.#backoff)
  }
}
