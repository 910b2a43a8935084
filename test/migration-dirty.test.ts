// The migration source's dirty-page tracking (the DirtyTracker, 'async' or 'sync'): the choice
// and its refusals, and whole migrations with synchronous write protection (what kernels before
// 6.7 use: the WP faults come from the workload's native threads, the tracker's thread serves
// them).
import { afterEach, describe, expect, it } from 'vitest'
import { Mapping, Userfaultfd } from '../src'
import { Feature } from '../src/core/constants'
import { UnsupportedError } from '../src/core/errors'
import { checkTracking, trackingInputs } from '../src/migration/dirty'
import { MigrationSource } from '../src/migration/source'
import { expectUnsupported, hasFeature } from './helpers/kernel'
import { canPrecopy, migrateHere, SECRET } from './helpers/migration'
import { timeScale } from './helpers/children'

const MiB = 1 << 20
const features = Userfaultfd.probe().features
const maps: Mapping[] = []
afterEach(() => {
  for (const m of maps.splice(0)) m.unmap()
})

describe("dirtyTracking: 'auto' | 'async' | 'sync'", () => {
  it('the choice, for kernels other than this one; a kernel that can track nothing is refused naming the feature', () => {
    const here = trackingInputs()
    const all = {
      ...here,
      features: here.features | Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM,
      pagemapScan: true,
    }
    expect(checkTracking('anonymous', 'auto', all)).toBe('async')
    expect(checkTracking('anonymous', 'sync', all)).toBe('sync')
    // 6.1 on x86_64: write protection, no WP_ASYNC, no PAGEMAP_SCAN.
    const x86 = {
      ...here,
      features: (here.features | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM) & ~Feature.WP_ASYNC,
      pagemapScan: false,
    }
    expect(checkTracking('anonymous', 'auto', x86)).toBe('sync')
    expect(checkTracking('shmem', 'auto', x86)).toBe('sync')
    expect(() => checkTracking('anonymous', 'async', x86)).toThrow(UnsupportedError)
    expect(() => checkTracking('anonymous', 'async', x86)).toThrow(/WP_ASYNC/)
    // 6.1 on arm64: no write protection at all.
    const arm = { ...x86, features: x86.features & ~(Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM) }
    let err: unknown
    try {
      checkTracking('anonymous', 'auto', arm)
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(UnsupportedError)
    expect(err).toMatchObject({ code: 'ENOTSUP', feature: 'PAGEFAULT_FLAG_WP' })
    expect(() =>
      checkTracking('hugetlb', 'sync', { ...x86, features: x86.features & ~Feature.WP_HUGETLBFS_SHMEM }),
    ).toThrow(/WP_HUGETLBFS_SHMEM/)
  })

  it("a bad dirtyTracking is a TypeError; this kernel's refusals come from the constructor, before connecting", () => {
    const m = Mapping.anonymous(MiB)
    maps.push(m)
    const make = (o: object) =>
      new MigrationSource({ ranges: [m], to: '127.0.0.1:1', secret: SECRET, stop: () => {}, ...o })
    expect(() => make({ dirtyTracking: 'fast' })).toThrow(TypeError)
    const asyncHere = hasFeature('WP_ASYNC') && hasFeature('PAGEMAP_SCAN')
    if (asyncHere) make({ dirtyTracking: 'async' }).close()
    else expect(() => make({ dirtyTracking: 'async' })).toThrow(UnsupportedError)
    make({ mode: 'postcopy', dirtyTracking: 'async' }).close() // post-copy tracks nothing
    if (!hasFeature('PAGEFAULT_FLAG_WP')) expectUnsupported(() => make({}), 'PAGEFAULT_FLAG_WP')
  })

  for (const mode of ['precopy', 'hybrid'] as const) {
    for (const kind of ['anonymous', 'shmem'] as const) {
      it(`${mode} migration of ${kind} memory with it: every page equals the source at its stop`, {
        timeout: 60_000 * timeScale,
      }, async () => {
        if (!canPrecopy(kind, mode)) return
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
          writesInStop: 8, // pages dirtied after the last round, whatever the scheduler did
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
