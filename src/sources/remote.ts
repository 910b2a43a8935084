// RemoteSource: a snapshot on an NBD server or behind an HTTP(S) URL, read in pages: through the
// local cache first, then the store, with retries and backoff for failures a retry may cure, and
// with every chunk checked against the integrity manifest (when there is one) before a byte of it
// is cached or returned. One RemoteSource can feed many FaultServers and ranges (the Firecracker
// handler shares one per snapshot among its VMs, and so its connections and its cache).
import * as path from 'node:path'
import { type CacheOptions, FileCache, MemoryCache, type PageCache } from './cache'
import { type HttpOptions, HttpStore } from './http'
import { Manifest } from './manifest'
import { type NbdOptions, NbdStore } from './nbd'
import { fingerprintOf, fingerprintOffsets, type SnapshotIdentity } from './snapshot-identity'
import { type BlockStore, SourceError } from './store'
import { flag } from '../util/validate'

const PAGE = 4096

/** A remote snapshot as a FaultServer source (FaultSource). */
export type RemoteSpec =
  | ({ nbd: string; offset?: number } & RemoteOptions)
  | ({ url: string; offset?: number } & RemoteOptions)
  | { remote: RemoteSource; offset?: number }

export interface RemoteOptions extends Omit<HttpOptions, 'connections' | 'timeout' | 'connectTimeout'> {
  /** bulk connections (NBD default 2, HTTP default 8), besides the one kept for demand reads */
  connections?: number
  /** ms for one read (NBD: a reply; HTTP: headers, then between body bytes). Default 30000 */
  timeout?: number
  /** ms to connect. Default 10000 */
  connectTimeout?: number
  /** NBD reads in flight per bulk connection (default 8) */
  depth?: number
  /**
   * The local page cache: a PageCache (shared), { memory: bytes }, or { dir, high, low? } (files
   * that outlive the process). Default none.
   */
  cache?: PageCache | { memory: number; low?: number } | ({ dir: string } & CacheOptions)
  /**
   * What names this snapshot's version in the cache. Default: the HTTP ETag, or the manifest's
   * digest. An NBD export has no version of its own: without a manifest or a cacheKey its pages
   * are not cached (a changed export must never be served from an older one's pages).
   */
  cacheKey?: string
  /** integrity manifest (a Manifest or a path to one): chunks that do not match are never used */
  manifest?: Manifest | string
  /** tries per read before it fails (default 4: 3 retries, 50 ms doubling, up to 2 s apart) */
  attempts?: number
  /** called on every failed try (the FaultServer makes these 'error' events) */
  onError?: (err: SourceError, willRetry: boolean) => void
  /**
   * NBD: replay working sets in native code (a thread of the FaultServer's engine pipelines the
   * reads over connections of its own; default true). Without a cache or a manifest only, whose
   * checks and writes are JavaScript's. false: every read through JavaScript.
   */
  nativeReads?: boolean
}

export interface RemoteCounters {
  /** reads asked for, and of their pages, those found in the local cache */
  reads: number
  cachedPages: number
  /** pages fetched from the store */
  fetchedPages: number
  retries: number
  failures: number
  /** chunks that did not match the manifest */
  integrityFailures: number
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref())
}

function openCache(spec: RemoteOptions['cache']): PageCache | undefined {
  if (spec === undefined) return undefined
  if (typeof (spec as PageCache).read === 'function') return spec as PageCache
  const s = spec as { memory?: number; dir?: string; high?: number; low?: number }
  if (typeof s.memory === 'number') return new MemoryCache({ high: s.memory, low: s.low })
  if (typeof s.dir === 'string') return new FileCache(path.resolve(s.dir), { high: s.high ?? 0, low: s.low })
  throw new TypeError('cache must be a PageCache, { memory: bytes } or { dir, high, low? }')
}

export class RemoteSource {
  readonly store: BlockStore
  readonly size: number
  readonly manifest?: Manifest
  readonly cache?: PageCache
  /** the cache's name for this snapshot version, or null (not cached) */
  readonly cacheKey: string | null
  readonly counters: RemoteCounters = {
    reads: 0,
    cachedPages: 0,
    fetchedPages: 0,
    retries: 0,
    failures: 0,
    integrityFailures: 0,
  }
  onError?: (err: SourceError, willRetry: boolean) => void
  /** working sets from NBD replayed in native code (RemoteOptions.nativeReads) */
  readonly nativeReads: boolean
  readonly #attempts: number
  readonly #ownCache: boolean
  #closed = false

