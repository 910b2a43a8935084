// MINOR faults + UFFDIO_CONTINUE on shmem (through an alias), UFFDIO_WRITEPROTECT and WP faults
// on anonymous memory (with and without WP_UNPOPULATED), COPY/CONTINUE with WP, and UFFDIO_WAKE.
// Every fault comes from a native thread.
import { describe, expect, it } from 'vitest'
import { Feature, Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { touch } from '../src/testing'
import { stampedPage } from './helpers/events'
import { expectUffdError, settlesWithin, useCleanup, waitEvents } from './helpers/uffd'
import { withFeature } from './helpers/kernel'
import { timeScale } from './helpers/children'

const track = useCleanup()
// Write protection: 5.7 on x86_64, 6.10 on arm64 (Debian 12's arm64 6.1 has none of it).
const hasWp = (): boolean =>
  withFeature('PAGEFAULT_FLAG_WP', () => track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP })))

function minorSetup(pages: number, features = 0n): { uffd: Userfaultfd; m: Mapping; alias: Mapping } {
  const uffd = track(Userfaultfd.open({ features: Feature.MINOR_SHMEM | features }))
  const m = track(Mapping.memfd(pages * PAGE_SIZE))
  const alias = track(m.alias())
  return { uffd, m, alias }
}

describe('MINOR + continue() on shmem', () => {
  it('a read of a page present in the page cache raises a MINOR fault; continue() maps it', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const { uffd, m, alias } = minorSetup(2)
    alias.write(PAGE_SIZE, stampedPage(777n)) // in the page cache; m has no PTE for it yet
    uffd.register(m, { minor: true })
    const reader = touch([m.at(PAGE_SIZE)])
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', minor: true, wp: false, write: false, address: m.at(PAGE_SIZE) })
    expect(uffd.continue(m.range(PAGE_SIZE, PAGE_SIZE))).toBe(PAGE_SIZE)
    expect((await reader).values[0]).toBe(777n)
    // Mapped now: a second continue is EEXIST.
    expectUffdError(() => uffd.continue(m.range(PAGE_SIZE, PAGE_SIZE)), 'EEXIST', { syscall: 'ioctl(UFFDIO_CONTINUE)' })
  })

  it('the handler may change the page through the alias before continuing', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const { uffd, m, alias } = minorSetup(1)
    alias.write(0, stampedPage(1n))
    uffd.register(m, { minor: true })
    const writer = touch([m.address + 8n], { write: true, value: 50n })
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ minor: true, write: true })
    alias.write(0, stampedPage(2n))
    uffd.continue(m)
    await writer
    const out = new BigUint64Array(alias.buffer, 0, 2)
    expect([out[0], out[1]]).toEqual([2n, 50n])
  })

  it('wake: false leaves the faulter asleep until wake()', { timeout: 10_000 * timeScale }, async () => {
    const { uffd, m, alias } = minorSetup(1)
    alias.write(0, stampedPage(9n))
    uffd.register(m, { minor: true })
    const reader = touch([m.address])
    await waitEvents(uffd)
    expect(uffd.continue(m, { wake: false })).toBe(PAGE_SIZE)
    expect(await settlesWithin(reader, 150)).toBe(false)
    uffd.wake(m)
    expect((await reader).values[0]).toBe(9n)
  })

  it('wp: true maps the page write-protected: a later write raises a WP fault', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const features = Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM
    if (!withFeature(['PAGEFAULT_FLAG_WP', 'WP_HUGETLBFS_SHMEM'], () => minorSetup(1, features))) return
    const { uffd, m, alias } = minorSetup(1, features)
    alias.write(0, stampedPage(3n))
    uffd.register(m, { minor: true, wp: true })
    const reader = touch([m.address])
    await waitEvents(uffd)
    // UFFDIO_CONTINUE_MODE_WP came in 6.4: before, refused by name (the fault still needs resolving).
    if (!withFeature('CONTINUE_MODE_WP', () => uffd.continue(m, { wp: true }))) {
      uffd.continue(m)
      expect((await reader).values[0]).toBe(3n)
      return
    }
    uffd.continue(m, { wp: true })
    expect((await reader).values[0]).toBe(3n)
    const writer = touch([m.address + 8n], { write: true, value: 4n })
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', wp: true, write: true, minor: false })
    uffd.writeProtect(m, { protect: false })
    await writer
    expect(new BigUint64Array(alias.buffer, 8, 1)[0]).toBe(4n)
  })

  it('errors: a page absent from the page cache is EFAULT; anonymous memory is EINVAL', () => {
    const { uffd, m } = minorSetup(2)
    uffd.register(m, { minor: true })
    expectUffdError(() => uffd.continue(m.range(PAGE_SIZE, PAGE_SIZE)), 'EFAULT', { syscall: 'ioctl(UFFDIO_CONTINUE)' })
    const missingOnly = track(Mapping.memfd(PAGE_SIZE))
    track(missingOnly.alias()).write(0, stampedPage(1n)) // in the page cache, no PTE in missingOnly
    uffd.register(missingOnly, { missing: true })
    // The kernel checks the memory type, not the registration mode: shmem registered MISSING
    // accepts CONTINUE (6.18).
    expect(uffd.continue(missingOnly)).toBe(PAGE_SIZE)
    const anon = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(anon)
    expectUffdError(() => uffd.continue(anon), 'EINVAL')
  })
})

