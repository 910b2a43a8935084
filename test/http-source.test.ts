// The HTTP(S) range source (src/sources/http.ts) against a real nginx started here: ranges in
// flight, HTTPS with a certificate made by the test, bearer tokens, presigned-style query
// strings sent byte for byte, a pinned ETag (a changed object is ESTALE), a server that goes
// away and comes back, a server that never answers.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { HttpStore, parseHttpUrl } from '../src/sources/http'
import { SourceError } from '../src/sources/store'
import { missing, startNginx, stopServers, tempDir } from './helpers/servers'
import { timeScale } from './helpers/children'

afterAll(stopServers)

const MiB = 1024 * 1024

function webRoot(size: number): { root: string; bytes: Buffer } {
  const root = tempDir('uffd-www-')
  const bytes = crypto.randomBytes(size)
  fs.writeFileSync(path.join(root, 'snap.mem'), bytes)
  return { root, bytes }
}

async function sourceError(p: Promise<unknown>): Promise<SourceError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  )
  expect(err).toBeInstanceOf(SourceError)
  return err as SourceError
}

describe('HTTP URLs', () => {
  it('keeps the request target exactly as written (presigned URLs)', () => {
    const url = "https://bucket.s3.example/k%2Fey/snap.mem?X-Amz-Signature=ab%2Fcd'e&X-Amz-Expires=60#frag"
    expect(parseHttpUrl(url)).toEqual({
      origin: 'https://bucket.s3.example',
      path: "/k%2Fey/snap.mem?X-Amz-Signature=ab%2Fcd'e&X-Amz-Expires=60",
    })
    expect(parseHttpUrl('http://h:81?a=b').path).toBe('/?a=b')
    expect(parseHttpUrl('http://h').path).toBe('/')
  })

  it('refuses other schemes and credentials in the URL', () => {
    expect(() => parseHttpUrl('ftp://h/x')).toThrow(TypeError)
    expect(() => parseHttpUrl('https://u:p@h/x')).toThrow(/authorization/)
  })
})

