// FaultServer over remote sources: { nbd } from nbdkit and qemu-nbd, { url } from nginx, a
// shared RemoteSource, the local cache across restores. Faults come from native threads.
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { FaultServer, FileCache, Mapping, PAGE_SIZE, RemoteSource, Userfaultfd } from '../src/index'
import { pages, touch } from '../src/testing'
import { closeAll, readAll, setup, track, u64At, within } from './helpers/fault-server'
import { makeQcow2, missing, startNbdkit, startNginx, startQemuNbd, stopServers, tempDir } from './helpers/servers'
import { snapshot } from './helpers/snapshots'

afterEach((ctx) => closeAll(ctx))
afterAll(stopServers)

const MiB = 1024 * 1024

function shuffled(list: BigUint64Array): BigUint64Array {
  const out = BigUint64Array.from(list)
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    ;[out[i], out[j]] = [out[j], out[i]]
  }
  return out
}

async function touchAndCheck(m: Mapping, expected: Uint8Array, threads = 2): Promise<void> {
  const list = shuffled(pages(m))
  const { values } = await within(touch(list, { threads }), 20_000, 'touch')
  for (let i = 0; i < list.length; i++) {
    const at = Number(list[i] - m.address)
    if (values[i] !== u64At(expected, at)) throw new Error(`page at ${at}: got ${values[i]}`)
  }
}

describe.skipIf(missing('nbdkit'))('FaultServer { nbd } (nbdkit)', () => {
  it('serves every page right to native threads, demand faults answered over NBD', async () => {
    const { file, bytes } = snapshot(4 * MiB)
    const srv = await startNbdkit(file, { tcp: true })
    const { m, server, errors } = setup((4 * MiB) / PAGE_SIZE)
    server.serve(m, { nbd: srv.url })
    await touchAndCheck(m, bytes)
    expect(Buffer.compare(readAll(m), bytes)).toBe(0)
    const s = server.stats()
    expect(s.fed.demandRequests).toBeGreaterThan(0)
    expect(s.sourceWaiting).toBe(0)
    expect(errors).toEqual([])
  })

  it('fills the whole range in the background with prefetch, and drained() resolves', async () => {
    const { file, bytes } = snapshot(8 * MiB + 3 * PAGE_SIZE)
    const srv = await startNbdkit(file)
    // a range larger than the snapshot: past its end, zeros
    const { m, server, errors } = setup((8 * MiB) / PAGE_SIZE + 8)
    server.serve(m, { nbd: srv.url }, { prefetch: true })
    await within(server.drained(), 15_000, 'drained')
    const all = readAll(m)
    expect(Buffer.compare(all.subarray(0, bytes.length), bytes)).toBe(0)
    expect(all.subarray(bytes.length).every((b) => b === 0)).toBe(true)
    expect(server.stats().fed.backgroundReads).toBeGreaterThan(0)
    expect(errors).toEqual([])
  })

  it('serves from an offset in the snapshot, through a RemoteSource shared by two servers', async () => {
    const { file, bytes } = snapshot(4 * MiB)
    const srv = await startNbdkit(file)
    const remote = await RemoteSource.open(srv.url)
    try {
      const a = setup(256)
      const m2 = track(Mapping.anonymous(256 * PAGE_SIZE))
      const uffd2 = track(Userfaultfd.open())
      const server2 = track(new FaultServer(uffd2))
      a.server.serve(a.m, { remote, offset: MiB })
      server2.serve(m2, { remote, offset: 2 * MiB }, { prefetch: true })
      await touchAndCheck(a.m, bytes.subarray(MiB, 2 * MiB))
      await within(server2.drained(), 10_000, 'drained')
      expect(Buffer.compare(readAll(m2), bytes.subarray(2 * MiB, 3 * MiB))).toBe(0)
    } finally {
      await remote.close()
    }
  })

  it('refuses bad remote specs with TypeError/RangeError', () => {
    const { m, server } = setup(16)
    expect(() => server.serve(m, { nbd: 'http://x/y' })).toThrow(TypeError)
    expect(() => server.serve(m, { url: 'ftp://x/y' })).toThrow(TypeError)
    expect(() => server.serve(m, { nbd: 42 as unknown as string })).toThrow(TypeError)
    expect(() => server.serve(m, { nbd: 'nbd://h/e', offset: 100 })).toThrow(RangeError)
    expect(() => server.serve(m, { remote: {} as RemoteSource })).toThrow(TypeError)
    expect(() => server.serve(m, { zero: true }, { recordWorkingSet: 'yes' as never })).toThrow(TypeError)
    expect(() => server.serve(m, { zero: true }, { workingSet: 42 as never })).toThrow(TypeError)
    expect(() => new FaultServer(track(Userfaultfd.open()), { faultAroundMax: 3000 })).toThrow(RangeError)
  })
})

