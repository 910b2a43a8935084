// UFFDIO_REGISTER / UNREGISTER: the ioctl mask returned for each mode combination and memory
// type, MINOR on anonymous memory (EINVAL with a hint), EBUSY across two uffds, holes, and
// unregistering.
import { describe, expect, it } from 'vitest'
import { Feature, IoctlBit, Mapping, PAGE_SIZE, Userfaultfd, ioctlNames } from '../src/index'
import { mmapRaw, munmapOnThread } from '../src/testing'
import { kernelAtLeast } from './helpers/env'
import { expectUffdError, useCleanup } from './helpers/uffd'
import { expectUnsupported, hasFeature, withFeature } from './helpers/kernel'

const track = useCleanup()

const B = IoctlBit
// What every registered range allows (6.18: MOVE and POISON too; 6.1 neither), then what each
// mode adds.
const BASE = B.WAKE | B.COPY | B.ZEROPAGE | (hasFeature('MOVE') ? B.MOVE : 0n) | (hasFeature('POISON') ? B.POISON : 0n)
const combos: Array<{ missing?: boolean; wp?: boolean; minor?: boolean }> = [
  { missing: true },
  { wp: true },
  { minor: true },
  { missing: true, wp: true },
  { missing: true, minor: true },
  { wp: true, minor: true },
  { missing: true, wp: true, minor: true },
]
const expected = (modes: { wp?: boolean; minor?: boolean }): bigint =>
  BASE | (modes.wp ? B.WRITEPROTECT : 0n) | (modes.minor ? B.CONTINUE : 0n)

describe('register(): the ioctl mask for each mode combination', () => {
  for (const modes of combos) {
    const name = Object.keys(modes).join('+')
    it(`anonymous memory, ${name}`, () => {
      const m = track(Mapping.anonymous(2 * PAGE_SIZE))
      // Without write protection (arm64 before 6.10) WP mode is refused by name, at open and at register.
      if (modes.wp && !withFeature('PAGEFAULT_FLAG_WP', () => track(Userfaultfd.open()).register(m, modes))) {
        expectUnsupported(() => Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP }), 'PAGEFAULT_FLAG_WP')
        return
      }
      const uffd = track(Userfaultfd.open({ features: modes.wp ? Feature.PAGEFAULT_FLAG_WP : 0n }))
      if (modes.minor) {
        // MINOR needs shared memory: anonymous is EINVAL, with a hint that says so.
        const err = expectUffdError(() => uffd.register(m, modes), 'EINVAL', { syscall: 'ioctl(UFFDIO_REGISTER)' })
        expect(err.hint).toMatch(/MINOR faults need shared memory/)
        return
      }
      const mask = uffd.register(m, modes)
      expect(ioctlNames(mask)).toEqual(ioctlNames(expected(modes)))
      expect(mask).toBe(expected(modes))
    })

    it(`shmem (memfd), ${name}`, () => {
      const features = Feature.MISSING_SHMEM | Feature.MINOR_SHMEM | (modes.wp ? Feature.WP_HUGETLBFS_SHMEM : 0n)
      if (modes.wp && !withFeature('WP_HUGETLBFS_SHMEM', () => Userfaultfd.open({ features }))) return
      const uffd = track(Userfaultfd.open({ features }))
      const m = track(Mapping.memfd(2 * PAGE_SIZE))
      expect(uffd.register(m, modes)).toBe(expected(modes))
    })
  }

  it('defaults to { missing: true }, accepts { address, length } with a bigint length', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    expect(uffd.register(m)).toBe(expected({}))
    expect(uffd.register({ address: m.address, length: BigInt(PAGE_SIZE) })).toBe(expected({}))
  })

  it('no mode at all, or a non-boolean mode, is an error before any syscall', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    expect(() => uffd.register(m, {})).toThrow(/choose at least one of missing, wp, minor/)
    expect(() => uffd.register(m, { missing: false })).toThrow(RangeError)
    expect(() => uffd.register(m, { missing: 1 as never })).toThrow(/'missing' must be a boolean/)
    expect(() => uffd.register(m, 'missing' as never)).toThrow(TypeError)
  })
})

