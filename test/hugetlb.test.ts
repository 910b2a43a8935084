// The ioctls on 2 MiB huge pages: MAP_HUGETLB anonymous memory and MFD_HUGETLB memfds.
// Needs reserved huge pages (.ci/run: echo 64 > /proc/sys/vm/nr_hugepages). Only when none are
// reserved do these tests skip, and they say why.
import { beforeEach, describe, expect, it } from 'vitest'
import { Feature, IoctlBit, Mapping, Userfaultfd, hugePageSize } from '../src/index'
import { madviseOnThread, touch } from '../src/testing'
import { stampedPage } from './helpers/events'
import { expectUffdError, hugePagesMissing, settlesWithin, useCleanup, waitEvents } from './helpers/uffd'
import { expectUnsupported, hasFeature, withFeature } from './helpers/kernel'
import { timeScale } from './helpers/children'

const track = useCleanup()
const H = hugePageSize()
const HB = BigInt(H)

beforeEach((ctx) => {
  const why = hugePagesMissing()
  if (why !== undefined) {
    console.warn(`hugetlb test skipped: ${why}`)
    ctx.skip(why)
  }
})

const hugeAnon = (pages: number, populate = false): Mapping =>
  track(Mapping.anonymous(pages * H, { hugetlb: true, populate }))

describe('MAP_HUGETLB anonymous memory', () => {
  it('is a 2 MiB-page mapping; register allows WAKE, COPY, POISON (no ZEROPAGE, no MOVE)', () => {
    expect(H).toBe(2 * 1024 * 1024)
    const uffd = track(Userfaultfd.open({ features: Feature.MISSING_HUGETLBFS }))
    const m = hugeAnon(1)
    expect(m).toMatchObject({ hugetlb: true, pageSize: H, length: H })
    expect(m.address % HB).toBe(0n)
    const base = IoctlBit.WAKE | IoctlBit.COPY | (hasFeature('POISON') ? IoctlBit.POISON : 0n) // POISON: 6.6+
    expect(uffd.register(m)).toBe(base)
    const all = { missing: true, wp: true, minor: true }
    if (!withFeature('PAGEFAULT_FLAG_WP', () => uffd.register(m, all))) return
    expect(uffd.register(m, all)).toBe(base | IoctlBit.WRITEPROTECT | IoctlBit.CONTINUE)
  })

  it('lengths must be whole huge pages', () => {
    expect(() => Mapping.anonymous(4096, { hugetlb: true })).toThrow(/not a multiple of the page size \(2097152\)/)
    expect(() => Mapping.memfd(H + 4096, { hugetlb: true })).toThrow(RangeError)
  })

  it('copy() resolves a fault with a whole huge page, then EEXIST', { timeout: 10_000 * timeScale }, async () => {
    const uffd = track(Userfaultfd.open())
    const m = hugeAnon(1)
    uffd.register(m)
    const reader = touch([m.address + 4096n * 5n])
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', write: false })
    const at = (e as { address: bigint }).address
    expect(at >= m.address && at < m.address + HB).toBe(true)
    const page = new BigUint64Array(H / 8)
    page[(4096 * 5) / 8] = 0x2bn
    expect(uffd.copy(m, page)).toBe(H)
    expect((await reader).values[0]).toBe(0x2bn)
    expectUffdError(() => uffd.copy(m, page), 'EEXIST', { syscall: 'ioctl(UFFDIO_COPY)' })
  })

  it('partial progress over two huge pages: EAGAIN with bytes = one huge page', () => {
    const uffd = track(Userfaultfd.open())
    const m = hugeAnon(2)
    uffd.register(m)
    uffd.copy(m.address + HB, new Uint8Array(H))
    expectUffdError(() => uffd.copy(m, new Uint8Array(2 * H)), 'EAGAIN', { bytes: H })
  })

  it('EINVAL: ZEROPAGE, MOVE (UnsupportedError before 6.8), and a copy smaller than a huge page', () => {
    const uffd = track(Userfaultfd.open())
    const m = hugeAnon(1)
    uffd.register(m)
    expectUffdError(() => uffd.zeropage(m), 'EINVAL', { syscall: 'ioctl(UFFDIO_ZEROPAGE)' })
    const src = track(Mapping.anonymous(4096))
    src.write(0, new Uint8Array(4096).fill(1))
    if (hasFeature('MOVE'))
      expectUffdError(() => uffd.move(m.address, src, 4096), 'EINVAL', { syscall: 'ioctl(UFFDIO_MOVE)' })
    else expectUnsupported(() => uffd.move(m.address, src, 4096), 'MOVE')
    expectUffdError(() => uffd.copy(m.address, new Uint8Array(4096)), 'EINVAL', { syscall: 'ioctl(UFFDIO_COPY)' })
  })

  it('given the Mapping itself, the API checks huge-page alignment before the kernel does', () => {
    const uffd = track(Userfaultfd.open())
    const m = hugeAnon(2)
    uffd.register(m)
    expect(() => uffd.copy(m, new Uint8Array(4096))).toThrow(
      /copy: length 4096 is not a multiple of the page size \(2097152\)/,
    )
    expect(() => uffd.move(m, 0x200000n, 4096)).toThrow(
      /move dst: length 4096 is not a multiple of the page size \(2097152\)/,
    )
    expect(() => m.range(4096, H)).toThrow(/range: address .* is not aligned to the page size \(2097152\)/)
    // A plain { address, length } is checked against the base page size only: the kernel decides.
    expectUffdError(() => uffd.register({ address: m.address, length: 4096 }), 'EINVAL', {
      syscall: 'ioctl(UFFDIO_REGISTER)',
    })
  })

  it('WRITEPROTECT: a write to a protected huge page is a WP fault; unprotecting resolves it', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const open = (): Userfaultfd =>
      track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM }))
    if (!withFeature(['PAGEFAULT_FLAG_WP', 'WP_HUGETLBFS_SHMEM'], open)) return
    const uffd = open()
    const m = hugeAnon(1, true)
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    const writer = touch([m.address + 64n], { write: true, value: 9n })
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', wp: true, write: true })
    expect(await settlesWithin(writer, 50)).toBe(false)
    uffd.writeProtect(m, { protect: false })
    await writer
    expect(new BigUint64Array(m.buffer, 64, 1)[0]).toBe(9n)
  })

  it('POISON marks a whole huge page, then EEXIST', () => {
    const open = (): Userfaultfd => track(Userfaultfd.open({ features: Feature.POISON }))
    if (!withFeature('POISON', open)) return
    const uffd = open()
    const m = hugeAnon(1)
    uffd.register(m)
    expect(uffd.poison(m)).toBe(H)
    expectUffdError(() => uffd.poison(m), 'EEXIST', { syscall: 'ioctl(UFFDIO_POISON)' })
  })

  it('EAGAIN with bytes: 0 while a REMOVE event (MADV_DONTNEED of a huge page) is unread', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.EVENT_REMOVE }))
    const m = hugeAnon(2, true)
    uffd.register(m)
    const advised = madviseOnThread(m.range(0, H), 'dontneed')
    expect(await settlesWithin(advised, 100)).toBe(false)
    expectUffdError(() => uffd.copy(m, new Uint8Array(H)), 'EAGAIN', { bytes: 0 })
    expect(await waitEvents(uffd)).toEqual([{ type: 'remove', start: m.address, end: m.address + HB }])
    expect(await advised).toBe(0)
    expect(uffd.copy(m, new Uint8Array(H))).toBe(H)
  })
})

