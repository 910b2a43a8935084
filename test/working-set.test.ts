// Working-set record and replay: pages recorded in first-touch order into a versioned file tied
// to the snapshot; replayed first, in order, in batched reads; a file for another snapshot
// version refused. Faults come from native threads (one thread: a fixed touch order).
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { type FaultServer, PAGE_SIZE, RemoteSource, WorkingSet, WorkingSetError } from '../src/index'
import { touch } from '../src/testing'
import { closeAll, setup, until, within } from './helpers/fault-server'
import { missing, startNbdkit, startNginx, stopServers, tempDir } from './helpers/servers'
import { snapshot } from './helpers/snapshots'

afterEach((ctx) => closeAll(ctx))
afterAll(stopServers)

const MiB = 1024 * 1024

/** A fixed pseudo-random subset of `fraction` of `pages` page indices, in a fixed order. */
function subset(pages: number, fraction: number, seed = 7): number[] {
  const all = Array.from({ length: pages }, (_, i) => i)
  let x = seed
  for (let i = all.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) & 0x7fffffff
    const j = x % (i + 1)
    ;[all[i], all[j]] = [all[j], all[i]]
  }
  return all.slice(0, Math.round(pages * fraction))
}

/** Until the feed delivered the whole working set and the engine installed it. */
async function installed(server: FaultServer, pages: number): Promise<void> {
  await until(
    () => {
      const s = server.stats()
      return s.fed.workingSetDelivered === pages && s.providedQueued === 0
    },
    20_000,
    'working set installed',
  )
}

function addresses(base: bigint, list: number[]): BigUint64Array {
  return BigUint64Array.from(list.map((p) => base + BigInt(p * PAGE_SIZE)))
}

describe('working-set file', () => {
  it('round-trips, and refuses damaged, foreign and stale files', () => {
    const identity = { size: 10 * PAGE_SIZE, etag: '"abc"', fingerprint: 'ab'.repeat(32) }
    const ws = WorkingSet.fromTouches(identity, [3 * 4096 + 5, 1 * 4096, 3 * 4096, 9 * 4096, 12 * 4096])
    expect([...ws.pages]).toEqual([3, 1, 9]) // first touch kept, past the end dropped
    const file = path.join(tempDir(), 'ws')
    ws.save(file)
    const back = WorkingSet.load(file)
    expect([...back.pages]).toEqual([3, 1, 9])
    expect(back.identity).toEqual(identity)
    back.check(identity)
    expect(() => back.check({ ...identity, size: 11 * PAGE_SIZE })).toThrow(/stale working set.*size/)
    expect(() => back.check({ ...identity, etag: '"def"' })).toThrow(/ETag/)
    expect(() => back.check({ ...identity, fingerprint: 'cd'.repeat(32) })).toThrow(/fingerprint/)
    const bytes = fs.readFileSync(file)
    bytes[bytes.length - 40] ^= 1
    expect(() => WorkingSet.fromBuffer(bytes)).toThrow(/checksum/)
    expect(() => WorkingSet.fromBuffer(Buffer.from('not a working set at all, really not one at all'))).toThrow(
      WorkingSetError,
    )
    expect(() => WorkingSet.load(path.join(tempDir(), 'none'))).toThrow(/cannot read/)
  })
})

describe('working sets with a { file } source', () => {
  it('records first touches in order and replays them before the faults come', async () => {
    const { file } = snapshot(4 * MiB)
    const n = (4 * MiB) / PAGE_SIZE
    const order = subset(n, 0.1)
    const rec = setup(n)
    rec.server.serve(rec.m, { file }, { recordWorkingSet: true })
    await within(touch(addresses(rec.m.address, order), { threads: 1 }), 10_000, 'touch')
    const ws = await rec.server.workingSet()
    expect([...ws.pages]).toEqual(order)
    const wsFile = path.join(tempDir(), 'ws')
    ws.save(wsFile)

    const play = setup(n)
    play.server.serve(play.m, { file }, { workingSet: wsFile })
    await installed(play.server, order.length)
    const before = play.server.stats().faults
    const { values } = await within(touch(addresses(play.m.address, order), { threads: 1 }), 10_000, 'touch')
    expect(play.server.stats().faults - before).toBe(0)
    // without prefetch, only the working set (and the small gaps read through) came in
    expect(play.server.stats().pagesPresent).toBeLessThan(order.length * 4)
    for (let i = 0; i < order.length; i++) expect(values[i]).toBe(BigInt(order[i] + 1))
    expect(play.errors).toEqual([])
  })

  it('refuses a working set recorded on another version of the snapshot', async () => {
    const { file, bytes } = snapshot(MiB)
    const rec = setup(256)
    rec.server.serve(rec.m, { file }, { recordWorkingSet: true })
    await touch(addresses(rec.m.address, [5, 9]), { threads: 1 })
    const ws = await rec.server.workingSet()
    // the first page (one the fingerprint samples) changed
    bytes[100] ^= 0xff
    fs.writeFileSync(file, bytes)
    const play = setup(256)
    expect(() => play.server.serve(play.m, { file }, { workingSet: ws })).toThrow(WorkingSetError)
    try {
      play.server.serve(play.m, { file }, { workingSet: ws })
    } catch (err) {
      expect((err as WorkingSetError).code).toBe('ESTALE')
    }
    expect(() => rec.server.serve(rec.m, { zero: true }, { workingSet: ws })).toThrow(TypeError)
    expect(() => play.server.serve(play.m, { file }, { workingSet: ws, recordWorkingSet: true })).toThrow(TypeError)
  })
})