describe('register(): errors', () => {
  it('EBUSY when another uffd registered the range; the same uffd may register again', () => {
    const a = track(Userfaultfd.open())
    const b = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(4 * PAGE_SIZE))
    a.register(m.range(PAGE_SIZE, PAGE_SIZE))
    const err = expectUffdError(() => b.register(m), 'EBUSY', { errno: 16, syscall: 'ioctl(UFFDIO_REGISTER)' })
    expect(err.hint).toMatch(/another userfaultfd/)
    expect(() => a.register(m)).not.toThrow()
    // b can take the part a never had once a lets go of everything.
    a.unregister(m)
    expect(() => b.register(m)).not.toThrow()
  })

  it('EINVAL for a range with no mapping at all; a hole inside a range is skipped', async () => {
    const uffd = track(Userfaultfd.open())
    const len = 3 * PAGE_SIZE
    const addr = mmapRaw(len)
    track({
      close: () => {
        void munmapOnThread(addr, len)
      },
    })
    // Punch a hole in the middle (nothing registered yet: munmap raises no event).
    expect(await munmapOnThread(addr + BigInt(PAGE_SIZE), PAGE_SIZE)).toBe(0)
    const hole = expectUffdError(
      () => uffd.register({ address: addr + BigInt(PAGE_SIZE), length: PAGE_SIZE }),
      'EINVAL',
      { syscall: 'ioctl(UFFDIO_REGISTER)' },
    )
    expect(hole.hint).toMatch(/must be mapped/)
    // Across the hole the kernel registers the mapped parts (as it does on 6.18).
    expect(uffd.register({ address: addr, length: len })).toBe(expected({}))
    expect(uffd.zeropage({ address: addr, length: PAGE_SIZE })).toBe(PAGE_SIZE)
    expect(uffd.zeropage({ address: addr + BigInt(2 * PAGE_SIZE), length: PAGE_SIZE })).toBe(PAGE_SIZE)
    expectUffdError(() => uffd.zeropage({ address: addr + BigInt(PAGE_SIZE), length: PAGE_SIZE }), 'ENOENT')
  })

  it('EINVAL for WP on memory the kernel cannot write-protect through this mode (MINOR on anonymous)', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    // Where the kernel has no write protection at all, that is what the refusal names.
    if (withFeature('PAGEFAULT_FLAG_WP', () => uffd.register(m, { minor: true, wp: true })))
      expectUffdError(() => uffd.register(m, { minor: true, wp: true }), 'EINVAL')
  })
})

describe('unregister()', () => {
  it('ends the registration; unregistering twice or an unregistered range is fine', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    uffd.register(m)
    uffd.unregister(m)
    uffd.unregister(m)
    expectUffdError(() => uffd.zeropage(m), 'ENOENT')
    // Unregistered memory faults as usual: this JS thread can touch it.
    new Uint8Array(m.buffer)[0] = 1
    const other = track(Mapping.anonymous(PAGE_SIZE))
    uffd.unregister(other)
  })

  it('part of a range: the rest stays registered', () => {
    const uffd = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(3 * PAGE_SIZE))
    uffd.register(m)
    uffd.unregister(m.range(PAGE_SIZE, PAGE_SIZE))
    expect(uffd.zeropage(m.range(0, PAGE_SIZE))).toBe(PAGE_SIZE)
    expectUffdError(() => uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE)), 'ENOENT')
    expect(uffd.zeropage(m.range(2 * PAGE_SIZE, PAGE_SIZE))).toBe(PAGE_SIZE)
  })

  // Linux 6.17 made UNREGISTER refuse (EINVAL) a range registered through another uffd of the same
  // mm ("userfaultfd: prevent unregistering VMAs through a different userfaultfd", Tal Zussman,
  // merged for 6.17, deliberately not backported to stable). Before 6.17 it succeeds and the
  // range is no longer registered (seen on Debian's 6.12 arm64 kernel).
  it('through a different uffd than the one that registered: EINVAL from 6.17 on (the registration stays), allowed before', () => {
    const a = track(Userfaultfd.open())
    const b = track(Userfaultfd.open())
    const m = track(Mapping.anonymous(PAGE_SIZE))
    a.register(m)
    if (kernelAtLeast(6, 17)) {
      expectUffdError(() => b.unregister(m), 'EINVAL', { syscall: 'ioctl(UFFDIO_UNREGISTER)' })
      expect(a.zeropage(m)).toBe(PAGE_SIZE)
    } else {
      b.unregister(m)
      // no longer registered with a: ZEROPAGE on it fails (ENOENT: no registered VMA there)
      expectUffdError(() => a.zeropage(m), 'ENOENT')
    }
  })
})
