// The FaultServer's ranges that JavaScript feeds (src/sources/feed.ts): remote sources ({ nbd },
// { url }, { remote }), whose demand faults come here as requests, and local ranges replaying a
// working set, which the engine keeps serving natively while their recorded pages are provided
// ahead of the faults. Also the working-set record: the engine logs demand faults of recorded
// ranges, and this turns them into a WorkingSet tied to the range's snapshot.
import { PAGE_SIZE } from '../core/constants'
import { Mapping } from '../core/mapping'
import type { FaultEngineSource } from '../addon/binding'
import type { Range } from '../core/range'
import {
  type EngineLink,
  type EngineRequest,
  Feed,
  type FeedOptions,
  type FeedStats,
  type PageReader,
} from '../sources/feed'
import { BufferReader, FileReader } from '../sources/local'
import { type RemoteOptions, RemoteSource, type RemoteSpec } from '../sources/remote'
import { bytesIdentity, type SnapshotIdentity } from '../sources/snapshot-identity'
import { WorkingSet, WorkingSetError } from '../sources/working-set'
import { describe } from '../util/validate'
import type { NativePrefetches } from './native-prefetch'

export interface FedEngine extends EngineLink {
  recordTouches(on: boolean): void
  takeTouches(): { ranges: Uint32Array; offsets: Float64Array }
}

export type { RemoteSpec }

export function isRemoteSpec(source: object): source is RemoteSpec {
  return 'nbd' in source || 'url' in source || 'remote' in source
}

/** A RemoteSource opened on first use; a failed open is tried again on the next read. */
class LazyRemote implements PageReader {
  readonly #open: () => Promise<RemoteSource>
  #source: RemoteSource | null = null
  #opening: Promise<RemoteSource> | null = null
  #closed = false
  readonly owned: boolean

  constructor(open: () => Promise<RemoteSource>, owned: boolean, ready?: RemoteSource) {
    this.#open = open
    this.owned = owned
    this.#source = ready ?? null
  }

  get size(): number {
    return this.#source?.size ?? 0
  }
  /** the source, if open already */
  get ready(): RemoteSource | null {
    return this.#source
  }
  get parallel(): number | undefined {
    return this.#source?.store.parallel
  }
  get maxRead(): number | undefined {
    return this.#source?.store.maxRead
  }
  get gapPages(): number | undefined {
    // a request costs more over HTTP than over NBD: read through wider gaps there
    return this.#source === null ? undefined : this.#source.store.kind === 'http' ? 32 : 8
  }

  source(): Promise<RemoteSource> {
    if (this.#source) return Promise.resolve(this.#source)
    this.#opening ??= this.#open().then(
      (s) => {
        this.#opening = null
        if (this.#closed) {
          if (this.owned) s.close().catch(() => undefined)
          throw new Error('closed')
        }
        this.#source = s
        return s
      },
      (err) => {
        this.#opening = null
        throw err
      },
    )
    return this.#opening
  }

  async read(offset: number, length: number, options?: { urgent?: boolean }): Promise<Buffer> {
    return (await this.source()).read(offset, length, options)
  }

  close(): void {
    this.#closed = true
    if (this.owned) this.#source?.close().catch(() => undefined)
  }
}

interface FedRange {
  range: Range
  feed: Feed
  /** answers demand requests (remote ranges) */
  demand: boolean
  reader: PageReader & { close?: () => void }
  recorded: boolean
  /** snapshot offset of source offset 0 (see FeedOptions.base) */
  base: number
  identity: () => Promise<SnapshotIdentity>
  /** printable name of the source (a recorded set is tied to one) */
  sourceName: string
}

export interface FedServe {
  /** what addRange gets */
  spec: FaultEngineSource
  offset: number
  prefetch: boolean
  faultAround?: number
  /** called once the engine serves the range */
  attach: () => void
  /** undoes prepare() when serving failed */
  abort: () => void
}

export class FedRanges {
  readonly #engine: FedEngine
  readonly #onError: FeedOptions['onError']
  readonly #prefetches: NativePrefetches | null
  readonly #ranges = new Map<number, FedRange>()
  /** recorded demand faults: [range id, source offset] in arrival order */
  readonly #touches: Array<[number, number]> = []
  #recording = 0

  /** `prefetches`: working sets of NBD sources replayed in native code (null: in JavaScript) */
  constructor(engine: FedEngine, onError: FeedOptions['onError'], prefetches: NativePrefetches | null = null) {
    this.#engine = engine
    this.#onError = onError
    this.#prefetches = prefetches
  }

  /** Whether range `id` (a handler id in the engine) answers its own requests. */
  handles(id: number): boolean {
    return this.#ranges.get(id)?.demand === true
  }

  request(id: number, q: EngineRequest): void {
    this.#ranges.get(id)?.feed.request(q)
  }

