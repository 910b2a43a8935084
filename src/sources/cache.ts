// The local page cache of remote sources: pages fetched once are kept on this host (in memory, or
// in files that outlive the process), so that a second restore of the same snapshot fetches
// nothing again. Bounded by watermarks: past `high` bytes, the least recently used pages go until
// `low` remains. Entries live under the snapshot's identity (its pinned ETag, a manifest's digest
// or a key the caller gives), so a changed snapshot never reads another version's pages.
//
// The file cache keeps, per snapshot, sparse 4 MiB segment files and a bitmap of the pages they
// hold; the bitmap is written (atomically, by rename) only after the segments it covers are on
// disk (fdatasync), so a crash loses pages, never turns a hole into a "present" page.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'

const PAGE = 4096

export interface CacheStats {
  /** bytes held (whole pages) */
  bytes: number
  /** pages served from the cache, and pages put in it */
  hits: number
  puts: number
  /** pages dropped by the watermarks */
  evicted: number
}

export interface PageCache {
  readonly kind: 'memory' | 'file'
  readonly stats: CacheStats
  /**
   * Copies the cached pages of [page, page + count) of snapshot `key` into `out` (page i at
   * (i - page) * 4096) and returns which were there (1 per page), or null when none was.
   */
  read(key: string, page: number, count: number, out: Buffer): Uint8Array | null
  /** Keeps whole pages starting at `page` (bytes.length a multiple of 4096). */
  write(key: string, page: number, bytes: Buffer): void
  /** Pages of `key` held now. */
  pages(key: string): number
  /** Forgets every page of `key` (a snapshot found changed). */
  drop(key: string): void
  /** Makes what was written durable (file cache); a no-op in memory. */
  flush(): Promise<void>
  close(): Promise<void>
}

export interface CacheOptions {
  /** evict past this many bytes */
  high: number
  /** down to this many (default 80% of high) */
  low?: number
}

function watermarks(o: CacheOptions): { high: number; low: number } {
  if (!Number.isSafeInteger(o.high) || o.high < PAGE) throw new RangeError(`cache high must be >= ${PAGE} bytes`)
  const low = o.low ?? Math.floor(o.high * 0.8)
  if (!Number.isSafeInteger(low) || low < 0 || low > o.high)
    throw new RangeError(`cache low must be 0..high (got ${o.low})`)
  return { high: o.high, low }
}

// ---- memory ------------------------------------------------------------------------------

const BLOCK_PAGES = 16 // 64 KiB blocks, each with a mask of the pages it holds

interface Block {
  data: Buffer
  mask: number
  count: number
}

export class MemoryCache implements PageCache {
  readonly kind = 'memory'
  readonly stats: CacheStats = { bytes: 0, hits: 0, puts: 0, evicted: 0 }
  readonly #high: number
  readonly #low: number
  // insertion order is recency order: a block used is deleted and set again
  readonly #blocks = new Map<string, Block>()
  readonly #perKey = new Map<string, number>()

  constructor(options: CacheOptions) {
    const w = watermarks(options)
    this.#high = w.high
    this.#low = w.low
  }

  read(key: string, page: number, count: number, out: Buffer): Uint8Array | null {
    let mask: Uint8Array | null = null
    for (let i = 0; i < count; ) {
      const p = page + i
      const b = Math.floor(p / BLOCK_PAGES)
      const id = `${key}\0${b}`
      const block = this.#blocks.get(id)
      const inBlock = Math.min(count - i, BLOCK_PAGES - (p % BLOCK_PAGES))
      if (block !== undefined) {
        this.#blocks.delete(id)
        this.#blocks.set(id, block)
        for (let k = 0; k < inBlock; k++) {
          const slot = (p + k) % BLOCK_PAGES
          if ((block.mask & (1 << slot)) === 0) continue
          block.data.copy(out, (i + k) * PAGE, slot * PAGE, (slot + 1) * PAGE)
          mask ??= new Uint8Array(count)
          mask[i + k] = 1
          this.stats.hits++
        }
      }
      i += inBlock
    }
    return mask
  }

