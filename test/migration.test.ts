// Migrations in one process over loopback: every mode and memory kind, with a writer on the
// source until its stop and a writer and a reader on the target from its resume (native threads),
// checked page by page against the source at its stop. Two hosts (two processes, two network
// namespaces) are in migration-netns.test.ts.
import { afterEach, describe, expect, it } from 'vitest'
import { hugePageSize } from '../src/core/mapping'
import { MigrationSource } from '../src/migration/source'
import { MigrationTarget } from '../src/migration/target'
import { Mapping, Userfaultfd } from '../src'
import { Feature } from '../src/core/constants'
import { killChildren } from './helpers/children'
import { hasFeature } from '../src/core/kernel-features'
import { canPrecopy, migrateHere, SECRET, unmapAll } from './helpers/migration'
import * as fs from 'node:fs'
import { timeScale } from './helpers/children'
import { env } from './helpers/env'

afterEach(() => killChildren())

const MiB = 1 << 20
const hugePages = Number(fs.readFileSync('/proc/sys/vm/nr_hugepages', 'utf8'))
const features = Userfaultfd.probe().features

describe('migration over loopback', () => {
  for (const mode of ['hybrid', 'postcopy', 'precopy'] as const) {
    it(`${mode}, anonymous memory, writers on both sides: every page equals the source at its stop`, {
      timeout: 60_000 * timeScale,
    }, async () => {
      if (!canPrecopy('anonymous', mode)) return
      const r = await migrateHere({ mode, kind: 'anonymous', size: 16 * MiB, dirtyRate: 8 * MiB })
      expect(r.mismatches).toBe(0)
      expect(r.lostStamps).toBe(0)
      expect(r.source.verified).toBe(true)
      expect(r.target.verified).toBe(true)
      expect(r.target.duplicatePages).toBe(0)
      // In post-copy every page still to come is sent exactly once, on demand or pushed.
      if (mode !== 'precopy') {
        const toCome = mode === 'postcopy' ? r.source.pagesTotal : r.source.dirtyAtStop
        expect(r.source.pushedPages + r.source.demandPages).toBe(toCome)
        expect(r.target.pushedPages + r.target.demandPages).toBe(toCome)
      } else {
        expect(r.source.pushedPages + r.source.demandPages).toBe(0)
        expect(r.source.postcopyMs).toBeLessThan(1000)
      }
      if (mode === 'postcopy') {
        expect(r.source.precopyPages).toBe(0)
        expect(r.source.wireBytes / r.source.bytes).toBeLessThan(1.05)
      }
      expect(r.source.mode).toBe(mode)
    })
  }

  it('hybrid: the dirty set of the round that converged is sent in one more round before the stop', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if (!canPrecopy('anonymous', 'hybrid')) return
    const r = await migrateHere({ mode: 'hybrid', kind: 'anonymous', size: 16 * MiB, dirtyRate: 16 * MiB })
    expect(r.mismatches).toBe(0)
    expect(r.source.verified).toBe(true)
    // The first round whose dirty set would fit in maxDowntime (20 ms): if it left pages dirty,
    // exactly one round follows it and sends them; the stop lists only what came after.
    const at = r.rounds.findIndex((x) => x.dirtyPages === 0 || x.estimatedMs <= 20)
    expect(at).toBeGreaterThanOrEqual(0)
    const converged = r.rounds[at]
    if (converged.dirtyPages > 0) {
      expect(r.rounds.length).toBe(at + 2)
      expect(r.rounds[at + 1].pages).toBe(converged.dirtyPages)
    } else {
      expect(r.rounds.length).toBe(at + 1)
    }
    expect(r.source.rounds).toBe(r.rounds.length)
  })

  it('shmem (memfd) memory: pages go into the page cache through an alias, faults need only CONTINUE', {
    timeout: 60_000 * timeScale,
  }, async () => {
    if ((features & Feature.MINOR_SHMEM) === 0n) {
      await expect(migrateHere({ mode: 'hybrid', kind: 'shmem', size: 4 * MiB })).rejects.toThrow(/MINOR|lacks/)
      return
    }
    for (const mode of ['hybrid', 'postcopy'] as const) {
      if (!canPrecopy('shmem', mode)) continue
      const r = await migrateHere({ mode, kind: 'shmem', size: 16 * MiB, dirtyRate: 8 * MiB })
      expect(r.mismatches).toBe(0)
      expect(r.lostStamps).toBe(0)
      expect(r.target.duplicatePages).toBe(0)
    }
  })

  it('hugetlbfs memory (2 MiB pages)', { timeout: 60_000 * timeScale }, async (ctx) => {
    if (hugePages < 16) ctx.skip(`needs 16 reserved huge pages (nr_hugepages is ${hugePages})`)
    const size = 8 * hugePageSize()
    for (const mode of ['hybrid', 'postcopy'] as const) {
      if (!canPrecopy('hugetlb', mode)) continue
      const r = await migrateHere({ mode, kind: 'hugetlb', size, dirtyRate: 64 * MiB })
      expect(r.mismatches).toBe(0)
      expect(r.lostStamps).toBe(0)
      expect(r.target.duplicatePages).toBe(0)
      expect(r.source.pagesTotal).toBe(8)
    }
  })

  for (const priority of [undefined, 'latency', 'throughput'] as const) {
    it(`postcopyPriority ${priority ?? 'by default (latency)'}: the demand path's threads SCHED_FIFO and the push's nice -10 where permitted, or neither`, {
      timeout: 60_000 * timeScale,
    }, async () => {
      // The push held to 32 MiB/s so that post-copy lasts long enough to watch the threads.
      const r = await migrateHere({
        mode: 'postcopy',
        kind: 'anonymous',
        size: 16 * MiB,
        dirtyRate: 8 * MiB,
        watchThreads: true,
        source: { postcopyPriority: priority, postcopyBandwidth: 32 * MiB },
      })
      expect(r.mismatches).toBe(0)
      expect(r.lostStamps).toBe(0)
      expect(r.source.pushedPages + r.source.demandPages).toBe(r.source.pagesTotal)
      const threads = r.postcopyThreads
      if (priority === 'throughput' || !env.capSysNice) {
        // Without CAP_SYS_NICE 'latency' keeps only its socket buffers (and still migrates).
        expect(threads).toEqual({ fifo: 0, niced: 0, lowestNice: 0 })
      } else {
        // The source's demand thread, the target's demand reader (and the engine's thread once
        // a fault came); the pusher and the target's main-channel reader.
        expect(threads?.fifo).toBeGreaterThanOrEqual(2)
        expect(threads?.niced).toBe(2)
        expect(threads?.lowestNice).toBe(-10)
      }
    })
  }

  it('the connection is cut in post-copy: faulting threads wait, the source reconnects, nothing lost or sent twice', {
    timeout: 60_000 * timeScale,
  }, async () => {
    // Both TCP connections reset by a relay 30 ms into post-copy (the push held to 32 MiB/s so
    // that post-copy lasts); the two-host version (the veth taken down) is in migration-netns.
    const r = await migrateHere({
      mode: 'postcopy',
      kind: 'anonymous',
      size: 16 * MiB,
      dirtyRate: 8 * MiB,
      cutInPostcopyMs: 30,
      source: { postcopyBandwidth: 32 * MiB, heartbeatTimeoutMs: 500 },
    })
    expect(r.cut).toBe(2)
    expect(r.source.reconnects).toBeGreaterThanOrEqual(1)
    expect(r.target.reconnects).toBeGreaterThanOrEqual(1)
    expect(r.mismatches).toBe(0)
    expect(r.lostStamps).toBe(0)
    expect(r.source.verified).toBe(true)
    // Every page arrived once: what was in flight when the connection broke is sent again
    // (resentPages), and the target never received a page twice.
    expect(r.target.duplicatePages).toBe(0)
    expect(r.target.pushedPages + r.target.demandPages).toBe(r.source.pagesTotal)
  })

  it('no lost wake-up: many threads fault on missing pages while the push runs', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const r = await migrateHere({
      mode: 'postcopy',
      kind: 'anonymous',
      size: 32 * MiB,
      targetReaders: 6,
      dirtyRate: 4 * MiB,
    })
    expect(r.mismatches).toBe(0)
    expect(r.target.faults).toBeGreaterThan(0)
    expect(r.target.demandPages).toBeGreaterThan(0)
  })

  it('the stop hook runs once, after the pre-copy rounds; a failed stop hook fails the migration and resumes', {
    timeout: 30_000 * timeScale,
  }, async (ctx) => {
    if (!canPrecopy('anonymous', 'hybrid')) ctx.skip('pre-copy refused as asserted: no write protection on this kernel')
    const memory = Mapping.anonymous(4 * MiB)
    const target = await MigrationTarget.listen({ secret: SECRET })
    target.on('error', () => {})
    let resumed = 0
    const source = new MigrationSource({
      ranges: [memory],
      to: target.address,
      secret: SECRET,
      stop: () => {
        throw new Error('cannot pause')
      },
      resume: () => {
        resumed++
      },
    })
    await expect(source.start()).rejects.toThrow(/cannot pause/)
    expect(resumed).toBe(1)
    source.close()
    target.close()
    unmapAll(target)
    memory.unmap()
  })
})

