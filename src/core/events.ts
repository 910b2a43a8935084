// The async event stream of a uffd: an EventReader (native, on this thread's event loop) drains
// the fd with one read(2) of many messages per wake-up; this module decodes them, queues them
// with backpressure (stop reading the fd when the consumer lags: faulting threads just wait),
// and hands them out one by one or as batches.
import type { EventReader, NativeError } from '../addon/binding'
import { native } from '../addon/native'
import { debug } from '../util/diagnostics'
import { checkRenamed, describe, int, optionalInt } from '../util/validate'
import { Feature } from './constants'
import { decodeMessages, type UffdMessage } from './messages'

/** Options of Userfaultfd.events(). */
export interface EventsOptions {
  /** Ends the iteration with an AbortError. */
  signal?: AbortSignal
  /**
   * false (default): yield events one by one. true: yield each read(2)'s events as an array
   * (the fast form for handlers that resolve synchronously). A number N: arrays of at most N.
   */
  batch?: boolean | number
  /** Messages per read(2) (default 128). */
  readSize?: number
  /** Events queued before the reader stops reading the fd (default 1024). */
  highWaterMark?: number
  /**
   * Deadlock watchdog: if this thread blocks in a userfault while the uffd it reads holds an
   * unread fault of this very thread for this long, print why and abort instead of hanging
   * forever. Default 1000 ms; 0 disables it. (Before 0.2: `watchdog`, false to disable.)
   */
  watchdogMs?: number
}

/**
 * What the stream needs from its uffd (a Userfaultfd), generic over the events it makes of the
 * messages, so that this module needs no import of it (no import cycle).
 */
export interface EventSource<E> {
  readonly fd: number
  readonly features: bigint
  toEvents(messages: UffdMessage[]): E[]
  /** called with each batch before it is queued (registration bookkeeping, deferred retries) */
  _onBatch(events: E[]): void
  /** called when the stream ends */
  _onStreamEnd(stream: object): void
  /** events read but never handed out (the stream ended first) */
  _release(events: E[]): void
  /** whether the reader should keep the process alive */
  _wantsRef(): boolean
}

type Waiter<T> = { resolve: (r: IteratorResult<T, undefined>) => void; reject: (e: unknown) => void }

/**
 * The async event stream of a uffd (`uffd.events()`). `T` is what it yields: `UffdEvent`, or
 * `UffdEvent[]` when made with `{ batch: true }` or `{ batch: N }` (Userfaultfd.events()'s
 * overloads pick it from the options). It has no default: naming UffdEvent here would make this
 * module and core/userfaultfd.ts import each other.
 */
export class EventStream<T> implements AsyncIterableIterator<T> {
  readonly #source: EventSource<unknown>
  /** the uffd's fd number (for NODE_DEBUG lines: the uffd may be closed by then) */
  readonly #fd: number
  readonly #reader: EventReader
  readonly #view: DataView
  readonly #threadId: boolean
  readonly #batchMax: number // 0: single events
  readonly #highWaterMark: number
  readonly #signal: AbortSignal | undefined
  readonly #onAbort: () => void
  // Queue of read batches; #head indexes into the first one (single-event mode).
  #queue: unknown[][] = []
  #head = 0
  #queued = 0
  #waiters: Waiter<T>[] = []
  #ended = false
  #error: unknown = undefined
  #paused = false

  /** @internal made by Userfaultfd.events() */
  constructor(source: EventSource<unknown>, options: EventsOptions = {}) {
    if (options === null || typeof options !== 'object')
      throw new TypeError(`events options must be an object (got ${describe(options)})`)
    checkRenamed(options, { watchdog: 'watchdogMs' }, 'events')
    const { batch, signal } = options
    if (batch !== undefined && typeof batch !== 'boolean') int(batch, 'batch', 1, 4096)
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw new TypeError('signal must be an AbortSignal')
    const watchdogMs = optionalInt(options.watchdogMs, 'watchdogMs', 1000, 0, 3_600_000)
    this.#batchMax = batch === true ? Infinity : typeof batch === 'number' ? batch : 0
    const readSize = optionalInt(
      options.readSize,
      'readSize',
      typeof batch === 'number' ? Math.max(batch, 128) : 128,
      1,
      4096,
    )
    this.#highWaterMark = optionalInt(options.highWaterMark, 'highWaterMark', 1024, 1, 1 << 20)
    signal?.throwIfAborted()
    this.#source = source
    this.#fd = source.fd
    this.#threadId = (source.features & Feature.THREAD_ID) !== 0n
    this.#reader = new native.EventReader(
      source.fd,
      readSize,
      (r) => this.#onRead(r),
      watchdogMs,
      // A fork by this thread waits for its own FORK event: the native reader then reads the
      // uffd on a helper thread for the fork's duration (see event_reader.cc).
      (source.features & Feature.EVENT_FORK) !== 0n,
    )
    this.#view = new DataView(this.#reader.buffer)
    this.#signal = signal
    this.#onAbort = () => this.#end(signal?.reason ?? new DOMException('The operation was aborted', 'AbortError'))
    signal?.addEventListener('abort', this.#onAbort, { once: true })
    this.updateRef()
    this.#reader.start()
    if (debug.enabled)
      debug('events: stream on fd %d (batch %s, readSize %d)', source.fd, String(batch ?? false), readSize)
  }

