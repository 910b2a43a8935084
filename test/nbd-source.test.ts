// The NBD client (src/sources/nbd.ts) against real servers: nbdkit's file plugin (with its
// delay and error filters) and qemu-nbd serving compressed and sparse qcow2 images.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { NbdConnection, NbdStore, parseNbdUrl } from '../src/sources/nbd'
import { SourceError } from '../src/sources/store'
import { makeQcow2, missing, startNbdkit, startQemuNbd, stopServers, tempDir } from './helpers/servers'
import { timeScale } from './helpers/children'

afterAll(stopServers)

const MiB = 1024 * 1024

function snapshotFile(size: number, holes = false): { file: string; bytes: Buffer } {
  const dir = tempDir()
  const bytes = crypto.randomBytes(size)
  if (holes) {
    // every other MiB is zeros: sparse clusters once converted to qcow2
    for (let at = 0; at < size; at += 2 * MiB) bytes.fill(0, at, Math.min(at + MiB, size))
  }
  const file = path.join(dir, 'snap.raw')
  fs.writeFileSync(file, bytes)
  return { file, bytes }
}

async function expectSourceError(p: Promise<unknown>, code: string, retryable: boolean): Promise<SourceError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  )
  expect(err).toBeInstanceOf(SourceError)
  expect((err as SourceError).code).toBe(code)
  expect((err as SourceError).retryable).toBe(retryable)
  return err as SourceError
}

describe('NBD URLs', () => {
  it('parses nbd:// and nbd+unix://', () => {
    expect(parseNbdUrl('nbd://127.0.0.1:10900/snap')).toEqual({ host: '127.0.0.1', port: 10900, export: 'snap' })
    expect(parseNbdUrl('nbd://host/')).toEqual({ host: 'host', port: 10809, export: '' })
    expect(parseNbdUrl('nbd://[::1]:7/a%20b')).toEqual({ host: '::1', port: 7, export: 'a b' })
    expect(parseNbdUrl('nbd+unix:///e?socket=/tmp/s.sock')).toEqual({ socket: '/tmp/s.sock', export: 'e' })
  })

  it('refuses what it cannot speak, saying why', () => {
    expect(() => parseNbdUrl('nbd+unix:///e')).toThrow(/socket=PATH/)
    expect(() => parseNbdUrl('nbds://h/e')).toThrow(/TLS/)
    expect(() => parseNbdUrl('http://h/e')).toThrow(TypeError)
    expect(() => parseNbdUrl('not a url')).toThrow(TypeError)
  })
})

