// The FaultServer's native NBD prefetches (native/engine/nbd_prefetch.h): a working set's reads
// done by a thread of the engine instead of the JavaScript client. This starts them and turns the
// engine's 'prefetched' notices into the outcome each Feed waits for.
import type { FaultEngine, NbdPrefetchOptions, NbdPrefetchResult } from '../addon/binding'
import type { NativeReplay, NativeReplayOutcome, NativeReplayStart } from '../sources/feed'
import { type HandedOver, NbdStore } from '../sources/nbd'
import type { RemoteSource } from '../sources/remote'
import { SourceError } from '../sources/store'

const PAGE = 4096

type Handle = Pick<FaultEngine, 'prefetchNbd' | 'prefetchResult' | 'prefetchStop'>

function cancelled(reads: number): NativeReplayOutcome {
  const error = Object.assign(new Error('the native prefetch was stopped'), { code: 'ECANCELED' })
  return { provided: new Uint8Array(reads), bytes: 0, error }
}

export class NativePrefetches {
  readonly #handle: () => Handle | null
  readonly #waiting = new Map<number, { reads: number; settle: (o: NativeReplayOutcome) => void }>()

  /** `handle` returns null once the server is closed. */
  constructor(handle: () => Handle | null) {
    this.#handle = handle
  }

  /** Starts one over dups of `fds` (the caller lets its sockets go once this returns). */
  start(rangeId: number, fds: number[], reads: Float64Array, options: NbdPrefetchOptions): NativeReplay {
    const h = this.#handle()
    if (h === null) throw Object.assign(new Error('the FaultServer is closed'), { code: 'EBADF' })
    const id = h.prefetchNbd(rangeId, fds, reads, options)
    const count = reads.length / 2
    const done = new Promise<NativeReplayOutcome>((settle) => this.#waiting.set(id, { reads: count, settle }))
    return {
      done,
      stop: () => {
        const w = this.#waiting.get(id)
        if (w === undefined) return
        this.#waiting.delete(id)
        const r = this.#handle()?.prefetchStop(id) ?? null
        w.settle(r === null ? cancelled(count) : outcome(r))
      },
    }
  }

  /**
   * A Feed's nativeReplay for range `rangeId` read from `source`: native where the source is an
   * NBD export read without a cache or a manifest (they are checked and filled in JavaScript),
   * over its idle bulk connections (taken at once), else over new ones; reads past the export's
   * end (zeros) are left to JavaScript.
   */
  replayer(
    rangeId: number,
    source: { readonly ready: RemoteSource | null; source(): Promise<RemoteSource> },
  ): () => NativeReplayStart {
    const eligible = (remote: RemoteSource): NbdStore | null =>
      remote.store instanceof NbdStore &&
      remote.nativeReads &&
      remote.cacheKey === null &&
      remote.manifest === undefined
        ? remote.store
        : null
    return () => {
      const now = source.ready
      const store = now !== null ? eligible(now) : null
      const taken = store?.takeIdle() ?? null
      const ready =
        taken !== null
          ? Promise.resolve({ remote: now!, store: store!, handed: taken })
          : source
              .source()
              .then(async (remote) => {
                const s = eligible(remote)
                const handed = s === null ? null : await s.handOverNew()
                return handed === null ? null : { remote, store: s!, handed }
              })
              .catch(() => null)
      return { connecting: taken === null, start: (reads) => this.#run(rangeId, ready, reads) }
    }
  }

  async #run(
    rangeId: number,
    ready: Promise<{ remote: RemoteSource; store: NbdStore; handed: HandedOver } | null>,
    reads: Float64Array,
  ): Promise<NativeReplay | null> {
    const r = await ready
    if (r === null) return null
    const { remote, store, handed } = r
    const inside: number[] = []
    for (let k = 0; k < reads.length / 2; k++) if (reads[2 * k] + reads[2 * k + 1] <= store.size) inside.push(k)
    const mine = new Float64Array(inside.length * 2)
    inside.forEach((k, j) => {
      mine[2 * j] = reads[2 * k]
      mine[2 * j + 1] = reads[2 * k + 1]
    })
    let replay: NativeReplay
    try {
      if (inside.length === 0) return null
      replay = this.start(rangeId, handed.fds, mine, { exportSize: store.size, timeoutMs: store.timeout })
    } finally {
      handed.release()
    }
    const done = replay.done.then((o): NativeReplayOutcome => {
      // back to the caller's numbering, and into the source's counters as its own reads
      const provided = new Uint8Array(reads.length / 2)
      inside.forEach((k, j) => {
        provided[k] = o.provided[j]
        if (o.provided[j] === 1) {
          store.counters.requests++
          store.counters.bytes += reads[2 * k + 1]
          remote.counters.reads++
          remote.counters.fetchedPages += reads[2 * k + 1] / PAGE
        }
      })
      const e = o.error as (Error & { code?: string; errno?: number }) | null
      const error =
        e === null || e.code === 'ECANCELED'
          ? e
          : new SourceError(`NBD ${store.location}: ${e.message}`, {
              code: e.code ?? 'EIO',
              syscall: 'NBD_CMD_READ',
              retryable: true,
              location: store.location,
              errno: e.errno,
            })
      return { provided, bytes: o.bytes, error }
    })
    return { done, stop: replay.stop }
  }

  /** A 'prefetched' notice. */
  ended(id: number): void {
    const w = this.#waiting.get(id)
    if (w === undefined) return // stopped meanwhile
    const r = this.#handle()?.prefetchResult(id) ?? null
    if (r === null) return
    this.#waiting.delete(id)
    w.settle(outcome(r))
  }

  /** The server closed (the engine stopped its prefetches): whoever waits is told. */
  close(): void {
    for (const w of this.#waiting.values()) w.settle(cancelled(w.reads))
    this.#waiting.clear()
  }
}

function outcome(r: NbdPrefetchResult): NativeReplayOutcome {
  return { provided: r.provided, bytes: r.bytes, error: r.error }
}
