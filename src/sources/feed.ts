// Feed: what fills one served range from JavaScript. The engine (native/engine) resolves faults;
// a Feed answers its demand requests for remote ranges (urgent reads, first in line) and fills
// the range in the background: the recorded working set first, in its order, in large batched
// reads, then (with prefetch) everything else in address order, following demand. Background
// bytes go to the engine with provide(), which installs them between demand faults and only where
// pages are still missing. A demand read that fails is retried with backoff for as long as the
// thread waits, each failure an 'error' (never a wrong page, never a silent hang).
const PAGE = 4096

/** Where a Feed reads page bytes: a RemoteSource, a local file, a buffer. */
export interface PageReader {
  readonly size: number
  /** background reads worth keeping in flight */
  readonly parallel?: number
  /** largest useful read */
  readonly maxRead?: number
  /** unneeded pages worth reading through rather than sending another request */
  readonly gapPages?: number
  read(offset: number, length: number, options?: { urgent?: boolean }): Promise<Buffer>
}

/** The engine, as a Feed sees it. */
export interface EngineLink {
  /** bytes of the source at sourceOffset for range `rangeId`: installed where pages are missing */
  provide(rangeId: number, sourceOffset: number, bytes: Buffer): number
  /** bytes provided and not yet installed */
  providedQueued(): number
  /** the answer to a demand request */
  complete(requestId: number, bytes: Buffer | null): void
  /** a demand request given up by the range's policy: the faulting page poisoned or zeroed */
  resolve?(requestId: number, action: 'poison' | 'zero'): void
}

export interface EngineRequest {
  id: number
  address: bigint
  /** source offset of the first byte */
  offset: number
  length: number
  prefetch: boolean
  /** the faulting page's address (demand requests) */
  fault?: bigint
}

export type DemandAction = 'retry' | 'poison' | 'zero'

/** How a native working-set replay ended: per read, 1 where its bytes went to the engine. */
export interface NativeReplayOutcome {
  provided: Uint8Array
  bytes: number
  /** the first failure (code 'ECANCELED' when stopped), or null */
  error: Error | null
}

/** A working-set replay running in native code (src/engines/native-prefetch.ts). */
export interface NativeReplay {
  done: Promise<NativeReplayOutcome>
  stop(): void
}

/** A native replay about to start: its connections are being made (`connecting`) or are there. */
export interface NativeReplayStart {
  connecting: boolean
  /** given the reads, [offset, length] pairs in order: the running replay, or null (not possible) */
  start(reads: Float64Array): Promise<NativeReplay | null>
}

export interface FeedOptions {
  rangeId: number
  /** the range's start address (for error reports) and length */
  address: bigint
  length: number
  /** where the range starts in the source */
  sourceOffset: number
  /**
   * Where source offset 0 lies in the snapshot that working sets number (a { file } range's
   * source offsets count from its file offset). Default 0.
   */
  base?: number
  /** after the working set, fill the rest (address order, following demand) */
  prefetch: boolean
  /** bytes per background read (default 2 MiB, capped by the reader's maxRead) */
  batchBytes?: number
  /**
   * Background bytes in flight (default 64 MiB: 25 ms of round trip at 2.6 GB/s); several
   * batches may be in flight at once, up to 1024 reads.
   */
  inflightBytes?: number
  /** pause while the engine holds this many provided bytes not yet installed (default 64 MiB) */
  maxQueued?: number
  /**
   * Every failure. Demand reads' carry what the policy did: 'retry' (again in retryInMs),
   * 'poison' or 'zero'; background reads' carry none (no thread waits on them).
   */
  onError: (err: Error, address?: bigint, action?: DemandAction, retryInMs?: number) => void
  /**
   * What to do about a demand read that failed, given when its first failure was (Date.now()):
   * 'retry' (default), or give the page up, 'poison' or 'zero' (the range's onSourceError).
   */
  demandPolicy?: (firstFailureAt: number) => DemandAction
  /** the background has nothing left to fetch */
  onDone?: () => void
  /**
   * Replays the working set in native code where the reader allows it (an NBD export without a
   * cache or a manifest). Called once at start(); what JavaScript does not get provided that way
   * (null: none of it), it reads afterwards.
   */
  nativeReplay?: () => NativeReplayStart
}

export interface FeedStats {
  demandRequests: number
  /** demand requests waiting for bytes now */
  demandWaiting: number
  demandRetries: number
  /** background reads done, and the bytes they provided */
  backgroundReads: number
  providedBytes: number
  /** of the working set: pages delivered so far, and its pages inside this range */
  workingSetDelivered: number
  workingSetPages: number
  /** of backgroundReads, those done in native code (nativeReplay) */
  nativeReads: number
}