describe.skipIf(missing('nginx', 'openssl'))('HTTP source against nginx', () => {
  it('reads every byte right with many ranges in flight, the ETag pinned', async () => {
    const { root, bytes } = webRoot(8 * MiB + 4321)
    const srv = await startNginx(root)
    const store = await HttpStore.open(`${srv.url}/snap.mem`, { connections: 4 })
    try {
      expect(store.size).toBe(bytes.length)
      expect(store.etag).toMatch(/^"[0-9a-f]+-[0-9a-f]+"$/)
      const reads = Array.from({ length: 120 }, (_, i) => {
        const offset = crypto.randomInt(0, bytes.length - 1)
        const length = Math.min(crypto.randomInt(1, 400_000), bytes.length - offset)
        return store
          .read(offset, length, { urgent: i % 5 === 0 })
          .then((b) => expect(b.equals(bytes.subarray(offset, offset + length))).toBe(true))
      })
      await Promise.all(reads)
      expect(store.counters.requests).toBe(121) // the probe and the reads
    } finally {
      await store.close()
    }
  })

  it('speaks HTTPS to a server whose self-signed certificate it is given, and refuses it otherwise', async () => {
    const { root, bytes } = webRoot(MiB)
    const srv = await startNginx(root, { https: true })
    const url = `${srv.url}/snap.mem`
    const store = await HttpStore.open(url, { ca: fs.readFileSync(srv.cert!) })
    try {
      expect((await store.read(5000, 70_000)).equals(bytes.subarray(5000, 75_000))).toBe(true)
    } finally {
      await store.close()
    }
    const err = await sourceError(HttpStore.open(url))
    expect(err.retryable).toBe(false)
    expect(err.message).toMatch(/certificate/i)
  })

  it('sends request headers (a bearer token), and says access denied without them', async () => {
    const { root, bytes } = webRoot(MiB)
    const srv = await startNginx(root, {
      extra: 'location / { if ($http_authorization != "Bearer s3cr3t") { return 401; } }',
    })
    const url = `${srv.url}/snap.mem`
    const denied = await sourceError(HttpStore.open(url))
    expect(denied.code).toBe('EACCES')
    expect(denied.retryable).toBe(false)
    const store = await HttpStore.open(url, { headers: { Authorization: 'Bearer s3cr3t' } })
    try {
      expect((await store.read(0, 4096)).equals(bytes.subarray(0, 4096))).toBe(true)
    } finally {
      await store.close()
    }
  })

  it('sends a presigned-style query string byte for byte', async () => {
    const { root, bytes } = webRoot(MiB)
    const query = "X-Amz-Signature=ab%2Fcd'e%7E&X-Amz-Expires=60"
    const srv = await startNginx(root, {
      extra: `location / { if ($args != "${query}") { return 403; } }`,
    })
    const store = await HttpStore.open(`${srv.url}/snap.mem?${query}`)
    try {
      expect(store.location).not.toContain('Signature') // never printed
      expect((await store.read(MiB - 4096, 4096)).equals(bytes.subarray(MiB - 4096))).toBe(true)
    } finally {
      await store.close()
    }
    const err = await sourceError(HttpStore.open(`${srv.url}/snap.mem?X-Amz-Signature=other`))
    expect(err.code).toBe('EACCES')
  })

  it('fails with ESTALE, not retryably, once the object changed, and never returns its new bytes', async () => {
    const { root } = webRoot(MiB)
    const srv = await startNginx(root)
    const store = await HttpStore.open(`${srv.url}/snap.mem`)
    try {
      await store.read(0, 4096)
      // a new object at the same name (new mtime: a new ETag)
      const file = path.join(root, 'snap.mem')
      fs.writeFileSync(file, crypto.randomBytes(MiB))
      fs.utimesSync(file, new Date(), new Date(Date.now() + 5000))
      const err = await sourceError(store.read(0, 4096))
      expect(err.code).toBe('ESTALE')
      expect(err.retryable).toBe(false)
      expect(err.message).toMatch(/changed/)
      // and a store opened with the old ETag refuses the new object
      const stale = await sourceError(HttpStore.open(`${srv.url}/snap.mem`, { etag: store.etag }))
      expect(stale.code).toBe('ESTALE')
    } finally {
      await store.close()
    }
  })

  it('refuses a server that ignores Range', async () => {
    const { root } = webRoot(MiB)
    const srv = await startNginx(root, { extra: 'max_ranges 0;' })
    const err = await sourceError(HttpStore.open(`${srv.url}/snap.mem`))
    expect(err.code).toBe('ENOTSUP')
  })

  it('fails reads retryably while the server is down, and reads again once it is back on its port', async () => {
    const { root, bytes } = webRoot(MiB)
    const srv = await startNginx(root)
    const store = await HttpStore.open(`${srv.url}/snap.mem`)
    try {
      await srv.stop()
      const err = await sourceError(store.read(0, 4096, { urgent: true }))
      expect(err.retryable).toBe(true)
      expect(err.code).toBe('ECONNREFUSED')
      const port = Number(new URL(srv.url).port)
      const again = await startNginx(root, { port })
      expect(again.url).toBe(srv.url)
      expect((await store.read(4096, 4096, { urgent: true })).equals(bytes.subarray(4096, 8192))).toBe(true)
      expect((await store.read(8192, 4096)).equals(bytes.subarray(8192, 12288))).toBe(true)
    } finally {
      await store.close()
    }
  })
})

describe('HTTP source timeouts', () => {
  it('gives up on a server that accepts and never answers, retryably', async () => {
    const sockets: net.Socket[] = []
    const silent = net.createServer((s) => sockets.push(s))
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r))
    const port = (silent.address() as net.AddressInfo).port
    try {
      const t0 = Date.now()
      const err = await sourceError(HttpStore.open(`http://127.0.0.1:${port}/snap.mem`, { timeout: 300 * timeScale }))
      expect(err.code).toBe('ETIMEDOUT')
      expect(err.retryable).toBe(true)
      expect(Date.now() - t0).toBeLessThan(10_000)
    } finally {
      for (const s of sockets) s.destroy()
      silent.close()
    }
  })
})
