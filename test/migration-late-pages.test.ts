// What a real source never does, done on purpose by a fake one: a page sent again after the
// target's workload wrote it (a late push), and the same page on both channels at once while a
// thread waits for it. The target must keep its own write, drop the copies (counted), and wake
// the waiting thread exactly once, for every kind of memory.
import * as fs from 'node:fs'
import { afterEach, describe, expect, it } from 'vitest'
import { Feature } from '../src/core/constants'
import { hugePageSize, type Mapping } from '../src/core/mapping'
import { Userfaultfd } from '../src/core/userfaultfd'
import { MigrationTarget } from '../src/migration/target'
import type { FrameConn } from '../src/migration/transport'
import { decodeHeader, type Frame, FrameType } from '../src/migration/wire'
import { touch } from '../src/testing'
import { killChildren } from './helpers/children'
import { control, fakeSource, pagesFrame, SECRET, until, unmapAll } from './helpers/migration'
import { timeScale } from './helpers/children'

/** The next REQUEST on a demand channel (on a slow machine a heartbeat may come first). */
async function nextRequest(conn: FrameConn): Promise<Frame> {
  for (;;) {
    const f = await conn.expect([FrameType.REQUEST, FrameType.PING], 5000 * timeScale)
    if (f.type === FrameType.REQUEST) return f
  }
}

afterEach(() => killChildren())

const hugePages = Number(fs.readFileSync('/proc/sys/vm/nr_hugepages', 'utf8'))
const features = Userfaultfd.probe().features

const kinds = [
  { kind: 'anonymous' as const, pageSize: 4096, ok: true, why: '' },
  { kind: 'shmem' as const, pageSize: 4096, ok: (features & Feature.MINOR_SHMEM) !== 0n, why: 'MINOR_SHMEM' },
  {
    kind: 'hugetlb' as const,
    pageSize: hugePageSize(),
    ok: hugePages >= 8 && (features & Feature.MINOR_HUGETLBFS) !== 0n,
    why: `8 reserved huge pages and MINOR_HUGETLBFS (nr_hugepages ${hugePages})`,
  },
]

function page(size: number, fill: number): Buffer {
  return Buffer.alloc(size, fill)
}

describe('late and duplicate pages', () => {
  for (const k of kinds) {
    it(`${k.kind}: a page the target wrote is never overwritten by a late copy; a page sent twice wakes its waiter once`, {
      timeout: 30_000 * timeScale,
    }, async (ctx) => {
      if (!k.ok) ctx.skip(`needs ${k.why}`)
      const ps = k.pageSize
      const target = await MigrationTarget.listen({ secret: SECRET })
      const errors: Error[] = []
      target.on('error', (e) => errors.push(e))
      let resumed = false
      target.on('resume', () => {
        resumed = true
      })
      const fake = await fakeSource(target.address, {
        mode: 'postcopy',
        ranges: [{ length: 4 * ps, pageSize: ps, kind: k.kind }],
      })
      try {
        control(fake.main, { t: 'switchover', toCome: 4 })
        await until(() => resumed, 5000, 'the target to resume')
        const m = target.mappings[0] as Mapping

        // A thread writes page 1: it faults, the request comes on the demand channel.
        const writing = touch([m.address + BigInt(ps)], { write: true, value: 0x1111n })
        const req = await nextRequest(fake.demand)
        expect(req.range).toBe(0)
        expect(req.page).toBe(1n)
        fake.demand.socket.write(pagesFrame(0, 1, page(ps, 0xaa)))
        await writing
        // The late copies: on the main channel (a push) and on the demand channel.
        fake.main.socket.write(pagesFrame(0, 1, page(ps, 0xcc)))
        fake.demand.socket.write(pagesFrame(0, 1, page(ps, 0xcc)))
        await until(() => target.stats().duplicatePages >= 2, 5000, 'the copies to be dropped')
        const got = Buffer.alloc(ps)
        m.read(ps, got)
        expect(got.readBigUInt64LE(0)).toBe(0x1111n) // the thread's write survived
        expect(got.subarray(8).every((b) => b === 0xaa)).toBe(true)

        // Page 2, waited for by a thread, arrives on both channels at once.
        const reading = touch([m.address + 2n * BigInt(ps)])
        await nextRequest(fake.demand)
        const bytes = page(ps, 0x22)
        fake.main.socket.write(pagesFrame(0, 2, bytes))
        fake.demand.socket.write(pagesFrame(0, 2, bytes))
        const { values } = await reading
        expect(values[0]).toBe(0x2222222222222222n)
        await until(() => target.stats().duplicatePages >= 3, 5000, 'the second copy to be dropped')

        // The rest, pushed; a copy of page 2 again after all that changes nothing either.
        fake.main.socket.write(pagesFrame(0, 0, page(ps, 0x01)))
        fake.main.socket.write(pagesFrame(0, 3, page(ps, 0x03)))
        const result = await target.done
        expect(result.duplicatePages).toBe(3)
        expect(result.pushedPages + result.demandPages).toBe(4)
        const all = Buffer.alloc(4 * ps)
        m.read(0, all)
        expect(all[0]).toBe(0x01)
        expect(all[3 * ps]).toBe(0x03)
        expect(all.readBigUInt64LE(ps)).toBe(0x1111n)
        // The target told the source it is done.
        const done = await fake.main
          .expect([FrameType.CONTROL, FrameType.PING], 5000)
          .then(async (f) => (f.type === FrameType.CONTROL ? f : fake.main.expect([FrameType.CONTROL], 5000)))
        expect(JSON.parse(done.payload.toString()).t).toMatch(/resumed|done/)
        expect(errors).toEqual([])
      } finally {
        fake.close()
        target.close()
        unmapAll(target)
      }
    })
  }

  it('frames decode as sent (header layout)', () => {
    const f = pagesFrame(3, 7, Buffer.alloc(4096))
    const h = decodeHeader(f)
    expect(h).toEqual({ type: FrameType.PAGES, flags: 0, range: 3, length: 4096, page: 7n })
  })
})
