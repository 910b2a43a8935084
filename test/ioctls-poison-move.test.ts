// UFFDIO_POISON (then SIGBUS, in child processes: a touch of a poisoned page kills its process)
// and UFFDIO_MOVE within this process: success, resolving a fault, and every error path.
import { describe, expect, it } from 'vitest'
import { Feature, Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { forkOnThread, touch } from '../src/testing'
import { stampedPage } from './helpers/events'
import { expectUffdError, lastJson, runScript, settlesWithin, useCleanup, waitEvents } from './helpers/uffd'
import { expectUnsupported, hasFeature, withFeature } from './helpers/kernel'
import { timeScale } from './helpers/children'

const track = useCleanup()
// Where the kernel lacks POISON (before 6.6) or MOVE (before 6.8), each test asserts the refusal.
const openWith = (feature: 'POISON' | 'MOVE') => () => track(Userfaultfd.open({ features: Feature[feature] }))
const hasPoison = (): boolean => withFeature('POISON', openWith('POISON'))
const hasMove = (): boolean => withFeature('MOVE', openWith('MOVE'))

describe('poison()', () => {
  it('marks empty pages poisoned (bytes done), then EEXIST, also on populated pages', () => {
    if (!hasPoison()) return
    const uffd = track(Userfaultfd.open({ features: Feature.POISON }))
    const m = track(Mapping.anonymous(3 * PAGE_SIZE))
    uffd.register(m)
    expect(uffd.poison(m.range(0, 2 * PAGE_SIZE))).toBe(2 * PAGE_SIZE)
    expectUffdError(() => uffd.poison(m.range(0, PAGE_SIZE)), 'EEXIST', { syscall: 'ioctl(UFFDIO_POISON)' })
    uffd.zeropage(m.range(2 * PAGE_SIZE, PAGE_SIZE))
    expectUffdError(() => uffd.poison(m.range(2 * PAGE_SIZE, PAGE_SIZE)), 'EEXIST')
    // The poison marker counts as an empty PTE for COPY: copying over it un-poisons the page.
    expect(uffd.copy(m.at(PAGE_SIZE), stampedPage(3n))).toBe(PAGE_SIZE)
    expect(new BigUint64Array(m.buffer, PAGE_SIZE, 1)[0]).toBe(3n)
  })

  it('partial progress (EAGAIN with bytes) and ENOENT outside a registered range', () => {
    if (!hasPoison()) return
    const uffd = track(Userfaultfd.open({ features: Feature.POISON }))
    const m = track(Mapping.anonymous(3 * PAGE_SIZE))
    uffd.register(m)
    uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE))
    expectUffdError(() => uffd.poison(m), 'EAGAIN', { bytes: PAGE_SIZE })
    const other = track(Mapping.anonymous(PAGE_SIZE))
    expectUffdError(() => uffd.poison(other), 'ENOENT')
  })

  it('a poisoned page raises SIGBUS in the process that touches it (a child)', {
    timeout: 20_000 * timeScale,
  }, async () => {
    if (!hasPoison()) return
    const r = await runScript(`
      const u = uffd.Userfaultfd.open({ features: uffd.Feature.POISON })
      const m = uffd.Mapping.anonymous(2 * uffd.PAGE_SIZE)
      u.register(m)
      const bytes = u.poison(m.range(uffd.PAGE_SIZE, uffd.PAGE_SIZE))
      u.zeropage(m.range(0, uffd.PAGE_SIZE))
      const view = new Uint8Array(m.buffer)
      console.log(JSON.stringify({ bytes, first: view[0] }))
      view[uffd.PAGE_SIZE] = 1     // poisoned: SIGBUS, not a userfault (nothing to wait for)
      console.log(JSON.stringify({ survived: true }))`)
    expect(r.signal, r.stderr).toBe('SIGBUS')
    expect(lastJson(r)).toEqual({ bytes: PAGE_SIZE, first: 0 })
  })

  it('resolving a fault with poison() wakes the faulting thread into a SIGBUS (a child)', {
    timeout: 20_000 * timeScale,
  }, async () => {
    if (!hasPoison()) return
    const r = await runScript(`
      const u = uffd.Userfaultfd.open({ features: uffd.Feature.POISON })
      const m = uffd.Mapping.anonymous(uffd.PAGE_SIZE)
      u.register(m)
      internal.touch([m.address]).then(() => console.log(JSON.stringify({ survived: true })))
      ;(async () => {
        for await (const e of u.events()) {
          // Printed first: the SIGBUS hits the woken thread as soon as poison() returns.
          console.log(JSON.stringify({ type: e.type }))
          u.poison(m)
          break
        }
        setTimeout(() => {}, 5000) // wait for the signal
      })()`)
    expect(r.signal, r.stderr).toBe('SIGBUS')
    expect(lastJson(r)).toEqual({ type: 'pagefault' })
  })

  it('wake: false leaves the faulter asleep (it would get SIGBUS when woken, so it is not)', {
    timeout: 10_000 * timeScale,
  }, async () => {
    if (!hasPoison()) return
    const uffd = track(Userfaultfd.open({ features: Feature.POISON }))
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    uffd.register(m)
    const reader = touch([m.address])
    await waitEvents(uffd)
    expect(uffd.poison(m.range(PAGE_SIZE, PAGE_SIZE), { wake: false })).toBe(PAGE_SIZE)
    expect(await settlesWithin(reader, 100)).toBe(false)
    uffd.zeropage(m.range(0, PAGE_SIZE))
    expect((await reader).values[0]).toBe(0n)
  })
})