describe.skipIf(missing('qemu-nbd', 'qemu-img'))('FaultServer { nbd } (qemu-nbd, qcow2)', () => {
  for (const compressed of [false, true]) {
    it(`restores from a ${compressed ? 'compressed' : 'sparse'} qcow2 image`, async () => {
      const { file, bytes } = snapshot(6 * MiB)
      // zero MiBs: unallocated clusters in the image
      for (let at = MiB; at < bytes.length; at += 2 * MiB) bytes.fill(0, at, at + MiB)
      fs.writeFileSync(file, bytes)
      const srv = await startQemuNbd(makeQcow2(file, compressed), 'qcow2')
      const { m, server, errors } = setup(bytes.length / PAGE_SIZE)
      server.serve(m, { nbd: srv.url }, { prefetch: true })
      await touchAndCheck(m, bytes)
      await within(server.drained(), 15_000, 'drained')
      expect(Buffer.compare(readAll(m), bytes)).toBe(0)
      expect(errors).toEqual([])
    })
  }
})

describe.skipIf(missing('nginx'))('FaultServer { url } (nginx)', () => {
  it('serves every page right over HTTP ranges', async () => {
    const { bytes, dir } = snapshot(4 * MiB)
    const srv = await startNginx(dir)
    const { m, server, errors } = setup((4 * MiB) / PAGE_SIZE)
    server.serve(m, { url: `${srv.url}/snap.mem`, connections: 4 }, { prefetch: true })
    await touchAndCheck(m, bytes, 3)
    await within(server.drained(), 15_000, 'drained')
    expect(Buffer.compare(readAll(m), bytes)).toBe(0)
    expect(errors).toEqual([])
  })

  it('a second restore of the same snapshot fetches nothing again (file cache, new process state)', async () => {
    const { bytes, dir } = snapshot(4 * MiB)
    const srv = await startNginx(dir)
    const cacheDir = path.join(tempDir(), 'cache')
    const url = `${srv.url}/snap.mem`
    for (const round of [1, 2]) {
      // a new cache object each round: round 2 reads what round 1 left on disk
      const cache = new FileCache(cacheDir, { high: 64 * MiB })
      const remote = await RemoteSource.open(url, { cache })
      const { m, server, errors } = setup(bytes.length / PAGE_SIZE)
      server.serve(m, { remote }, { prefetch: true })
      await touchAndCheck(m, bytes)
      await within(server.drained(), 15_000, 'drained')
      expect(Buffer.compare(readAll(m), bytes)).toBe(0)
      expect(errors).toEqual([])
      server.close()
      const fetched = remote.counters.fetchedPages
      await remote.close()
      await cache.close()
      if (round === 1) expect(fetched).toBeGreaterThanOrEqual(bytes.length / PAGE_SIZE)
      else {
        expect(fetched).toBe(0)
        expect(remote.store.counters.requests).toBe(1) // the probe that pins the ETag
        expect(remote.counters.cachedPages).toBeGreaterThanOrEqual(bytes.length / PAGE_SIZE)
      }
    }
  })
})

describe('FaultServer { paused }', () => {
  it('reads no fault before resume(): ranges registered beforehand are served only once added', async () => {
    const n = 64
    const m = track(Mapping.anonymous(n * PAGE_SIZE))
    const uffd = track(Userfaultfd.open())
    uffd.register(m, { missing: true }) // as Firecracker does, before handing the uffd over
    const server = track(new FaultServer(uffd, { paused: true }))
    const src = Buffer.alloc(n * PAGE_SIZE)
    for (let p = 0; p < n; p++) src.writeBigUInt64LE(BigInt(p + 1), p * PAGE_SIZE)
    const touched = touch([m.address + BigInt(5 * PAGE_SIZE)])
    await new Promise((r) => setTimeout(r, 100))
    expect(server.stats().faults).toBe(0) // not read: it would have been served as zeros
    server.serve(m, { buffer: src }, { register: false })
    server.resume()
    expect((await within(touched, 5000, 'touch')).values[0]).toBe(6n)
    expect(() => new FaultServer(track(Userfaultfd.open()), { paused: 1 as never })).toThrow(TypeError)
  })
})
