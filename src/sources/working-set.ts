// Working sets (REAP's record and replay): the snapshot pages a run touched, in first-touch
// order, at 4 KiB granularity whatever the mapping's page size, in a small versioned file tied
// to the snapshot's identity (a file for another version is refused as stale). Replayed, the
// recorded pages are fetched first, in order, in large batched reads, while demand faults still
// go first (see feed.ts).
//
// File format (little-endian), version 1:
//   0  'UFFDWSET'  8  version u32 = 1   12 page size u32 = 4096   16 snapshot size u64
//   24 page count u32   28 metadata length u32   32 fingerprint (32 bytes)
//   64 metadata (JSON: { etag?, digest? })   then the pages, u32 each (page number = offset / 4096)
//   and last the SHA-256 of everything before it (32 bytes).
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import { type SnapshotIdentity, staleness } from './snapshot-identity'

const MAGIC = Buffer.from('UFFDWSET')
const VERSION = 1
const PAGE = 4096
const HEADER = 64

export class WorkingSetError extends Error {
  /** 'ESTALE' (another snapshot version), 'EBADMSG' (not a working-set file, or damaged), 'ENOTSUP' (version) */
  declare code: string
  constructor(message: string, code: string) {
    super(message)
    this.name = 'WorkingSetError'
    this.code = code
  }
}

export class WorkingSet {
  readonly identity: SnapshotIdentity
  /** snapshot page numbers (offset / 4096) in first-touch order, each once */
  readonly pages: Uint32Array

  constructor(identity: SnapshotIdentity, pages: Uint32Array) {
    this.identity = identity
    this.pages = pages
  }

  /** From touched byte offsets in arrival order: each page kept at its first touch. */
  static fromTouches(identity: SnapshotIdentity, offsets: Iterable<number>): WorkingSet {
    const seen = new Set<number>()
    const out: number[] = []
    const limit = Math.ceil(identity.size / PAGE)
    for (const o of offsets) {
      const p = Math.floor(o / PAGE)
      if (p >= limit || seen.has(p)) continue
      seen.add(p)
      out.push(p)
    }
    return new WorkingSet(identity, Uint32Array.from(out))
  }

  get bytes(): number {
    return this.pages.length * PAGE
  }

  /** Throws WorkingSetError('ESTALE') unless this working set was recorded on `current`. */
  check(current: SnapshotIdentity): void {
    const why = staleness(this.identity, current)
    if (why !== null)
      throw new WorkingSetError(`stale working set: it was recorded on a snapshot with ${why}`, 'ESTALE')
  }

  toBuffer(): Buffer {
    const meta = Buffer.from(
      JSON.stringify({
        ...(this.identity.etag !== undefined ? { etag: this.identity.etag } : {}),
        ...(this.identity.digest !== undefined ? { digest: this.identity.digest } : {}),
      }),
    )
    const body = Buffer.alloc(HEADER + meta.length + this.pages.length * 4)
    MAGIC.copy(body, 0)
    body.writeUInt32LE(VERSION, 8)
    body.writeUInt32LE(PAGE, 12)
    body.writeBigUInt64LE(BigInt(this.identity.size), 16)
    body.writeUInt32LE(this.pages.length, 24)
    body.writeUInt32LE(meta.length, 28)
    Buffer.from(this.identity.fingerprint, 'hex').copy(body, 32)
    meta.copy(body, HEADER)
    const at = HEADER + meta.length
    for (let i = 0; i < this.pages.length; i++) body.writeUInt32LE(this.pages[i], at + i * 4)
    return Buffer.concat([body, crypto.createHash('sha256').update(body).digest()])
  }

  static fromBuffer(file: Buffer, name = 'working set'): WorkingSet {
    const bad = (why: string): never => {
      throw new WorkingSetError(`${name}: ${why}`, 'EBADMSG')
    }
    if (file.length < HEADER + 32 || !file.subarray(0, 8).equals(MAGIC)) bad('not a working-set file')
    const version = file.readUInt32LE(8)
    if (version !== VERSION)
      throw new WorkingSetError(`${name}: version ${version} is not supported (${VERSION} is)`, 'ENOTSUP')
    const body = file.subarray(0, file.length - 32)
    if (
      !crypto
        .createHash('sha256')
        .update(body)
        .digest()
        .equals(file.subarray(file.length - 32))
    )
      bad('damaged (checksum mismatch)')
    if (file.readUInt32LE(12) !== PAGE) bad('unexpected page size')
    const size = Number(file.readBigUInt64LE(16))
    const count = file.readUInt32LE(24)
    const metaLength = file.readUInt32LE(28)
    if (HEADER + metaLength + count * 4 !== body.length) bad('truncated')
    let meta: { etag?: string; digest?: string }
    try {
      meta = JSON.parse(file.subarray(HEADER, HEADER + metaLength).toString('utf8'))
    } catch {
      return bad('bad metadata')
    }
    const identity: SnapshotIdentity = { size, fingerprint: file.subarray(32, 64).toString('hex') }
    if (typeof meta.etag === 'string') identity.etag = meta.etag
    if (typeof meta.digest === 'string') identity.digest = meta.digest
    const pages = new Uint32Array(count)
    const at = HEADER + metaLength
    const limit = Math.ceil(size / PAGE)
    for (let i = 0; i < count; i++) {
      pages[i] = file.readUInt32LE(at + i * 4)
      if (pages[i] >= limit) bad(`page ${pages[i]} lies past the snapshot's end`)
    }
    return new WorkingSet(identity, pages)
  }

  static load(file: string): WorkingSet {
    let bytes: Buffer
    try {
      bytes = fs.readFileSync(file)
    } catch (err) {
      throw new WorkingSetError(`cannot read working set ${file}: ${(err as Error).message}`, 'ENOENT')
    }
    return WorkingSet.fromBuffer(bytes, file)
  }

  /** Writes the file atomically (a reader never sees half of it). */
  save(file: string): void {
    const tmp = `${file}.${process.pid}.tmp`
    fs.writeFileSync(tmp, this.toBuffer())
    fs.renameSync(tmp, file)
  }
}