describe('MigrationSource / MigrationTarget input', () => {
  it('refuses bad options with TypeError/RangeError', async () => {
    const m = Mapping.anonymous(65536)
    // Pre-copy (the default, hybrid) needs write protection: where the kernel has none, post-copy.
    const mode = hasFeature('PAGEFAULT_FLAG_WP') ? ('hybrid' as const) : ('postcopy' as const)
    const base = { ranges: [m], to: '127.0.0.1:1', secret: SECRET, stop: () => {}, mode }
    expect(() => new MigrationSource({ ...base, ranges: [] })).toThrow(TypeError)
    expect(() => new MigrationSource({ ...base, to: 'nowhere' })).toThrow(TypeError)
    expect(() => new MigrationSource({ ...base, mode: 'sideways' as never })).toThrow(TypeError)
    expect(() => new MigrationSource({ ...base, stop: undefined as never })).toThrow(TypeError)
    expect(() => new MigrationSource({ ...base, maxDowntime: -1 })).toThrow(RangeError)
    expect(() => new MigrationSource({ ...base, postcopyPriority: 'fast' as never })).toThrow(TypeError)
    expect(() => new MigrationSource({ ...base, secret: 'short' })).toThrow(RangeError)
    expect(() => new MigrationSource({ ...base, ranges: [{ address: 4097n, length: 4096 }] })).toThrow(RangeError)
    const env = process.env.USERFAULTFD_MIGRATE_SECRET
    delete process.env.USERFAULTFD_MIGRATE_SECRET
    try {
      expect(() => new MigrationSource({ ...base, secret: undefined })).toThrow(/secret is required/)
      await expect(MigrationTarget.listen({})).rejects.toThrow(/secret is required/)
      process.env.USERFAULTFD_MIGRATE_SECRET = SECRET
      expect(() => new MigrationSource({ ...base, secret: undefined })).not.toThrow()
    } finally {
      if (env === undefined) delete process.env.USERFAULTFD_MIGRATE_SECRET
      else process.env.USERFAULTFD_MIGRATE_SECRET = env
    }
    await expect(MigrationTarget.listen({ secret: SECRET, onSourceLoss: 'drop' as never })).rejects.toThrow(TypeError)
    await expect(MigrationTarget.listen({ secret: SECRET, listen: '127.0.0.1:99999' })).rejects.toThrow(RangeError)
    m.unmap()
  })

  it("onSourceLoss 'poison' on a kernel without UFFDIO_POISON is refused up front", async () => {
    if ((features & Feature.POISON) !== 0n) {
      const t = await MigrationTarget.listen({ secret: SECRET, onSourceLoss: 'poison' })
      t.close()
      return
    }
    await expect(MigrationTarget.listen({ secret: SECRET, onSourceLoss: 'poison' })).rejects.toThrow(/POISON/)
  })
})
