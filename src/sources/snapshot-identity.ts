// What ties a working-set file (or a cache entry) to one snapshot version: its size, the pinned
// ETag of an HTTP object, the digest of its integrity manifest, and always a fingerprint: the
// SHA-256 of its size and of eight sampled pages (the first, the last and six between), which
// any source can compute in one parallel round of small reads. A file naming another version
// (or another snapshot) is refused as stale.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'

const PAGE = 4096
const SAMPLES = 8

export interface SnapshotIdentity {
  size: number
  etag?: string
  /** the integrity manifest's digest ('sha256:...') */
  digest?: string
  /** hex SHA-256 of the size and the sampled pages */
  fingerprint: string
}

/** The sampled [offset, length] pairs of a snapshot of `size` bytes (page-aligned offsets). */
export function fingerprintOffsets(size: number): Array<[number, number]> {
  const pages = Math.ceil(size / PAGE)
  const picked = new Set<number>()
  for (let k = 0; k < SAMPLES && pages > 0; k++) picked.add(Math.floor(((pages - 1) * k) / (SAMPLES - 1)))
  return [...picked].sort((a, b) => a - b).map((p) => [p * PAGE, Math.min(PAGE, size - p * PAGE)])
}

export function fingerprintOf(size: number, samples: Uint8Array[]): string {
  const h = crypto.createHash('sha256')
  h.update(`userfaultfd-fingerprint:1:${size}`)
  for (const s of samples) h.update(s)
  return h.digest('hex')
}

/** The identity of `length` bytes of a file from `offset` (a snapshot inside a larger file). */
export function fileIdentity(fd: number, offset = 0, length?: number): SnapshotIdentity {
  const size = length ?? Math.max(0, fs.fstatSync(fd).size - offset)
  const samples = fingerprintOffsets(size).map(([o, n]) => {
    const b = Buffer.alloc(n)
    fs.readSync(fd, b, 0, n, offset + o)
    return b
  })
  return { size, fingerprint: fingerprintOf(size, samples) }
}

/** The identity of bytes in memory. */
export function bytesIdentity(bytes: Uint8Array): SnapshotIdentity {
  const size = bytes.length
  return {
    size,
    fingerprint: fingerprintOf(
      size,
      fingerprintOffsets(size).map(([o, n]) => bytes.subarray(o, o + n)),
    ),
  }
}

/** Why `recorded` does not name the snapshot `current`, or null when it does. */
export function staleness(recorded: SnapshotIdentity, current: SnapshotIdentity): string | null {
  if (recorded.size !== current.size) return `size ${recorded.size}, the snapshot has ${current.size}`
  if (recorded.etag !== undefined && current.etag !== undefined && recorded.etag !== current.etag)
    return `ETag ${recorded.etag}, the snapshot has ${current.etag}`
  if (recorded.digest !== undefined && current.digest !== undefined && recorded.digest !== current.digest)
    return `manifest digest ${recorded.digest}, the snapshot has ${current.digest}`
  if (recorded.fingerprint !== current.fingerprint) return 'a fingerprint of other content'
  return null
}