describe('move()', () => {
  function moveSetup(pages: number): { uffd: Userfaultfd; src: Mapping; dst: Mapping } {
    const uffd = track(Userfaultfd.open({ features: Feature.MOVE }))
    const src = track(Mapping.anonymous(pages * PAGE_SIZE))
    const dst = track(Mapping.anonymous(pages * PAGE_SIZE))
    uffd.register(dst)
    return { uffd, src, dst }
  }
  const stamp = (m: Mapping, page: number): bigint => new BigUint64Array(m.buffer, page * PAGE_SIZE, 1)[0]

  it('moves pages (not copies): dst has them, src reads as zeros after', () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(2)
    src.write(0, stampedPage(41n))
    src.write(PAGE_SIZE, stampedPage(42n))
    expect(uffd.move(dst, src, 2 * PAGE_SIZE)).toBe(2 * PAGE_SIZE)
    expect([stamp(dst, 0), stamp(dst, 1)]).toEqual([41n, 42n])
    expect([stamp(src, 0), stamp(src, 1)]).toEqual([0n, 0n]) // src is not registered: fresh zero pages
  })

  it('resolves a missing fault raised by a native thread', { timeout: 10_000 * timeScale }, async () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(1)
    src.write(0, stampedPage(43n))
    const reader = touch([dst.address])
    await waitEvents(uffd)
    expect(uffd.move(dst.address, src.address, PAGE_SIZE)).toBe(PAGE_SIZE)
    expect((await reader).values[0]).toBe(43n)
  })

  it('wake: false leaves the faulter asleep until wake()', { timeout: 10_000 * timeScale }, async () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(1)
    src.write(0, stampedPage(44n))
    const reader = touch([dst.address])
    await waitEvents(uffd)
    uffd.move(dst, src, PAGE_SIZE, { wake: false })
    expect(await settlesWithin(reader, 150)).toBe(false)
    uffd.wake(dst)
    expect((await reader).values[0]).toBe(44n)
  })

  it('EEXIST when dst is populated', () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(1)
    src.write(0, stampedPage(1n))
    uffd.zeropage(dst)
    expectUffdError(() => uffd.move(dst, src, PAGE_SIZE), 'EEXIST', { syscall: 'ioctl(UFFDIO_MOVE)' })
    expect(stamp(src, 0)).toBe(1n) // nothing moved
  })

  it('ENOENT for a hole in src without allowSrcHoles; with it, holes are skipped', () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(2)
    expectUffdError(() => uffd.move(dst, src, PAGE_SIZE), 'ENOENT', { syscall: 'ioctl(UFFDIO_MOVE)' })
    expect(uffd.move(dst, src, PAGE_SIZE, { allowSrcHoles: true })).toBe(PAGE_SIZE)
    // dst stayed empty: it can still be filled.
    expect(uffd.zeropage(dst.range(0, PAGE_SIZE))).toBe(PAGE_SIZE)
  })

  it('partial progress: EAGAIN with bytes > 0 when src has a hole after a page', () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(3)
    src.write(0, stampedPage(5n))
    const err = expectUffdError(() => uffd.move(dst, src, 3 * PAGE_SIZE), 'EAGAIN', { bytes: PAGE_SIZE })
    expect(err.bytes).toBe(PAGE_SIZE)
    expect(stamp(dst, 0)).toBe(5n)
  })

  it('EINVAL when dst is not registered, or src is not anonymous memory', () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(1)
    src.write(0, stampedPage(6n))
    const unregistered = track(Mapping.anonymous(PAGE_SIZE))
    expectUffdError(() => uffd.move(unregistered, src, PAGE_SIZE), 'EINVAL')
    const shm = track(Mapping.memfd(PAGE_SIZE))
    shm.write(0, stampedPage(7n))
    expectUffdError(() => uffd.move(dst, shm, PAGE_SIZE), 'EINVAL')
  })

  it('EBUSY for pages that are not exclusive to this process (shared with a fork)', {
    timeout: 10_000 * timeScale,
  }, async () => {
    if (!hasMove()) return
    const { uffd, src, dst } = moveSetup(1)
    src.write(0, stampedPage(8n))
    const { status, errno } = await forkOnThread() // the child shares src's page copy-on-write, then exits
    expect([status, errno]).toEqual([0, 0])
    expectUffdError(() => uffd.move(dst, src, PAGE_SIZE), 'EBUSY', { syscall: 'ioctl(UFFDIO_MOVE)' })
  })

  it('checks its arguments before the kernel does (on every kernel)', () => {
    // Where the kernel has no MOVE, a uffd without it: the checks come first all the same.
    const uffd = hasFeature('MOVE') ? moveSetup(1).uffd : track(Userfaultfd.open())
    const src = track(Mapping.anonymous(PAGE_SIZE))
    const dst = track(Mapping.anonymous(PAGE_SIZE))
    expect(() => uffd.move(dst, src, 100)).toThrow(/move dst: length 100 is not a multiple of the page size/)
    expect(() => uffd.move(dst.address + 1n, src, PAGE_SIZE)).toThrow(/move dst: address .* is not aligned/)
    expect(() => uffd.move(dst, src.address + 8n, PAGE_SIZE)).toThrow(/move src/)
    expect(() => uffd.move(dst, src, undefined as never)).toThrow(/length must be a number or a bigint/)
    expect(() => uffd.move(dst, src, PAGE_SIZE, { allowSrcHoles: 'yes' as never })).toThrow(/allowSrcHoles/)
  })
})

describe('poison() and move() on a uffd opened without the feature', () => {
  // The kernel does not require the feature bit for the ioctl: where it has the ioctl it works.
  it.each(['POISON', 'MOVE'] as const)('%s: UnsupportedError where the kernel lacks it, else it works', (name) => {
    const uffd = track(Userfaultfd.open())
    const src = track(Mapping.anonymous(PAGE_SIZE))
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    src.write(0, stampedPage(1n))
    const call = (): number => (name === 'POISON' ? uffd.poison(m) : uffd.move(m, src, PAGE_SIZE))
    if (!hasFeature(name)) {
      expectUnsupported(call, name)
      return
    }
    expect(call()).toBe(PAGE_SIZE)
  })
})
