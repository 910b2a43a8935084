// The local page cache of remote sources (memory and files, high/low watermarks) and the
// integrity manifest.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { FileCache, Manifest, MemoryCache, type PageCache } from '../src/index'
import { stopServers, tempDir } from './helpers/servers'

afterAll(stopServers)

const PAGE = 4096

function pagesOf(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n * PAGE)
  for (let i = 0; i < n; i++) b.fill((seed + i) & 0xff, i * PAGE, (i + 1) * PAGE)
  return b
}

function check(cache: PageCache, key: string, page: number, count: number, seed: number): Uint8Array | null {
  const out = Buffer.alloc(count * PAGE)
  const mask = cache.read(key, page, count, out)
  if (mask === null) return null
  for (let i = 0; i < count; i++) if (mask[i]) expect(out[i * PAGE + 7]).toBe((seed + page + i) & 0xff)
  return mask
}

for (const kind of ['memory', 'file'] as const) {
  describe(`${kind} cache`, () => {
    const make = (high: number, low?: number, dir = tempDir()): PageCache =>
      kind === 'memory' ? new MemoryCache({ high, low }) : new FileCache(dir, { high, low })

    it('returns what was put, page by page, with a mask of what it holds', async () => {
      const cache = make(64 * 1024 * 1024)
      cache.write('a', 10, pagesOf(20, 10))
      expect(cache.pages('a')).toBe(20)
      expect(cache.stats.bytes).toBe(20 * PAGE)
      const mask = check(cache, 'a', 5, 30, 0)!
      expect([...mask]).toEqual([...Array(5).fill(0), ...Array(20).fill(1), ...Array(5).fill(0)])
      expect(check(cache, 'b', 10, 5, 0)).toBeNull() // another snapshot: nothing
      cache.write('a', 10, pagesOf(2, 10)) // same pages again: no double count
      expect(cache.stats.bytes).toBe(20 * PAGE)
      cache.drop('a')
      expect(check(cache, 'a', 10, 5, 0)).toBeNull()
      expect(cache.stats.bytes).toBe(0)
      await cache.close()
    })

    it('evicts the least recently used pages past high, down to low', async () => {
      const seg = 1024 // the file cache evicts 4 MiB segments, the memory one 64 KiB blocks
      const high = 4 * seg * PAGE
      const cache = make(high, (2 * seg + 32) * PAGE)
      cache.write('k', 0, pagesOf(seg, 0))
      cache.write('k', seg, pagesOf(seg, seg))
      cache.write('k', 2 * seg, pagesOf(seg, 2 * seg))
      check(cache, 'k', 0, 16, 0) // page 0's block/segment is now the most recently used
      cache.write('k', 3 * seg, pagesOf(seg + 16, 3 * seg)) // past high
      expect(cache.stats.bytes).toBeLessThanOrEqual(high)
      expect(cache.stats.evicted).toBeGreaterThan(0)
      expect(check(cache, 'k', 0, 16, 0)?.every((b) => b === 1)).toBe(true) // kept: used recently
      expect(check(cache, 'k', seg, 16, 0)).toBeNull() // the oldest went first
      await cache.close()
    })

    it('refuses bad watermarks', () => {
      expect(() => make(100)).toThrow(RangeError)
      expect(() => make(PAGE * 10, PAGE * 20)).toThrow(RangeError)
    })
  })
}

describe('file cache on disk', () => {
  it('is found again by a new cache in the same directory, and survives only what was flushed', async () => {
    const dir = tempDir()
    const a = new FileCache(dir, { high: 64 * 1024 * 1024 })
    a.write('snap', 0, pagesOf(300, 0))
    await a.close()
    const b = new FileCache(dir, { high: 64 * 1024 * 1024 })
    expect(b.pages('snap')).toBe(300)
    expect(check(b, 'snap', 0, 300, 0)?.every((x) => x === 1)).toBe(true)
    // written but never flushed (a crash): not trusted by the next cache
    b.write('snap', 2000, pagesOf(4, 2000))
    const c = new FileCache(dir, { high: 64 * 1024 * 1024 })
    expect(c.pages('snap')).toBe(300)
    expect(check(c, 'snap', 2000, 4, 0)).toBeNull()
    await b.close()
    await c.close()
  })

  it('forgets pages whose segment file went away', async () => {
    const dir = tempDir()
    const a = new FileCache(dir, { high: 64 * 1024 * 1024 })
    a.write('snap', 0, pagesOf(16, 0))
    a.write('snap', 1024, pagesOf(16, 1024))
    await a.close()
    const snapDir = fs.readdirSync(dir).map((d) => path.join(dir, d))[0]
    fs.rmSync(path.join(snapDir, 'seg-1'))
    const b = new FileCache(dir, { high: 64 * 1024 * 1024 })
    expect(b.pages('snap')).toBe(16)
    expect(check(b, 'snap', 1024, 16, 0)).toBeNull()
    await b.close()
  })
})

describe('integrity manifest', () => {
  it('digests each chunk, checks bytes, and has an identity of its own', async () => {
    const file = path.join(tempDir(), 'snap')
    const bytes = crypto.randomBytes(200_000)
    fs.writeFileSync(file, bytes)
    const m = await Manifest.ofFile(file, 65536)
    expect(m.chunks).toBe(4)
    expect(m.verify(0, bytes.subarray(0, 65536))).toBe(true)
    expect(m.verify(3, bytes.subarray(3 * 65536))).toBe(true) // the short last chunk
    const bad = Buffer.from(bytes.subarray(65536, 131072))
    bad[9] ^= 1
    expect(m.verify(1, bad)).toBe(false)
    expect(m.verify(9, bad)).toBe(false)
    const again = Manifest.from(JSON.parse(JSON.stringify(m)))
    expect(again.digest).toBe(m.digest)
    expect(m.digest).toMatch(/^sha256:[0-9a-f]{64}$/)
    expect(() => Manifest.from({ ...m.toJSON(), chunkSize: 1000 })).toThrow(RangeError)
    expect(() => Manifest.from({ ...m.toJSON(), digests: ['x'] })).toThrow()
    expect(() => Manifest.from({ format: 'other' })).toThrow(TypeError)
  })
})
