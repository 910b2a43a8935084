// Page readers for local sources, used where JavaScript feeds a natively served range in the
// background (working-set replay of a { file } or { buffer } range): the engine keeps serving
// demand faults itself; these only read the pages to provide ahead of them.
import * as fs from 'node:fs'
import type { PageReader } from './feed'
import { bytesIdentity, fileIdentity, type SnapshotIdentity } from './snapshot-identity'

/** A file (from `offset`), read with positioned reads off the event loop. */
export class FileReader implements PageReader {
  readonly size: number
  readonly parallel = 4
  readonly maxRead = 4 * 1024 * 1024
  readonly #fd: number
  readonly #offset: number
  readonly #own: boolean

  /** `file`: a path (opened here, closed by close()) or an fd (left open). */
  constructor(file: string | number, offset = 0) {
    this.#own = typeof file === 'string'
    this.#fd = typeof file === 'string' ? fs.openSync(file, 'r') : file
    this.#offset = offset
    this.size = Math.max(0, fs.fstatSync(this.#fd).size - offset)
  }

  identity(): SnapshotIdentity {
    return fileIdentity(this.#fd, this.#offset, this.size)
  }

  read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length) // past the end of the file: zeros
    const n = Math.max(0, Math.min(length, this.size - offset))
    if (n === 0) return Promise.resolve(out)
    return new Promise((resolve, reject) => {
      fs.read(this.#fd, out, 0, n, this.#offset + offset, (err, got) => {
        if (err) reject(err)
        // A short read: the file shrank after it was opened. An error, never zeros in place of
        // the snapshot's bytes (issue 17, defect 7).
        else if (got < n)
          reject(
            Object.assign(
              new Error(
                `short read at offset ${this.#offset + offset}: the file is shorter than when it was opened (truncated?)`,
              ),
              {
                code: 'EIO',
              },
            ),
          )
        else resolve(out)
      })
    })
  }

  close(): void {
    if (this.#own) fs.closeSync(this.#fd)
  }
}

/** Bytes in memory (a buffer source). */
export class BufferReader implements PageReader {
  readonly size: number
  readonly #bytes: Uint8Array

  constructor(bytes: Uint8Array) {
    this.#bytes = bytes
    this.size = bytes.length
  }

  identity(): SnapshotIdentity {
    return bytesIdentity(this.#bytes)
  }

  read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length)
    if (offset < this.size) out.set(this.#bytes.subarray(offset, Math.min(this.size, offset + length)))
    return Promise.resolve(out)
  }
}
