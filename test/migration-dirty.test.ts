// The migration source's dirty-page tracking: synchronous write protection (the fallback for
// kernels without WP_ASYNC/PAGEMAP_SCAN, before Linux 6.7) checked against what native writer
// threads actually wrote, and whole migrations that use it. The WP faults come from the
// workload's threads; the tracker's own native thread resolves them.
import { afterEach, describe, expect, it } from 'vitest'
import { Mapping, Userfaultfd } from '../src'
import { native } from '../src/addon/native'
import { Feature } from '../src/core/constants'
import { UffdError, UnsupportedError } from '../src/core/errors'
import { startWorkload } from '../src/cli/migrate/workload'
import { checkTracking, trackWrites } from '../src/migration/dirty'
import { MigrationSource } from '../src/migration/source'
import { migrateHere, SECRET } from './helpers/migration'

const MiB = 1 << 20
const features = Userfaultfd.probe().features
const maps: Mapping[] = []
afterEach(() => {
  for (const m of maps.splice(0)) m.unmap()
})

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms))
}

describe("dirtyTracking 'sync' (write protection)", () => {
  for (const kind of ['anonymous', 'shmem'] as const) {
    it(`${kind}: each collect() reports exactly the pages written since the previous one`, {
      timeout: 30_000,
    }, async () => {
      const m = kind === 'anonymous' ? Mapping.anonymous(4 * MiB) : Mapping.memfd(4 * MiB)
      maps.push(m)
      const pages = m.length / m.pageSize
      const tracker = trackWrites(m, kind, m.pageSize, 'sync')
      expect(tracker.method).toBe('sync')
      // Two writer threads at 16 MiB/s together: each period writes some pages, not all.
      const w = startWorkload(m, m.pageSize, { writeRate: 16 * MiB, writers: 2, tag: 3 })
      try {
        let before: BigUint64Array = new BigUint64Array(pages) // nothing written before the workload started
        let checked = 0
        for (let period = 0; period < 6; period++) {
          await sleep(40)
          expect(w.pause(5000)).toBe(true)
          const after = w.stamps()
          const reported = new Set<number>()
          for (const d of tracker.collect()) {
            for (let p = d.offset / m.pageSize; p < (d.offset + d.length) / m.pageSize; p++) reported.add(p)
          }
          const written = new Set<number>()
          for (let p = 0; p < pages; p++) if (after[p] !== before[p]) written.add(p)
          expect([...reported].sort((a, b) => a - b)).toEqual([...written].sort((a, b) => a - b))
          checked += written.size
          before = after
          w.resume()
        }
        expect(checked).toBeGreaterThan(0)
      } finally {
        w.stop(2000)
        tracker.stop()
      }
      // Stopped: the range is writable without a tracker (nothing blocks).
      m.write(0, Buffer.from('after'))
    })
  }

  it('refusals: a range another userfaultfd registered (EBUSY, nothing leaked), a stopped tracker, bad options', async () => {
    const m = Mapping.anonymous(MiB)
    maps.push(m)
    const other = Userfaultfd.open()
    other.register(m, { missing: true })
    const handles = native.openPollHandles()
    try {
      expect(() => trackWrites(m, 'anonymous', m.pageSize, 'sync')).toThrow(UffdError)
      expect(() => trackWrites(m, 'anonymous', m.pageSize, 'sync')).toThrow(/EBUSY/)
    } finally {
      other.close()
    }
    expect(native.openPollHandles()).toBe(handles)
    const t = trackWrites(m, 'anonymous', m.pageSize, 'sync')
    t.stop()
    expect(() => t.collect()).toThrow(/stopped/)
    expect(
      () =>
        new MigrationSource({
          ranges: [m],
          to: '127.0.0.1:1',
          secret: SECRET,
          stop: () => {},
          dirtyTracking: 'fast' as never,
        }),
    ).toThrow(TypeError)
  })

  it('a kernel that can track nothing is refused up front, naming the feature (facts of an old kernel)', () => {
    // What a 5.6 kernel offers: no PAGEFAULT_FLAG_WP, no WP_HUGETLBFS_SHMEM.
    const old = features & ~(Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM)
    expect(() => checkTracking('anonymous', 'sync', old)).toThrow(UnsupportedError)
    expect(() => checkTracking('anonymous', 'sync', old)).toThrow(/PAGEFAULT_FLAG_WP/)
    expect(() => checkTracking('shmem', 'sync', features & ~Feature.WP_HUGETLBFS_SHMEM)).toThrow(/WP_HUGETLBFS_SHMEM/)
    expect(checkTracking('anonymous', 'sync', features)).toBe('sync')
    // 'auto' picks WP_ASYNC where the kernel has it (6.7+), and refuses 'async' where it does not.
    const asyncHere = (features & Feature.WP_ASYNC) !== 0n
    expect(checkTracking('anonymous', 'auto', features)).toBe(asyncHere ? 'async' : 'sync')
    if (!asyncHere) expect(() => checkTracking('anonymous', 'async', features)).toThrow(/WP_ASYNC/)
  })

  for (const mode of ['precopy', 'hybrid'] as const) {
    for (const kind of ['anonymous', 'shmem'] as const) {
      it(`${mode} migration of ${kind} memory with it: every page equals the source at its stop`, {
        timeout: 60_000,
      }, async () => {
        if (kind === 'shmem' && (features & Feature.MINOR_SHMEM) === 0n) {
          await expect(migrateHere({ mode, kind, size: 4 * MiB })).rejects.toThrow(/MINOR|lacks/)
          return
        }
        const r = await migrateHere({
          mode,
          kind,
          size: 16 * MiB,
          dirtyRate: 16 * MiB,
          source: { dirtyTracking: 'sync', maxDowntime: 1 },
        })
        expect(r.mismatches).toBe(0)
        expect(r.lostStamps).toBe(0)
        expect(r.source.verified).toBe(true)
        expect(r.target.duplicatePages).toBe(0)
        expect(r.source.dirtyAtStop + r.source.precopyPages).toBeGreaterThan(r.source.pagesTotal)
      })
    }
  }
})