  constructor(store: BlockStore, options: Omit<RemoteOptions, 'manifest'> & { manifest?: Manifest } = {}) {
    this.store = store
    this.size = store.size
    this.manifest = options.manifest
    if (this.manifest !== undefined && this.manifest.size !== store.size)
      throw new SourceError(
        `${store.location}: the manifest describes ${this.manifest.size} bytes, the snapshot has ${store.size}`,
        { code: 'ESTALE', syscall: 'open', retryable: false, location: store.location },
      )
    this.cache = openCache(options.cache)
    this.#ownCache = this.cache !== undefined && this.cache !== options.cache
    const key =
      options.cacheKey ??
      (this.manifest !== undefined ? this.manifest.digest : store.etag !== undefined ? `etag:${store.etag}` : undefined)
    this.cacheKey = this.cache !== undefined && key !== undefined ? `${store.location}|${store.size}|${key}` : null
    this.#attempts = options.attempts ?? 4
    if (!Number.isSafeInteger(this.#attempts) || this.#attempts < 1)
      throw new RangeError(`attempts must be an integer >= 1 (got ${options.attempts})`)
    this.onError = options.onError
    this.nativeReads = flag(options as Record<string, unknown>, 'nativeReads', true)
  }

  /** Opens nbd://, nbd+unix://, http:// or https:// (the store's handshake or probe runs now). */
  static async open(url: string, options: RemoteOptions = {}): Promise<RemoteSource> {
    const manifest = typeof options.manifest === 'string' ? Manifest.load(options.manifest) : options.manifest
    const scheme = /^([a-z+]+):/i.exec(url)?.[1]?.toLowerCase()
    let store: BlockStore
    if (scheme === 'nbd' || scheme === 'nbd+unix' || scheme === 'nbds' || scheme === 'nbds+unix') {
      const o: NbdOptions = {
        connections: options.connections,
        timeout: options.timeout,
        connectTimeout: options.connectTimeout,
        depth: options.depth,
      }
      store = await NbdStore.open(url, o)
    } else if (scheme === 'http' || scheme === 'https') {
      store = await HttpStore.open(url, options)
    } else {
      throw new TypeError(`not a remote source URL (nbd://, nbd+unix://, http://, https://): ${url.split('?')[0]}`)
    }
    try {
      return new RemoteSource(store, { ...options, manifest })
    } catch (err) {
      await store.close()
      throw err
    }
  }

  get location(): string {
    return this.store.location
  }

  /** What ties a working-set file or a cache to this snapshot (see snapshot-identity.ts). */
  async identity(): Promise<SnapshotIdentity> {
    const offsets = fingerprintOffsets(this.size)
    const samples = await Promise.all(
      offsets.map(([o, n]) => this.read(o, PAGE, { urgent: true }).then((b) => b.subarray(0, n))),
    )
    return {
      size: this.size,
      etag: this.store.etag,
      digest: this.manifest?.digest,
      fingerprint: fingerprintOf(this.size, samples),
    }
  }

  /**
   * `length` bytes at `offset` (page-aligned; past the end: zeros): from the cache where it has
   * them, else from the store (urgent: on the demand connection). Rejects with the last
   * SourceError once its tries are spent.
   */
  read(offset: number, length: number, options: { urgent?: boolean } = {}): Promise<Buffer> {
    if (this.#closed) return Promise.reject(this.#error('closed', 'ESHUTDOWN', false))
    if (offset % PAGE !== 0 || length % PAGE !== 0 || length <= 0)
      return Promise.reject(new RangeError(`remote reads are whole pages (got [${offset}, +${length}))`))
    this.counters.reads++
    if (this.cacheKey === null && this.manifest === undefined && offset + length <= this.size)
      return this.#fetch(offset, length, options.urgent === true) // the common case: one read, no copy
    return this.#readPages(offset, length, options.urgent === true)
  }

  // Through the cache, past the content's end, or in whole manifest chunks.
  async #readPages(offset: number, length: number, urgent: boolean): Promise<Buffer> {
    const page = offset / PAGE
    const count = length / PAGE
    // pages past the content: zeros, nothing to fetch
    const contentPages = Math.max(0, Math.min(count, Math.ceil((this.size - offset) / PAGE)))
    const out = Buffer.allocUnsafe(length)
    const have = this.cacheKey !== null ? this.cache!.read(this.cacheKey, page, count, out) : null
    if (contentPages < count) out.fill(0, contentPages * PAGE)
    let first = -1
    let last = -1
    for (let i = 0; i < contentPages; i++) {
      if (have?.[i]) {
        this.counters.cachedPages++
        continue
      }
      if (first < 0) first = i
      last = i
    }
    if (first < 0) return out
    // One read from the first missing page to the last (cached pages between are re-read:
    // cheaper than another round trip), widened to whole manifest chunks.
    let from = offset + first * PAGE
    let to = Math.min(offset + (last + 1) * PAGE, this.size)
    if (this.manifest !== undefined) {
      const cs = this.manifest.chunkSize
      from = Math.floor(from / cs) * cs
      to = Math.min(Math.ceil(to / cs) * cs, this.size)
    }
    const bytes = await this.#fetch(from, to - from, urgent)
    // into out: the part inside [offset, offset + length)
    const lo = Math.max(from, offset)
    const hi = Math.min(to, offset + length)
    bytes.copy(out, lo - offset, lo - from, hi - from)
    return out
  }

  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    await this.store.close()
    if (this.#ownCache) await this.cache!.close()
    else await this.cache?.flush()
  }

  #error(message: string, code: string, retryable: boolean): SourceError {
    return new SourceError(`${this.store.location}: ${message}`, {
      code,
      syscall: 'read',
      retryable,
      location: this.store.location,
    })
  }

  // [from, from + length) from the store, split into reads the store takes, checked and cached.
  #fetch(from: number, length: number, urgent: boolean): Promise<Buffer> {
    const max = this.manifest !== undefined ? Math.max(this.manifest.chunkSize, this.store.maxRead) : this.store.maxRead
    const done = (bytes: Buffer): Buffer => {
      this.counters.fetchedPages += Math.ceil(length / PAGE)
      if (this.cacheKey !== null) {
        // whole pages only: a short last page (the content's end) is padded with zeros
        const whole = Math.ceil(length / PAGE) * PAGE
        const padded = whole === length ? bytes : Buffer.concat([bytes, Buffer.alloc(whole - length)])
        this.cache!.write(this.cacheKey, from / PAGE, padded)
      }
      return bytes
    }
    if (length <= max) return this.#tryRead(from, length, urgent).then(done)
    const parts: Array<Promise<Buffer>> = []
    for (let at = 0; at < length; at += max) parts.push(this.#tryRead(from + at, Math.min(max, length - at), urgent))
    return Promise.all(parts).then((pieces) => done(Buffer.concat(pieces)))
  }

  // The first try without async machinery (the common case), then tries with backoff.
  #tryRead(offset: number, length: number, urgent: boolean): Promise<Buffer> {
    const verify = (bytes: Buffer): Buffer => {
      this.#verify(offset, bytes)
      return bytes
    }
    const first = this.store.read(offset, length, { urgent })
    const checked = this.manifest === undefined ? first : first.then(verify)
    return checked.catch((err: unknown) => this.#retry(offset, length, urgent, err, verify))
  }

  async #retry(
    offset: number,
    length: number,
    urgent: boolean,
    err: unknown,
    verify: (b: Buffer) => Buffer,
  ): Promise<Buffer> {
    for (let attempt = 1; ; attempt++) {
      if (!(err instanceof SourceError)) throw err
      const retry = err.retryable && attempt < this.#attempts && !this.#closed
      this.onError?.(err, retry)
      if (!retry) {
        this.counters.failures++
        throw err
      }
      this.counters.retries++
      const backoff = Math.min(2000, 50 * 2 ** (attempt - 1))
      await sleep(backoff / 2 + Math.random() * (backoff / 2))
      try {
        return verify(await this.store.read(offset, length, { urgent }))
      } catch (e) {
        err = e
      }
    }
  }

  #verify(offset: number, bytes: Buffer): void {
    const m = this.manifest
    if (m === undefined) return
    for (let at = 0; at < bytes.length; at += m.chunkSize) {
      const chunk = (offset + at) / m.chunkSize
      if (!m.verify(chunk, bytes.subarray(at, Math.min(at + m.chunkSize, bytes.length)))) {
        this.counters.integrityFailures++
        const e = this.#error(
          `chunk ${chunk} (bytes ${offset + at}..${Math.min(offset + at + m.chunkSize, this.size)}) does not match the manifest`,
          'EBADMSG',
          true,
        )
        e.offset = offset + at
        e.length = Math.min(m.chunkSize, bytes.length - at)
        throw e
      }
    }
  }
}
