// Many clones, one page cache: guest processes that map the same memfd (handed to them as an fd,
// as a VMM's children get their memory), each with its own uffd sent here by fd passing. One
// FaultServer per uffd, all in MINOR mode over the one file: a page is filled once, and every
// other clone's fault on it is resolved by UFFDIO_CONTINUE alone, with no copy.
import * as fs from 'node:fs'
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, type FaultServerError, Mapping, PAGE_SIZE, hugePageSize } from '../src/index'
import { killChildren } from './helpers/children'
import { closeAll, randomContent, track, until } from './helpers/fault-server'
import { type Guest, guestValues, startGuest } from './helpers/guest'
import { hugePagesMissing } from './helpers/uffd'
import { timeScale } from './helpers/children'

afterEach((ctx) => {
  killChildren()
  closeAll(ctx)
})

async function clones(
  n: number,
  memfd: Mapping,
  content: Uint8Array,
  options: { faultAround?: number } = {},
): Promise<Array<{ guest: Guest; server: FaultServer; errors: FaultServerError[] }>> {
  const out = []
  for (let i = 0; i < n; i++) {
    const guest = await startGuest({ memfd: memfd.fd, pageSize: memfd.pageSize })
    track(guest.uffd)
    expect(guest.length).toBe(memfd.length)
    const server = track(new FaultServer(guest.uffd, { faultAround: options.faultAround ?? PAGE_SIZE }))
    const errors: FaultServerError[] = []
    server.on('error', (e) => errors.push(e))
    // The clone's memory is in its own address space: a plain range, and the file it maps.
    server.serve(
      { address: guest.address, length: guest.length },
      { buffer: content },
      { mode: 'minor', backing: memfd, pageSize: memfd.pageSize },
    )
    out.push({ guest, server, errors })
  }
  return out
}

function firstU64s(content: Uint8Array, pageSize: number, pages: number[]): bigint[] {
  const view = new DataView(content.buffer, content.byteOffset)
  return pages.map((p) => view.getBigUint64(p * pageSize, true))
}

describe('clones of one memfd, each with its own uffd and FaultServer', () => {
  it('the first clone fills the page cache; the others only CONTINUE', { timeout: 30_000 * timeScale }, async () => {
    const N = 64
    const memfd = track(Mapping.memfd(N * PAGE_SIZE))
    const content = randomContent(N * PAGE_SIZE)
    const all = await clones(3, memfd, content)
    const touched = Array.from({ length: N }, (_, p) => (p * 37) % N)
    // The first clone alone: every page comes from the source, once.
    await all[0].guest.go(touched)
    expect(guestValues(await all[0].guest.result)).toEqual(firstU64s(content, PAGE_SIZE, touched))
    expect(all[0].server.stats().cachedPages).toBe(N)
    // The others together: no page is filled again.
    await Promise.all(all.slice(1).map((c) => c.guest.go(touched)))
    for (const c of all.slice(1)) {
      const r = await c.guest.result
      expect(r.code, r.stderr).toBe(0)
      expect(guestValues(r)).toEqual(firstU64s(content, PAGE_SIZE, touched))
      await until(() => c.server.stats().pagesPresent === N, 5000, 'pages counted')
      const st = c.server.stats()
      expect(st.cachedPages).toBe(0)
      // Their faults are MINOR: no source stage at all, only the CONTINUE.
      expect(st.ranges[0].stages.source.max).toBe(0)
      expect(st.ranges[0].faults).toBeGreaterThanOrEqual(N)
      expect(c.errors).toEqual([])
    }
    // One copy of the bytes in memory: the memfd's.
    expect(fs.fstatSync(memfd.fd).blocks * 512).toBe(N * PAGE_SIZE)
  })

  it('clones faulting at the same time on the same pages: each page filled once', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const N = 128
    const memfd = track(Mapping.memfd(N * PAGE_SIZE))
    const content = randomContent(N * PAGE_SIZE)
    const all = await clones(3, memfd, content, { faultAround: 16 * 1024 })
    const touched = Array.from({ length: N }, (_, p) => p)
    await Promise.all(all.map((c) => c.guest.go(touched)))
    for (const c of all) expect(guestValues(await c.guest.result)).toEqual(firstU64s(content, PAGE_SIZE, touched))
    for (const c of all) await until(() => c.server.stats().pagesPresent === N, 5000, 'pages counted')
    const filled = all.reduce((n, c) => n + c.server.stats().cachedPages, 0)
    expect(filled).toBe(N) // whoever came first filled it; the writer's EEXIST kept the rest out
    expect(all.flatMap((c) => c.errors)).toEqual([])
  })

  it('hugetlbfs: clones of a MFD_HUGETLB memfd, 2 MiB pages', { timeout: 30_000 * timeScale }, async (ctx) => {
    const why = hugePagesMissing()
    if (why !== undefined) ctx.skip(why)
    const H = hugePageSize()
    const n = 3
    const memfd = track(Mapping.memfd(n * H, { hugetlb: true }))
    const content = randomContent(n * H)
    const all = await clones(2, memfd, content)
    const touched = [2, 0, 1]
    for (const c of all) {
      await c.guest.go(touched)
      expect(guestValues(await c.guest.result)).toEqual(firstU64s(content, H, touched))
    }
    expect(all[0].server.stats().cachedPages).toBe(n)
    await until(() => all[1].server.stats().pagesPresent === n, 5000, 'pages counted')
    expect(all[1].server.stats().cachedPages).toBe(0)
  })
})
