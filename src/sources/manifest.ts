// Integrity manifest: the SHA-256 of every chunk of a snapshot. With one, remote reads are
// widened to whole chunks and each chunk is checked before any of its pages is installed or
// cached: a chunk whose bytes do not match is never installed (the read fails with EBADMSG and
// the range's failure policy applies). The manifest's own digest names the snapshot's content,
// so it also keys the local cache and ties working-set files to the snapshot.
//
// Format (JSON): { "format": "userfaultfd-manifest", "version": 1, "algorithm": "sha256",
//                  "chunkSize": 65536, "size": <bytes>, "digests": ["<hex>", ...] }
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'

export const MANIFEST_FORMAT = 'userfaultfd-manifest'
const PAGE = 4096

export interface ManifestData {
  format: typeof MANIFEST_FORMAT
  version: 1
  algorithm: 'sha256'
  chunkSize: number
  size: number
  digests: string[]
}

function sha256(bytes: Uint8Array): string {
  return crypto.createHash('sha256').update(bytes).digest('hex')
}

export class Manifest {
  readonly chunkSize: number
  readonly size: number
  /** 'sha256:<hex>' of the manifest itself: the content's identity */
  readonly digest: string
  readonly #digests: string[]

  private constructor(data: ManifestData) {
    this.chunkSize = data.chunkSize
    this.size = data.size
    this.#digests = data.digests
    this.digest = `sha256:${sha256(Buffer.from(JSON.stringify(Manifest.#canonical(data))))}`
  }

  get chunks(): number {
    return this.#digests.length
  }

  /** Checks and adopts a parsed manifest (TypeError/RangeError say what is wrong). */
  static from(value: unknown): Manifest {
    const d = value as Partial<ManifestData>
    if (d === null || typeof d !== 'object' || d.format !== MANIFEST_FORMAT)
      throw new TypeError(`not a manifest (format must be '${MANIFEST_FORMAT}')`)
    if (d.version !== 1) throw new RangeError(`manifest version ${d.version} is not supported (1 is)`)
    if (d.algorithm !== 'sha256') throw new RangeError(`manifest algorithm ${d.algorithm} is not supported (sha256)`)
    const cs = d.chunkSize
    if (typeof cs !== 'number' || !Number.isSafeInteger(cs) || cs < PAGE || cs % PAGE !== 0 || (cs & (cs - 1)) !== 0)
      throw new RangeError(`manifest chunkSize must be a power of two >= ${PAGE} (got ${cs})`)
    if (typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0)
      throw new RangeError(`manifest size must be a byte count (got ${d.size})`)
    const chunks = Math.ceil(d.size / cs)
    if (!Array.isArray(d.digests) || d.digests.length !== chunks)
      throw new RangeError(`manifest must hold ${chunks} digests for ${d.size} bytes (got ${d.digests?.length})`)
    for (const h of d.digests)
      if (typeof h !== 'string' || !/^[0-9a-f]{64}$/.test(h))
        throw new TypeError('manifest digests must be hex SHA-256')
    return new Manifest(d as ManifestData)
  }

  static load(file: string): Manifest {
    let parsed: unknown
    try {
      parsed = JSON.parse(fs.readFileSync(file, 'utf8'))
    } catch (err) {
      throw new TypeError(`cannot read manifest ${file}: ${(err as Error).message}`)
    }
    return Manifest.from(parsed)
  }

  /** The manifest of `size` bytes read chunk by chunk through `read` (a file, a store...). */
  static async create(
    size: number,
    read: (offset: number, length: number) => Promise<Uint8Array> | Uint8Array,
    chunkSize = 64 * 1024,
  ): Promise<Manifest> {
    const digests: string[] = []
    for (let at = 0; at < size; at += chunkSize) digests.push(sha256(await read(at, Math.min(chunkSize, size - at))))
    return Manifest.from({ format: MANIFEST_FORMAT, version: 1, algorithm: 'sha256', chunkSize, size, digests })
  }

  /** The manifest of a local file. */
  static async ofFile(file: string, chunkSize = 64 * 1024): Promise<Manifest> {
    const fd = fs.openSync(file, 'r')
    try {
      const size = fs.fstatSync(fd).size
      const buf = Buffer.allocUnsafe(chunkSize)
      return await Manifest.create(
        size,
        (offset, length) => {
          const n = fs.readSync(fd, buf, 0, length, offset)
          return buf.subarray(0, n)
        },
        chunkSize,
      )
    } finally {
      fs.closeSync(fd)
    }
  }

  /** Whether `bytes` are chunk `chunk`'s (its full length: the last chunk may be short). */
  verify(chunk: number, bytes: Uint8Array): boolean {
    if (chunk < 0 || chunk >= this.#digests.length) return false
    const expected = Math.min(this.chunkSize, this.size - chunk * this.chunkSize)
    return bytes.length === expected && sha256(bytes) === this.#digests[chunk]
  }

  toJSON(): ManifestData {
    return {
      format: MANIFEST_FORMAT,
      version: 1,
      algorithm: 'sha256',
      chunkSize: this.chunkSize,
      size: this.size,
      digests: this.#digests,
    }
  }

  static #canonical(d: ManifestData): ManifestData {
    return {
      format: MANIFEST_FORMAT,
      version: 1,
      algorithm: 'sha256',
      chunkSize: d.chunkSize,
      size: d.size,
      digests: d.digests,
    }
  }
}