  write(key: string, page: number, bytes: Buffer): void {
    const count = Math.floor(bytes.length / PAGE)
    for (let i = 0; i < count; ) {
      const p = page + i
      const b = Math.floor(p / BLOCK_PAGES)
      const id = `${key}\0${b}`
      let block = this.#blocks.get(id)
      if (block === undefined) {
        block = { data: Buffer.allocUnsafe(BLOCK_PAGES * PAGE), mask: 0, count: 0 }
      } else {
        this.#blocks.delete(id)
      }
      this.#blocks.set(id, block)
      const inBlock = Math.min(count - i, BLOCK_PAGES - (p % BLOCK_PAGES))
      for (let k = 0; k < inBlock; k++) {
        const slot = (p + k) % BLOCK_PAGES
        bytes.copy(block.data, slot * PAGE, (i + k) * PAGE, (i + k + 1) * PAGE)
        if ((block.mask & (1 << slot)) === 0) {
          block.mask |= 1 << slot
          block.count++
          this.stats.bytes += PAGE
          this.#perKey.set(key, (this.#perKey.get(key) ?? 0) + 1)
        }
        this.stats.puts++
      }
      i += inBlock
    }
    if (this.stats.bytes > this.#high) this.#evict()
  }

  pages(key: string): number {
    return this.#perKey.get(key) ?? 0
  }

  drop(key: string): void {
    for (const [id, block] of this.#blocks) {
      if (id.slice(0, id.indexOf('\0')) !== key) continue
      this.#blocks.delete(id)
      this.stats.bytes -= block.count * PAGE
    }
    this.#perKey.delete(key)
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.#blocks.clear()
    this.#perKey.clear()
    this.stats.bytes = 0
  }

  #evict(): void {
    for (const [id, block] of this.#blocks) {
      if (this.stats.bytes <= this.#low) break
      this.#blocks.delete(id)
      this.stats.bytes -= block.count * PAGE
      this.stats.evicted += block.count
      const key = id.slice(0, id.indexOf('\0'))
      const left = (this.#perKey.get(key) ?? 0) - block.count
      if (left > 0) this.#perKey.set(key, left)
      else this.#perKey.delete(key)
    }
  }
}

// ---- file --------------------------------------------------------------------------------

const SEGMENT_PAGES = 1024 // 4 MiB segment files, the unit of eviction
const FORMAT = 1

interface Snapshot {
  key: string
  dir: string
  /** pages held: bit per page, grown as pages beyond it are written */
  map: Uint8Array
  count: number
  /** segment -> open fd (read/write) */
  fds: Map<number, number>
  /** segments written since the last flush */
  dirty: Set<number>
  mapDirty: boolean
}

export class FileCache implements PageCache {
  readonly kind = 'file'
  readonly stats: CacheStats = { bytes: 0, hits: 0, puts: 0, evicted: 0 }
  readonly dir: string
  readonly #high: number
  readonly #low: number
  readonly #snapshots = new Map<string, Snapshot>()
  // recency of segments across snapshots: "<dirname>/<segment>" in use order
  readonly #recency = new Map<string, { snap: Snapshot; segment: number }>()
  #timer: NodeJS.Timeout | null = null
  #closed = false

  /** A cache in directory `dir` (created if missing); what earlier processes left there is reused. */
  constructor(dir: string, options: CacheOptions) {
    const w = watermarks(options)
    this.#high = w.high
    this.#low = w.low
    this.dir = dir
    fs.mkdirSync(dir, { recursive: true })
    this.#scan()
    if (this.stats.bytes > this.#high) this.#evict()
  }

  read(key: string, page: number, count: number, out: Buffer): Uint8Array | null {
    const snap = this.#snapshots.get(key)
    if (snap === undefined) return null
    let mask: Uint8Array | null = null
    let i = 0
    while (i < count) {
      if (!bit(snap.map, page + i)) {
        i++
        continue
      }
      // a run of present pages inside one segment: one pread
      const seg = Math.floor((page + i) / SEGMENT_PAGES)
      let n = 1
      while (i + n < count && bit(snap.map, page + i + n) && Math.floor((page + i + n) / SEGMENT_PAGES) === seg) n++
      const fd = this.#fd(snap, seg, false)
      if (fd >= 0) {
        const at = ((page + i) % SEGMENT_PAGES) * PAGE
        const got = readFully(fd, out, i * PAGE, n * PAGE, at)
        if (got === n * PAGE) {
          mask ??= new Uint8Array(count)
          mask.fill(1, i, i + n)
          this.stats.hits += n
          this.#touch(snap, seg)
        } else {
          this.#forgetSegments(snap, [seg]) // truncated behind our back: not trusted
        }
      } else {
        this.#forgetSegments(snap, [seg])
      }
      i += n
    }
    return mask
  }

  write(key: string, page: number, bytes: Buffer): void {
    if (this.#closed) return
    const snap = this.#snapshot(key)
    const count = Math.floor(bytes.length / PAGE)
    let i = 0
    while (i < count) {
      const seg = Math.floor((page + i) / SEGMENT_PAGES)
      const n = Math.min(count - i, SEGMENT_PAGES - ((page + i) % SEGMENT_PAGES))
      const fd = this.#fd(snap, seg, true)
      fs.writeSync(fd, bytes, i * PAGE, n * PAGE, ((page + i) % SEGMENT_PAGES) * PAGE)
      snap.dirty.add(seg)
      this.#touch(snap, seg)
      for (let k = 0; k < n; k++) {
        if (setBit(snap, page + i + k)) {
          snap.count++
          this.stats.bytes += PAGE
        }
      }
      this.stats.puts += n
      i += n
    }
    snap.mapDirty = true
    this.#schedule()
    if (this.stats.bytes > this.#high) this.#evict()
  }

  pages(key: string): number {
    return this.#snapshots.get(key)?.count ?? 0
  }

  drop(key: string): void {
    const snap = this.#snapshots.get(key)
    if (snap === undefined) return
    for (const fd of snap.fds.values()) fs.closeSync(fd)
    for (const id of [...this.#recency.keys()]) if (this.#recency.get(id)!.snap === snap) this.#recency.delete(id)
    this.stats.bytes -= snap.count * PAGE
    this.#snapshots.delete(key)
    fs.rmSync(snap.dir, { recursive: true, force: true })
  }

  /** Segments to disk first, then the bitmaps that name their pages. */
  async flush(): Promise<void> {
    for (const snap of this.#snapshots.values()) {
      if (!snap.mapDirty) continue
      // the slow part off the event loop; whatever is written meanwhile is synced by #writeMap
      await Promise.all(
        [...snap.dirty].map((seg) => {
          const fd = snap.fds.get(seg)
          return fd === undefined ? null : new Promise<void>((r) => fs.fdatasync(fd, () => r()))
        }),
      )
      if (this.#snapshots.get(snap.key) === snap) this.#writeMap(snap)
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return
    if (this.#timer) clearTimeout(this.#timer)
    await this.flush()
    this.#closed = true
    for (const snap of this.#snapshots.values()) for (const fd of snap.fds.values()) fs.closeSync(fd)
    this.#snapshots.clear()
    this.#recency.clear()
  }

  #schedule(): void {
    if (this.#timer !== null) return
    this.#timer = setTimeout(() => {
      this.#timer = null
      this.flush().catch(() => undefined)
    }, 1000)
    this.#timer.unref()
  }

  #snapshot(key: string): Snapshot {
    let snap = this.#snapshots.get(key)
    if (snap !== undefined) return snap
    const name = crypto.createHash('sha256').update(key).digest('hex').slice(0, 32)
    const dir = path.join(this.dir, name)
    fs.mkdirSync(dir, { recursive: true })
    fs.writeFileSync(path.join(dir, 'key'), JSON.stringify({ format: FORMAT, key }))
    snap = { key, dir, map: new Uint8Array(0), count: 0, fds: new Map(), dirty: new Set(), mapDirty: false }
    this.#snapshots.set(key, snap)
    return snap
  }

  #fd(snap: Snapshot, seg: number, create: boolean): number {
    const have = snap.fds.get(seg)
    if (have !== undefined) return have
    const file = path.join(snap.dir, `seg-${seg}`)
    try {
      const fd = fs.openSync(file, create ? fs.constants.O_RDWR | fs.constants.O_CREAT : fs.constants.O_RDWR, 0o600)
      snap.fds.set(seg, fd)
      return fd
    } catch (err) {
      if (!create) return -1
      throw err
    }
  }

  #touch(snap: Snapshot, seg: number): void {
    const id = `${snap.dir}/${seg}`
    this.#recency.delete(id)
    this.#recency.set(id, { snap, segment: seg })
  }

  // Bits first, durably, then the files: a bitmap on disk never names a page that a segment
  // file re-created later would hold as a hole.
  #forgetSegments(snap: Snapshot, segments: number[]): void {
    let dropped = 0
    for (const seg of segments) {
      for (let p = seg * SEGMENT_PAGES; p < (seg + 1) * SEGMENT_PAGES; p++) if (clearBit(snap, p)) dropped++
      this.#recency.delete(`${snap.dir}/${seg}`)
    }
    snap.count -= dropped
    this.stats.bytes -= dropped * PAGE
    this.stats.evicted += dropped
    this.#writeMap(snap)
    for (const seg of segments) {
      const fd = snap.fds.get(seg)
      if (fd !== undefined) fs.closeSync(fd)
      snap.fds.delete(seg)
      snap.dirty.delete(seg)
      fs.rmSync(path.join(snap.dir, `seg-${seg}`), { force: true })
    }
  }

  /** Synchronously: the segments written since the last flush to disk, then the bitmap. */
  #writeMap(snap: Snapshot): void {
    for (const seg of snap.dirty) {
      const fd = snap.fds.get(seg)
      if (fd !== undefined) fs.fdatasyncSync(fd)
    }
    snap.dirty.clear()
    const tmp = path.join(snap.dir, `map.${process.pid}.tmp`)
    fs.writeFileSync(tmp, snap.map)
    fs.renameSync(tmp, path.join(snap.dir, 'map'))
    snap.mapDirty = false
  }

  #evict(): void {
    const bySnap = new Map<Snapshot, number[]>()
    let bytes = this.stats.bytes
    for (const { snap, segment } of this.#recency.values()) {
      if (bytes <= this.#low) break
      let held = 0
      for (let p = segment * SEGMENT_PAGES; p < (segment + 1) * SEGMENT_PAGES; p++) if (bit(snap.map, p)) held++
      bytes -= held * PAGE
      const list = bySnap.get(snap) ?? []
      list.push(segment)
      bySnap.set(snap, list)
    }
    for (const [snap, segments] of bySnap) this.#forgetSegments(snap, segments)
  }

  // What earlier processes left: every snapshot directory with its key and bitmap; pages whose
  // segment file is gone are forgotten. Recency starts from the segment files' mtimes.
  #scan(): void {
    const found: Array<{ snap: Snapshot; segment: number; mtime: number }> = []
    for (const name of fs.readdirSync(this.dir)) {
      const dir = path.join(this.dir, name)
      let key: string
      let map: Uint8Array
      try {
        const meta = JSON.parse(fs.readFileSync(path.join(dir, 'key'), 'utf8')) as { format: number; key: string }
        if (meta.format !== FORMAT || typeof meta.key !== 'string') throw new Error('format')
        key = meta.key
        map = new Uint8Array(fs.readFileSync(path.join(dir, 'map')))
      } catch {
        continue // not ours, or never flushed: ignored (and never trusted)
      }
      const snap: Snapshot = { key, dir, map, count: 0, fds: new Map(), dirty: new Set(), mapDirty: false }
      const segments = new Map<number, number>()
      for (const f of fs.readdirSync(dir)) {
        const m = /^seg-(\d+)$/.exec(f)
        if (m) segments.set(Number(m[1]), fs.statSync(path.join(dir, f)).mtimeMs)
      }
      for (let p = 0; p < map.length * 8; p++) {
        if (!bit(map, p)) continue
        if (!segments.has(Math.floor(p / SEGMENT_PAGES))) {
          clearBit(snap, p)
          snap.mapDirty = true
        } else {
          snap.count++
        }
      }
      if (snap.mapDirty) this.#writeMap(snap) // before any segment can be re-created
      for (const [segment, mtime] of segments) found.push({ snap, segment, mtime })
      this.#snapshots.set(key, snap)
      this.stats.bytes += snap.count * PAGE
    }
    found.sort((a, b) => a.mtime - b.mtime)
    for (const f of found) this.#recency.set(`${f.snap.dir}/${f.segment}`, { snap: f.snap, segment: f.segment })
  }
}

function bit(map: Uint8Array, p: number): boolean {
  const byte = p >> 3
  return byte < map.length && (map[byte] & (1 << (p & 7))) !== 0
}

/** Sets page p's bit (growing the map); returns whether it was clear. */
function setBit(snap: Snapshot, p: number): boolean {
  const byte = p >> 3
  if (byte >= snap.map.length) {
    const grown = new Uint8Array(Math.max(byte + 1, snap.map.length * 2, 4096))
    grown.set(snap.map)
    snap.map = grown
  }
  const was = (snap.map[byte] & (1 << (p & 7))) !== 0
  snap.map[byte] |= 1 << (p & 7)
  return !was
}

function clearBit(snap: Snapshot, p: number): boolean {
  const byte = p >> 3
  if (byte >= snap.map.length) return false
  const was = (snap.map[byte] & (1 << (p & 7))) !== 0
  snap.map[byte] &= ~(1 << (p & 7))
  return was
}

function readFully(fd: number, out: Buffer, at: number, length: number, position: number): number {
  let got = 0
  while (got < length) {
    const n = fs.readSync(fd, out, at + got, length - got, position + got)
    if (n === 0) break
    got += n
  }
  return got
}