describe('MFD_HUGETLB memfd', () => {
  it('MISSING: copy() fills the file, seen through an alias', { timeout: 10_000 * timeScale }, async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.MISSING_HUGETLBFS }))
    const m = track(Mapping.memfd(H, { hugetlb: true, name: 'huge' }))
    expect(m).toMatchObject({ hugetlb: true, pageSize: H })
    uffd.register(m)
    const reader = touch([m.address])
    await waitEvents(uffd)
    expect(uffd.copy(m, stampedPage(17n, H))).toBe(H)
    expect((await reader).values[0]).toBe(17n)
    const alias = track(m.alias())
    expect(alias.hugetlb).toBe(true)
    expect(new BigUint64Array(alias.buffer, 0, 1)[0]).toBe(17n)
  })

  it('MINOR + continue() through an alias', { timeout: 10_000 * timeScale }, async () => {
    const uffd = track(Userfaultfd.open({ features: Feature.MINOR_HUGETLBFS }))
    const m = track(Mapping.memfd(H, { hugetlb: true }))
    const alias = track(m.alias())
    alias.write(8, stampedPage(31n, 8))
    uffd.register(m, { minor: true })
    const reader = touch([m.address + 8n])
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', minor: true, wp: false })
    expect(uffd.continue(m)).toBe(H)
    expect((await reader).values[0]).toBe(31n)
    expectUffdError(() => uffd.continue(m), 'EEXIST', { syscall: 'ioctl(UFFDIO_CONTINUE)' })
  })
})