  /**
   * For serve(): a remote source, or a local one that replays or records a working set. Returns
   * null when the range needs nothing from here.
   */
  prepare(
    id: number,
    range: Range,
    source: Record<string, unknown>,
    local: { spec: FaultEngineSource; offset: number } | null,
    options: {
      prefetch: boolean
      workingSet?: unknown
      recordWorkingSet?: unknown
      /** the range's onSourceError for a demand read that failed since then */
      demandPolicy?: FeedOptions['demandPolicy']
    },
  ): FedServe | null {
    const record = options.recordWorkingSet ?? false
    if (typeof record !== 'boolean') throw new TypeError(`recordWorkingSet must be a boolean (got ${describe(record)})`)
    let ws: WorkingSet | undefined
    if (options.workingSet !== undefined) {
      if (record) throw new TypeError('a range cannot both replay (workingSet) and record (recordWorkingSet)')
      if (typeof options.workingSet === 'string') ws = WorkingSet.load(options.workingSet)
      else if (options.workingSet instanceof WorkingSet) ws = options.workingSet
      else throw new TypeError(`workingSet must be a WorkingSet or a path (got ${describe(options.workingSet)})`)
    }
    const remote = local === null
    if (!remote && ws === undefined && !record) return null
    let reader: PageReader & { close?: () => void }
    let identity: () => Promise<SnapshotIdentity>
    let sourceName: string
    let offset: number
    let base = 0
    let nativeReplay: ReturnType<NativePrefetches['replayer']> | undefined
    if (remote) {
      const r = openRemote(source as RemoteSpec)
      reader = r.reader
      if (ws !== undefined && this.#prefetches !== null) nativeReplay = this.#prefetches.replayer(id, r.reader)
      offset = r.offset
      sourceName = r.name
      identity = async () => (await r.reader.source()).identity()
    } else {
      const l = localReader(source)
      if (l === null) throw new TypeError('working sets need a { buffer } or { file } source (or a remote one)')
      reader = l.reader
      offset = local.offset
      base = l.base
      sourceName = l.name
      const id0 = l.identity
      identity = () => Promise.resolve(id0())
      // a stale working set is refused now
      if (ws !== undefined) {
        try {
          ws.check(id0())
        } catch (err) {
          l.reader.close?.()
          throw err
        }
      }
    }
    const feed = new Feed(reader, this.#engine, {
      rangeId: id,
      address: range.address,
      length: range.length,
      sourceOffset: offset,
      base,
      prefetch: options.prefetch && !record,
      onError: this.#onError,
      demandPolicy: options.demandPolicy,
      nativeReplay,
    })
    const fed: FedRange = { range, feed, demand: remote, reader, recorded: record, base, identity, sourceName }
    return {
      spec: remote ? { kind: 'handler', id } : local.spec,
      offset: remote ? offset : local.offset,
      // the feed fills in the background: the engine's own prefetch stays off
      prefetch: false,
      faultAround: record ? PAGE_SIZE : undefined,
      attach: () => {
        this.#ranges.set(id, fed)
        if (record && this.#recording++ === 0) this.#engine.recordTouches(true)
        if (ws !== undefined) feed.useWorkingSet(ws.pages)
        feed.start()
        if (ws === undefined || !remote) return
        // A remote snapshot's identity takes a round of reads: replay meanwhile (the bytes come
        // from the snapshot itself, so a stale set costs only useless reads) and stop if stale.
        const workingSet = ws
        identity()
          .then((current) => workingSet.check(current))
          .catch((err: Error) => {
            feed.abandonWorkingSet()
            this.#onError(err)
          })
      },
      abort: () => reader.close?.(),
    }
  }

  /** Stops feeding the ranges `ids` (remove() or close()). */
  detach(ids: Iterable<number>): void {
    for (const id of ids) {
      const fed = this.#ranges.get(id)
      if (fed === undefined) continue
      this.#collect()
      fed.feed.stop()
      fed.reader.close?.()
      this.#ranges.delete(id)
      if (fed.recorded && --this.#recording === 0) this.#engine.recordTouches(false)
    }
  }

  close(): void {
    this.detach([...this.#ranges.keys()])
  }

  /** Demand requests waiting for bytes, over every fed range. */
  waiting(): number {
    let n = 0
    for (const f of this.#ranges.values()) n += f.feed.stats.demandWaiting
    return n
  }

  stats(): FeedStats {
    const sum: FeedStats = {
      demandRequests: 0,
      demandWaiting: 0,
      demandRetries: 0,
      backgroundReads: 0,
      providedBytes: 0,
      workingSetDelivered: 0,
      workingSetPages: 0,
      nativeReads: 0,
    }
    for (const f of this.#ranges.values())
      for (const k of Object.keys(sum) as Array<keyof FeedStats>) sum[k] += f.feed.stats[k]
    return sum
  }

  /** Pulls the engine's touch log (bounded memory in the engine). */
  #collect(): void {
    if (this.#recording === 0) return
    const { ranges, offsets } = this.#engine.takeTouches()
    for (let i = 0; i < ranges.length; i++) this.#touches.push([ranges[i], offsets[i]])
  }

  tick(): void {
    this.#collect()
  }

  /**
   * The working set recorded so far on the recorded ranges whose ids are given (default: all);
   * they must read one snapshot.
   */
  async workingSet(ids?: Iterable<number>): Promise<WorkingSet> {
    this.#collect()
    const chosen = [...(ids ?? this.#ranges.keys())]
      .map((id) => [id, this.#ranges.get(id)] as const)
      .filter((e): e is readonly [number, FedRange] => e[1]?.recorded === true)
    if (chosen.length === 0) throw new WorkingSetError('no range is recording a working set', 'ENOENT')
    const names = new Set(chosen.map(([, f]) => f.sourceName))
    if (names.size > 1)
      throw new WorkingSetError(
        `the recorded ranges read different snapshots (${[...names].join(', ')}): ask for one range`,
        'EINVAL',
      )
    const identity = await chosen[0][1].identity()
    const base = new Map(chosen.map(([id, f]) => [id, f.base]))
    return WorkingSet.fromTouches(
      identity,
      this.#touches.filter(([id]) => base.has(id)).map(([id, offset]) => base.get(id)! + offset),
    )
  }
}

function openRemote(spec: RemoteSpec): { reader: LazyRemote; offset: number; name: string } {
  const s = spec as Record<string, unknown>
  const offset = s.offset === undefined ? 0 : s.offset
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0 || offset % PAGE_SIZE !== 0)
    throw new RangeError(`a remote source's offset must be a multiple of ${PAGE_SIZE} (got ${describe(offset)})`)
  if ('remote' in spec) {
    if (!(spec.remote instanceof RemoteSource))
      throw new TypeError(`remote must be a RemoteSource (got ${describe(spec.remote)})`)
    const src = spec.remote
    return { reader: new LazyRemote(() => Promise.resolve(src), false, src), offset, name: src.location }
  }
  const url = 'nbd' in spec ? spec.nbd : spec.url
  if (typeof url !== 'string') throw new TypeError(`${'nbd' in spec ? 'nbd' : 'url'} must be a URL string`)
  const scheme = /^([a-z+]+):\/\//i.exec(url)?.[1]?.toLowerCase()
  const nbd = scheme?.startsWith('nbd') === true
  if ('nbd' in spec && !nbd) throw new TypeError(`nbd must be an nbd:// or nbd+unix:// URL (got ${url.split('?')[0]})`)
  if ('url' in spec && !nbd && scheme !== 'http' && scheme !== 'https')
    throw new TypeError(`url must be nbd://, nbd+unix://, http:// or https:// (got ${url.split('?')[0]})`)
  const { offset: _o, nbd: _n, url: _u, ...options } = spec as unknown as Record<string, unknown>
  const reader = new LazyRemote(() => RemoteSource.open(url, options as RemoteOptions), true)
  return { reader, offset, name: url.split('?')[0] }
}

// A reader in the engine's source coordinates, the identity of the whole snapshot (a file, a
// buffer) and where those coordinates start in it.
function localReader(source: Record<string, unknown>): {
  reader: PageReader & { close?: () => void }
  identity: () => SnapshotIdentity
  base: number
  name: string
} | null {
  if ('file' in source && (typeof source.file === 'string' || typeof source.file === 'number')) {
    // a { file } range's source offsets count from its file offset (inside the engine's Source)
    const base = typeof source.offset === 'number' ? source.offset : 0
    const file = source.file
    const r = new FileReader(file, base)
    const identity = (): SnapshotIdentity => {
      const whole = new FileReader(file, 0)
      try {
        return whole.identity()
      } finally {
        whole.close()
      }
    }
    return { reader: r, identity: once(identity), base, name: `file ${source.file}` }
  }
  if ('buffer' in source) {
    const b = source.buffer
    let bytes: Uint8Array
    if (b instanceof Mapping) {
      bytes = Buffer.alloc(b.length)
      b.read(0, bytes)
    } else if (b instanceof ArrayBuffer) bytes = new Uint8Array(b)
    else if (ArrayBuffer.isView(b)) bytes = new Uint8Array(b.buffer, b.byteOffset, b.byteLength)
    else return null
    return { reader: new BufferReader(bytes), identity: once(() => bytesIdentity(bytes)), base: 0, name: 'a buffer' }
  }
  return null
}

function once<T>(f: () => T): () => T {
  let done = false
  let value: T
  return () => {
    if (!done) {
      value = f()
      done = true
    }
    return value
  }
}