describe.skipIf(missing('nbdkit'))('working sets over NBD', () => {
  it('replays in recorded order, in batches, and the touches then fault no more', async () => {
    const { file } = snapshot(96 * MiB)
    const n = (96 * MiB) / PAGE_SIZE
    // every 10th page (10% of the snapshot), shuffled: no two close enough to share a read, so
    // each background read brings exactly one page and the batches can be told apart
    const order = subset(n / 10, 1).map((i) => i * 10)
    expect(order.length).toBeGreaterThan(2048)
    const srv = await startNbdkit(file)
    const rec = setup(n)
    rec.server.serve(rec.m, { nbd: srv.url }, { recordWorkingSet: true })
    await within(touch(addresses(rec.m.address, order), { threads: 1 }), 20_000, 'touch')
    const ws = await rec.server.workingSet()
    expect([...ws.pages]).toEqual(order)
    expect(ws.identity.size).toBe(96 * MiB)

    // replay in JavaScript (test/nbd-prefetch.test.ts has the native replay) through a
    // RemoteSource whose background reads are logged as they are issued
    const remote = await RemoteSource.open(srv.url, { nativeReads: false })
    const reads: number[] = []
    const read = remote.store.read.bind(remote.store)
    remote.store.read = (offset, length, o) => {
      if (!o?.urgent) reads.push(offset)
      return read(offset, length, o)
    }
    const play = setup(n)
    try {
      play.server.serve(play.m, { remote }, { workingSet: ws })
      await installed(play.server, order.length)
      const before = play.server.stats().faults
      await within(touch(addresses(play.m.address, order), { threads: 1 }), 20_000, 'touch')
      expect(play.server.stats().faults - before).toBe(0)
      // one read per page here, issued batch after batch in the recorded order
      expect(reads.length).toBe(order.length)
      const issued = new Map(reads.map((o, i) => [o / PAGE_SIZE, i]))
      for (let k = 0; k < order.length; k++) expect(issued.get(order[k])).toBe(k)
      expect(play.server.stats().fed.workingSetDelivered).toBe(order.length)
      expect(play.errors).toEqual([])
    } finally {
      play.server.close()
      await remote.close()
    }
  })
})

describe.skipIf(missing('nginx'))('working sets over HTTP', () => {
  it('a working set of a replaced object is refused with an error, and demand still serves', async () => {
    const { file, bytes, dir } = snapshot(MiB)
    const srv = await startNginx(dir)
    const url = `${srv.url}/snap.mem`
    const rec = setup(256)
    rec.server.serve(rec.m, { url }, { recordWorkingSet: true })
    await touch(addresses(rec.m.address, [1, 2, 3]), { threads: 1 })
    const ws = await rec.server.workingSet()
    expect(ws.identity.etag).toMatch(/^"/)
    const next = crypto.randomBytes(MiB)
    for (let p = 0; p < 256; p++) next.writeBigUInt64LE(BigInt(p + 1), p * PAGE_SIZE)
    fs.writeFileSync(file, next)
    fs.utimesSync(file, new Date(), new Date(Date.now() + 10_000))
    const play = setup(256)
    play.server.serve(play.m, { url }, { workingSet: ws })
    await until(() => play.errors.length > 0, 10_000, 'stale error')
    expect((play.errors[0] as WorkingSetError).code).toBe('ESTALE')
    const { values } = await within(touch(addresses(play.m.address, [7]), { threads: 1 }), 10_000, 'touch')
    expect(values[0]).toBe(8n)
    expect(bytes.length).toBe(MiB)
  })
})