  /** `for await (const event of uffd.events())` */
  [Symbol.asyncIterator](): this {
    return this
  }

  /** Events read but not yet handed out. */
  get queued(): number {
    return this.#queued
  }

  /** The next event (or batch); done when the uffd is closed or the stream ended. */
  next(): Promise<IteratorResult<T, undefined>> {
    if (this.#queued > 0) return Promise.resolve({ done: false, value: this.#take() })
    if (this.#error !== undefined) return Promise.reject(this.#error)
    if (this.#ended) return Promise.resolve({ done: true, value: undefined })
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }))
  }

  /** `break` in for-await: releases the reader. */
  return(): Promise<IteratorResult<T, undefined>> {
    this.#end(undefined)
    return Promise.resolve({ done: true, value: undefined })
  }

  /** Stops the stream (as when its uffd is closed): pending next() calls get done. */
  close(): void {
    this.#end(undefined)
  }

  /** Keeps the process alive only while the uffd has registered ranges (like a socket). */
  updateRef(): void {
    if (this.#ended) return
    if (this.#source._wantsRef()) this.#reader.ref()
    else this.#reader.unref()
  }

  #onRead(result: number | NativeError): void {
    if (typeof result !== 'number') {
      this.#end(result)
      return
    }
    if (result === 0) return
    const events = this.#source.toEvents(decodeMessages(this.#view, result, this.#threadId))
    this.#source._onBatch(events)
    if (this.#ended) return
    this.#queue.push(events)
    this.#queued += events.length
    while (this.#waiters.length > 0 && this.#queued > 0) {
      this.#waiters.shift()!.resolve({ done: false, value: this.#take() })
    }
    if (this.#queued >= this.#highWaterMark && !this.#paused) {
      this.#paused = true
      this.#reader.stop()
    }
  }

  #take(): T {
    const first = this.#queue[0]
    let out: unknown
    if (this.#batchMax === 0) {
      out = first[this.#head++]
      this.#queued--
      if (this.#head === first.length) {
        this.#queue.shift()
        this.#head = 0
      }
    } else {
      const rest = this.#head === 0 ? first : first.slice(this.#head)
      let batch: unknown[]
      if (rest.length <= this.#batchMax) {
        batch = rest
        this.#queue.shift()
        this.#head = 0
      } else {
        batch = rest.slice(0, this.#batchMax)
        this.#head += this.#batchMax
      }
      this.#queued -= batch.length
      out = batch
    }
    if (this.#paused && this.#queued <= this.#highWaterMark >> 1 && !this.#ended) {
      this.#paused = false
      this.#reader.start()
    }
    // Single events or arrays, as #batchMax (from the same options as T) says.
    return out as T
  }

  #end(error: unknown): void {
    if (this.#ended) return
    this.#ended = true
    if (debug.enabled) debug('events: stream on fd %d ended%s', this.#fd, error ? `: ${(error as Error).message}` : '')
    this.#reader.close()
    this.#signal?.removeEventListener('abort', this.#onAbort)
    if (error !== undefined) this.#error = error
    // Events read but never handed out would strand their threads: the source wakes them to
    // fault again for the next reader, and closes fork uffds nobody will serve.
    const leftovers = this.#queue.flatMap((batch, i) => (i === 0 ? batch.slice(this.#head) : batch))
    this.#queue = []
    this.#head = 0
    this.#queued = 0
    if (leftovers.length > 0) this.#source._release(leftovers)
    for (const w of this.#waiters.splice(0)) {
      if (error !== undefined) w.reject(error)
      else w.resolve({ done: true, value: undefined })
    }
    this.#source._onStreamEnd(this)
  }
}