// per-page background state
const TODO = 0
const INFLIGHT = 1
const DELIVERED = 2
const MAX_READS = 1024
/** working-set pages read by JavaScript while a native replay connects */
const NATIVE_HEAD_PAGES = 480

export class Feed {
  readonly stats: FeedStats = {
    demandRequests: 0,
    demandWaiting: 0,
    demandRetries: 0,
    backgroundReads: 0,
    providedBytes: 0,
    workingSetDelivered: 0,
    workingSetPages: 0,
    nativeReads: 0,
  }
  readonly #o: FeedOptions
  readonly #reader: PageReader
  readonly #engine: EngineLink
  readonly #pages: number
  readonly #state: Uint8Array
  #ws: Uint32Array = new Uint32Array(0) // range pages, in order
  #wsMember: Uint8Array = new Uint8Array(0)
  #started = false
  #wsCursor = 0
  #wsBatch = 32
  #seqCursor = 0
  #inflight = 0
  #inflightBytes = 0
  #stopped = false
  #pumping = false
  #paused: NodeJS.Timeout | null = null
  #failures = 0
  #done = false
  /** a native replay runs: JavaScript's background reads wait for it */
  #nativeBusy = false
  #native: NativeReplay | null = null
  #wsAbandoned = false
  readonly #batchPages: number
  readonly #maxInflightBytes: number
  readonly #maxQueued: number
  readonly #gap: number

  constructor(reader: PageReader, engine: EngineLink, options: FeedOptions) {
    this.#o = options
    this.#reader = reader
    this.#engine = engine
    this.#pages = Math.ceil(options.length / PAGE)
    this.#state = new Uint8Array(this.#pages)
    const maxRead = reader.maxRead ?? 16 * 1024 * 1024
    this.#batchPages = Math.max(1, Math.floor(Math.min(options.batchBytes ?? 2 * 1024 * 1024, maxRead) / PAGE))
    this.#maxInflightBytes = options.inflightBytes ?? 64 * 1024 * 1024
    this.#maxQueued = options.maxQueued ?? 64 * 1024 * 1024
    this.#gap = reader.gapPages ?? 8
  }

