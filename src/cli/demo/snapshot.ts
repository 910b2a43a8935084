// A deterministic memory snapshot for demos and tests: every 8-byte word encodes its own file
// offset and a seed, so any page served from the wrong offset (or zero-filled) is detected.
import * as fs from 'node:fs'

const CHUNK = 1 << 20

/** The bytes of [offset, offset + length) of the snapshot with `seed` (offset and length multiples of 8). */
export function snapshotBytes(offset: number, length: number, seed = 0x5eed): Buffer {
  const out = Buffer.allocUnsafeSlow(length)
  // Little-endian u64 words: low half = the word's file offset (mod 2^32), high half = seed
  // mixed with the offset's upper bits.
  const words = new Uint32Array(out.buffer, out.byteOffset, length / 4)
  for (let i = 0, off = offset; i < words.length; i += 2, off += 8) {
    words[i] = off >>> 0
    words[i + 1] = (seed ^ Math.floor(off / 0x100000000)) >>> 0
  }
  return out
}

/** Writes a snapshot file of `size` bytes (a multiple of 8). */
export function writeSnapshot(path: string, size: number, seed = 0x5eed): void {
  const fd = fs.openSync(path, 'w', 0o600)
  try {
    for (let off = 0; off < size; off += CHUNK) {
      const len = Math.min(CHUNK, size - off)
      fs.writeSync(fd, snapshotBytes(off, len, seed), 0, len, off)
    }
  } finally {
    fs.closeSync(fd)
  }
}

/**
 * Writes a snapshot file of `size` bytes (a multiple of 8) without blocking the event loop for
 * long: `onProgress` sees the bytes written; `signal` stops it between chunks (AbortError).
 */
export async function writeSnapshotAsync(
  path: string,
  size: number,
  options: { seed?: number; signal?: AbortSignal; onProgress?: (bytes: number) => void } = {},
): Promise<void> {
  const file = await fs.promises.open(path, 'w', 0o600)
  try {
    for (let off = 0; off < size; off += CHUNK * 4) {
      options.signal?.throwIfAborted()
      const len = Math.min(CHUNK * 4, size - off)
      await file.write(snapshotBytes(off, len, options.seed), 0, len, off)
      options.onProgress?.(off + len)
    }
  } finally {
    await file.close()
  }
}