describe.skipIf(missing('nbdkit'))('NBD client against nbdkit', () => {
  it('reads every byte right over a Unix socket and over TCP, many reads in flight', async () => {
    const { file, bytes } = snapshotFile(8 * MiB + 12345)
    for (const tcp of [false, true]) {
      const srv = await startNbdkit(file, { tcp })
      const store = await NbdStore.open(srv.url)
      try {
        expect(store.size).toBe(bytes.length)
        expect(store.info.structured).toBe(true)
        const reads: Array<Promise<void>> = []
        for (let i = 0; i < 200; i++) {
          const offset = crypto.randomInt(0, bytes.length - 1)
          const length = Math.min(crypto.randomInt(1, 300_000), bytes.length - offset)
          reads.push(
            store.read(offset, length, { urgent: i % 7 === 0 }).then((b) => {
              expect(b.equals(bytes.subarray(offset, offset + length))).toBe(true)
            }),
          )
        }
        reads.push(store.read(0, 4 * MiB).then((b) => expect(b.equals(bytes.subarray(0, 4 * MiB))).toBe(true)))
        await Promise.all(reads)
        expect(store.counters.requests).toBe(201)
      } finally {
        await store.close()
        await srv.stop()
      }
    }
  })

  it('names a missing export', async () => {
    const { file } = snapshotFile(MiB)
    const srv = await startNbdkit(file, { filters: ['exportname'], params: ['exportname-strict=true'] })
    const url = srv.url.replace('/snap?', '/nope?')
    const err = await expectSourceError(NbdStore.open(url), 'ENOENT', false)
    expect(err.message).toMatch(/no export named 'nope'/)
    await srv.stop()
  })

  it('reports injected EIO as a retryable error, and reads again once the server recovers', async () => {
    const { file, bytes } = snapshotFile(2 * MiB)
    const trigger = path.join(tempDir(), 'inject')
    fs.writeFileSync(trigger, '')
    const srv = await startNbdkit(file, {
      filters: ['error'],
      params: ['error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`],
    })
    const store = await NbdStore.open(srv.url)
    try {
      const err = await expectSourceError(store.read(4096, 8192), 'EIO', true)
      expect(err.errno).toBe(5)
      expect(err.offset).toBe(4096)
      expect(err.syscall).toBe('NBD_CMD_READ')
      fs.unlinkSync(trigger)
      // the connection survived the error reply
      expect((await store.read(4096, 8192)).equals(bytes.subarray(4096, 4096 + 8192))).toBe(true)
      expect(store.counters.reconnects).toBe(0)
    } finally {
      await store.close()
      await srv.stop()
    }
  })

  it('fails reads in flight when the server dies, and reconnects to a server that comes back', async () => {
    const { file, bytes } = snapshotFile(4 * MiB)
    const srv = await startNbdkit(file, { filters: ['delay'], params: ['delay-read=300ms'] })
    const store = await NbdStore.open(srv.url)
    try {
      const inflight = [store.read(0, MiB), store.read(MiB, MiB, { urgent: true })].map((p) =>
        expectSourceError(p, 'ECONNRESET', true),
      )
      await new Promise((r) => setTimeout(r, 50))
      srv.kill()
      await Promise.all(inflight)
      // nobody listens: connecting fails, retryably
      await expectSourceError(store.read(0, 4096, { urgent: true }), 'ECONNREFUSED', true)
      // the same socket path served again
      const sock = parseNbdUrl(srv.url).socket!
      fs.rmSync(sock, { force: true })
      const again = await startNbdkit(file, { params: [] })
      fs.renameSync(parseNbdUrl(again.url).socket!, sock)
      const b = await store.read(MiB, 4096, { urgent: true })
      expect(b.equals(bytes.subarray(MiB, MiB + 4096))).toBe(true)
      expect(store.counters.reconnects).toBeGreaterThanOrEqual(1)
    } finally {
      await store.close()
    }
  })

  it('times out a read that gets no reply, failing it retryably', async () => {
    const { file } = snapshotFile(MiB)
    const srv = await startNbdkit(file, { filters: ['delay'], params: ['delay-read=3'] })
    const store = await NbdStore.open(srv.url, { timeout: 200 * timeScale })
    try {
      const err = await expectSourceError(store.read(0, 4096), 'ETIMEDOUT', true)
      expect(err.message).toMatch(/no reply to a read within 200 ms/)
    } finally {
      await store.close()
      await srv.stop()
    }
  })

  it('rejects reads outside the export', async () => {
    const { file } = snapshotFile(MiB)
    const srv = await startNbdkit(file)
    const conn = await NbdConnection.connect(parseNbdUrl(srv.url), srv.url)
    try {
      await expect(conn.read(MiB - 10, 20)).rejects.toThrow(RangeError)
      await expect(conn.read(0, 0)).rejects.toThrow(RangeError)
    } finally {
      conn.close()
      await srv.stop()
    }
  })
})

describe.skipIf(missing('qemu-nbd', 'qemu-img'))('NBD client against qemu-nbd (qcow2)', () => {
  for (const compressed of [false, true]) {
    it(`reads a ${compressed ? 'compressed' : 'sparse'} qcow2 image as its raw bytes (holes as zeros)`, async () => {
      const { file, bytes } = snapshotFile(6 * MiB, true)
      const image = makeQcow2(file, compressed)
      if (!compressed) expect(fs.statSync(image).size).toBeLessThan(bytes.length)
      const srv = await startQemuNbd(image, 'qcow2')
      const store = await NbdStore.open(srv.url)
      try {
        expect(store.size).toBe(bytes.length)
        const whole = await store.read(0, bytes.length)
        expect(whole.equals(bytes)).toBe(true)
        const parts = await Promise.all(
          Array.from({ length: 64 }, (_, i) => {
            const offset = i * 96 * 1024 + 512
            return store.read(offset, 70_000).then((b) => b.equals(bytes.subarray(offset, offset + 70_000)))
          }),
        )
        expect(parts.every(Boolean)).toBe(true)
      } finally {
        await store.close()
        await srv.stop()
      }
    })
  }
})