describe('writeProtect() and WP faults on anonymous memory', () => {
  function wpSetup(pages: number, features = 0n): { uffd: Userfaultfd; m: Mapping } {
    const uffd = track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP | features }))
    const m = track(Mapping.anonymous(pages * PAGE_SIZE, { populate: true }))
    return { uffd, m }
  }

  it('writes fault (wp + write), reads do not; unprotecting resolves the write', {
    timeout: 10_000 * timeScale,
  }, async () => {
    if (!hasWp()) return
    const { uffd, m } = wpSetup(2)
    m.write(0, stampedPage(11n))
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    expect((await touch([m.address])).values[0]).toBe(11n) // a read is no fault
    const writer = touch([m.at(PAGE_SIZE) + 8n], { write: true, value: 12n })
    const [e] = await waitEvents(uffd)
    // Without Feature.EXACT_ADDRESS the kernel reports the page's address.
    expect(e).toMatchObject({ type: 'pagefault', wp: true, write: true, minor: false, address: m.at(PAGE_SIZE) })
    // Unprotecting another page does not help the writer.
    uffd.writeProtect(m.range(0, PAGE_SIZE), { protect: false })
    expect(await settlesWithin(writer, 100)).toBe(false)
    uffd.writeProtect(m.range(PAGE_SIZE, PAGE_SIZE), { protect: false })
    await writer
    expect(new BigUint64Array(m.buffer, PAGE_SIZE + 8, 1)[0]).toBe(12n)
    // Unprotected for good: the JS thread can write now.
    new Uint8Array(m.buffer)[PAGE_SIZE] = 1
  })

  it('unprotect with wake: false leaves the writer asleep until wake()', { timeout: 10_000 * timeScale }, async () => {
    if (!hasWp()) return
    const { uffd, m } = wpSetup(1)
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    const writer = touch([m.address], { write: true, value: 1n })
    await waitEvents(uffd)
    uffd.writeProtect(m, { protect: false, wake: false })
    expect(await settlesWithin(writer, 150)).toBe(false)
    uffd.wake(m)
    await writer
  })

  it('protect with wake: false is EINVAL (the kernel refuses WP|DONTWAKE), with a hint', () => {
    if (!hasWp()) return
    const { uffd, m } = wpSetup(1)
    uffd.register(m, { wp: true })
    const err = expectUffdError(() => uffd.writeProtect(m, { wake: false }), 'EINVAL', {
      syscall: 'ioctl(UFFDIO_WRITEPROTECT)',
    })
    expect(err.hint).toMatch(/only valid when unprotecting/)
  })

  it('a range not registered for WP is ENOENT, with a hint (UnsupportedError without WP)', () => {
    const m = track(Mapping.anonymous(PAGE_SIZE))
    const plain = track(Userfaultfd.open())
    plain.register(m, { missing: true })
    if (!withFeature('PAGEFAULT_FLAG_WP', () => plain.writeProtect(m))) return
    plain.unregister(m)
    const { uffd } = wpSetup(1)
    uffd.register(m, { missing: true })
    const err = expectUffdError(() => uffd.writeProtect(m), 'ENOENT')
    expect(err.hint).toMatch(/registered with \{ wp: true \}/)
  })

  it('without WP_UNPOPULATED, empty PTEs are skipped: a write there does not fault', {
    timeout: 10_000 * timeScale,
  }, async () => {
    if (!hasWp()) return
    const uffd = track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP }))
    const m = track(Mapping.anonymous(PAGE_SIZE)) // not populated
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    await touch([m.address], { write: true, value: 1n })
    expect(uffd.read()).toEqual([])
  })

  it('with WP_UNPOPULATED, a write to a never-touched protected page faults', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const open = (): Userfaultfd =>
      track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED }))
    if (!withFeature('WP_UNPOPULATED', open)) return
    const uffd = open()
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    const writer = touch([m.address], { write: true, value: 6n })
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ wp: true, write: true })
    uffd.writeProtect(m, { protect: false })
    expect((await writer).values[0]).toBe(6n)
  })

  it('copy(..., { wp: true }) resolves a missing fault with a write-protected page', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const m = track(Mapping.anonymous(PAGE_SIZE))
    const plain = track(Userfaultfd.open())
    plain.register(m)
    if (!withFeature('PAGEFAULT_FLAG_WP', () => plain.copy(m, stampedPage(1n), undefined, { wp: true }))) return
    plain.unregister(m)
    const uffd = track(Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP }))
    uffd.register(m, { missing: true, wp: true })
    const reader = touch([m.address])
    const [miss] = await waitEvents(uffd)
    expect(miss).toMatchObject({ wp: false, minor: false })
    uffd.copy(m, stampedPage(21n), undefined, { wp: true })
    expect((await reader).values[0]).toBe(21n)
    const writer = touch([m.address + 16n], { write: true, value: 22n })
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ wp: true, write: true })
    uffd.writeProtect(m, { protect: false })
    await writer
  })
})

describe('wake()', () => {
  it('wakes a faulter without resolving: it faults again', { timeout: 10_000 * timeScale }, async () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    const reader = touch([m.address])
    const [first] = await waitEvents(uffd)
    uffd.wake(m)
    const [again] = await waitEvents(uffd)
    expect(again).toEqual(first)
    uffd.copy(m, stampedPage(8n))
    expect((await reader).values[0]).toBe(8n)
  })

  it('with nobody waiting is a no-op, also on a range this uffd never registered', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.wake(m)
    uffd.register(m)
    uffd.wake(m)
  })
})