  /** Fetch these snapshot pages first, in this order (before start()). */
  useWorkingSet(pages: Uint32Array): void {
    if (this.#started) throw new Error('useWorkingSet() after start()')
    const first = ((this.#o.base ?? 0) + this.#o.sourceOffset) / PAGE
    const ws: number[] = []
    if (Number.isInteger(first)) {
      for (const p of pages) {
        const i = p - first
        if (i >= 0 && i < this.#pages) ws.push(i)
      }
    }
    this.#ws = Uint32Array.from(ws)
    this.#wsMember = new Uint8Array(this.#pages)
    for (const i of ws) this.#wsMember[i] = 1
    this.stats.workingSetPages = ws.length
  }

  /** Stops replaying the working set (found stale); the rest goes on. */
  abandonWorkingSet(): void {
    this.#wsCursor = this.#ws.length
    this.#wsAbandoned = true
    this.#native?.stop()
  }

  /** Starts the background fill (working set, then the rest with prefetch). */
  start(): void {
    this.#started = true
    if (this.#o.nativeReplay !== undefined && this.#ws.length > 0) this.#replayNatively(this.#o.nativeReplay)
    else this.#pump()
  }

  stop(): void {
    this.#stopped = true
    if (this.#paused) clearTimeout(this.#paused)
    this.#native?.stop()
  }

  // The working set handed to native code at once, in first-touch order: one read per page or
  // run of consecutive pages (a native read costs too little to read through gaps, and gaps would
  // only install pages nobody touched). While its connections are being made, its first pages
  // are read here: the workload is waiting for them.
  #replayNatively(replay: NonNullable<FeedOptions['nativeReplay']>): void {
    const begin = replay()
    for (let head = 0; begin.connecting && head < NATIVE_HEAD_PAGES; ) {
      const runs = this.#nextWorkingSetRuns()
      if (runs === null) break
      for (const [first, count] of runs) {
        this.#fetch(first, count)
        head += count
      }
    }
    const ws = this.#ws
    const firsts = new Uint32Array(ws.length)
    const counts = new Uint32Array(ws.length)
    let n = 0
    for (let k = this.#wsCursor; k < ws.length; k++) {
      const i = ws[k]
      if (this.#state[i] !== TODO) continue
      this.#state[i] = INFLIGHT
      if (n > 0 && firsts[n - 1] + counts[n - 1] === i && counts[n - 1] < this.#batchPages) counts[n - 1]++
      else {
        firsts[n] = i
        counts[n++] = 1
      }
    }
    this.#wsCursor = ws.length
    const runs = { firsts: firsts.subarray(0, n), counts: counts.subarray(0, n) }
    const reads = new Float64Array(n * 2)
    for (let k = 0; k < n; k++) {
      reads[2 * k] = this.#o.sourceOffset + firsts[k] * PAGE
      reads[2 * k + 1] = counts[k] * PAGE
    }
    this.#nativeBusy = true
    const ended = (o: NativeReplayOutcome | null): void => this.#nativeEnded(runs, o)
    begin
      .start(reads)
      .then((r) => {
        if (r === null) return ended(null)
        this.#native = r
        if (this.#stopped || this.#wsAbandoned) r.stop()
        return r.done.then(ended)
      })
      .catch((err: Error) => ended({ provided: new Uint8Array(n), bytes: 0, error: err }))
  }

  #nativeEnded(runs: { firsts: Uint32Array; counts: Uint32Array }, o: NativeReplayOutcome | null): void {
    this.#native = null
    this.#nativeBusy = false
    let failedAt = -1
    for (let k = 0; k < runs.firsts.length; k++) {
      const first = runs.firsts[k]
      const count = runs.counts[k]
      if (o?.provided[k] === 1) {
        this.stats.backgroundReads++
        this.stats.nativeReads++
        this.stats.providedBytes += count * PAGE
        for (let i = first; i < first + count; i++) this.#deliver(i)
        continue
      }
      if (failedAt < 0) failedAt = first
      for (let i = first; i < first + count; i++) if (this.#state[i] === INFLIGHT) this.#state[i] = TODO
    }
    if (this.#stopped) return
    const err = o?.error ?? null
    if (err !== null && (err as { code?: string }).code !== 'ECANCELED')
      this.#o.onError(err, this.#o.address + BigInt(Math.max(0, failedAt) * PAGE))
    // what it did not provide: read by JavaScript, working set first
    if (!this.#wsAbandoned) this.#wsCursor = 0
    this.#pump()
  }

  get done(): boolean {
    return this.#done
  }

  /** A request from the engine: a thread waits on it (or, prefetch, the engine wants it). */
  request(q: EngineRequest): void {
    this.stats.demandRequests++
    this.stats.demandWaiting++
    // prefetch follows demand: continue the sequential fill right after the fault
    const page = Math.floor((q.offset - this.#o.sourceOffset) / PAGE)
    if (page >= 0 && page < this.#pages) this.#seqCursor = Math.min(this.#pages, page + Math.ceil(q.length / PAGE))
    this.#demand(q, 0, 0)
  }

  #demand(q: EngineRequest, attempt: number, firstFailureAt: number): void {
    if (this.#stopped) return
    this.#reader.read(q.offset, q.length, { urgent: !q.prefetch }).then(
      (bytes) => {
        this.stats.demandWaiting--
        if (this.#stopped) return
        this.#engine.complete(q.id, bytes)
        this.#mark(q.offset, q.length)
      },
      (err: Error) => {
        if (this.#stopped) return
        // The source retried a few times already. The range's policy decides: try again (the
        // thread stays blocked on a page only the source can give), or give the page up.
        const first = firstFailureAt || Date.now()
        const action = this.#o.demandPolicy?.(first) ?? 'retry'
        if (action !== 'retry' && this.#engine.resolve !== undefined) {
          this.stats.demandWaiting--
          this.#o.onError(err, q.fault ?? q.address, action)
          this.#engine.resolve(q.id, action)
          return
        }
        this.stats.demandRetries++
        const delay = Math.min(5000, 100 * 2 ** Math.min(attempt, 6))
        this.#o.onError(err, q.fault ?? q.address, 'retry', delay)
        setTimeout(() => this.#demand(q, attempt + 1, first), delay).unref()
      },
    )
  }

  #mark(offset: number, length: number): void {
    const first = Math.max(0, Math.floor((offset - this.#o.sourceOffset) / PAGE))
    const end = Math.min(this.#pages, Math.ceil((offset + length - this.#o.sourceOffset) / PAGE))
    for (let i = first; i < end; i++) this.#deliver(i)
  }

  #deliver(i: number): void {
    if (this.#state[i] === DELIVERED) return
    this.#state[i] = DELIVERED
    if (this.#wsMember[i] === 1) this.stats.workingSetDelivered++
  }

  // Keeps background reads going (up to #maxInflightBytes, 1024 reads), working set first.
  #pump(): void {
    if (this.#pumping || this.#stopped || !this.#started || this.#nativeBusy) return
    this.#pumping = true
    try {
      while (this.#inflightBytes < this.#maxInflightBytes && this.#inflight < MAX_READS && !this.#stopped) {
        if (this.#engine.providedQueued() > this.#maxQueued) {
          this.#pauseFor(2)
          return
        }
        const runs = this.#nextRuns()
        if (runs === null) {
          if (this.#inflight === 0 && !this.#done) {
            this.#done = true
            this.#o.onDone?.()
          }
          return
        }
        for (const [first, count] of runs) this.#fetch(first, count)
      }
    } finally {
      this.#pumping = false
    }
  }

  #pauseFor(ms: number): void {
    if (this.#paused) return
    this.#paused = setTimeout(() => {
      this.#paused = null
      this.#pump()
    }, ms)
  }

  // The next batch: up to #batchPages pages of the working set (sorted, gaps up to #gap pages
  // read through), else the next stretch in address order; null when nothing is left.
  #nextRuns(): Array<[number, number]> | null {
    const ws = this.#nextWorkingSetRuns()
    if (ws !== null) return ws
    if (!this.#o.prefetch) return null
    // address order from the cursor (which follows demand), wrapping once
    for (let pass = 0; pass < 2; pass++) {
      let i = pass === 0 ? this.#seqCursor : 0
      const limit = pass === 0 ? this.#pages : this.#seqCursor
      while (i < limit && this.#state[i] !== TODO) i++
      if (i < limit) {
        let n = 0
        while (i + n < this.#pages && n < this.#batchPages && this.#state[i + n] === TODO) n++
        this.#seqCursor = i + n
        return [[i, n]]
      }
    }
    return null
  }

  // The working set's next batch of pages still to fetch, as runs in first-touch order; null
  // once it is all asked for.
  #nextWorkingSetRuns(): Array<[number, number]> | null {
    while (this.#wsCursor < this.#ws.length) {
      // The first batches are small (the workload waits for its first pages), then they grow.
      const want = Math.min(this.#batchPages, this.#wsBatch)
      this.#wsBatch *= 2
      const picked: number[] = []
      while (this.#wsCursor < this.#ws.length && picked.length < want) {
        const i = this.#ws[this.#wsCursor++]
        if (this.#state[i] === TODO) picked.push(i)
      }
      if (picked.length > 0) {
        const rank = new Map(picked.map((p, k) => [p, k]))
        picked.sort((a, b) => a - b)
        const runs: Array<[number, number, number]> = [] // first, count, earliest rank
        let start = picked[0]
        let end = start + 1
        let first = rank.get(start)!
        for (let k = 1; k < picked.length; k++) {
          const p = picked[k]
          if (p - end <= this.#gap && p + 1 - start <= this.#batchPages) {
            end = p + 1
            first = Math.min(first, rank.get(p)!)
          } else {
            runs.push([start, end - start, first])
            start = p
            end = p + 1
            first = rank.get(p)!
          }
        }
        runs.push([start, end - start, first])
        // issued in the order the pages were first touched: the workload's next page comes first
        runs.sort((a, b) => a[2] - b[2])
        return runs.map(([f, n]) => [f, n])
      }
    }
    return null
  }

  #fetch(first: number, count: number): void {
    for (let i = first; i < first + count; i++) if (this.#state[i] === TODO) this.#state[i] = INFLIGHT
    this.#inflight++
    this.#inflightBytes += count * PAGE
    const offset = this.#o.sourceOffset + first * PAGE
    this.#reader.read(offset, count * PAGE).then(
      (bytes) => {
        this.#inflight--
        this.#inflightBytes -= count * PAGE
        if (this.#stopped) return
        this.#failures = 0
        this.#engine.provide(this.#o.rangeId, offset, bytes)
        this.stats.backgroundReads++
        this.stats.providedBytes += bytes.length
        for (let i = first; i < first + count; i++) this.#deliver(i)
        this.#pump()
      },
      (err: Error) => {
        this.#inflight--
        this.#inflightBytes -= count * PAGE
        if (this.#stopped) return
        for (let i = first; i < first + count; i++) if (this.#state[i] === INFLIGHT) this.#state[i] = TODO
        this.#o.onError(err, this.#o.address + BigInt(first * PAGE))
        // Background failures back off (demand reads keep their own retries); the pages are
        // fetched again on the next pass or by demand.
        this.#failures++
        this.#wsCursor = 0 // the working set's pages left undelivered come first again
        this.#pauseFor(Math.min(5000, 100 * 2 ** Math.min(this.#failures, 6)))
      },
    )
  }
}
