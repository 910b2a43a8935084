// Property-based tests of the argument validators: every public entry point, given arbitrary and
// hostile arguments (wrong types, boundary numbers, lossy bigints, near-miss ranges), either
// works or throws a clean TypeError/RangeError/UffdError (with code, errno, syscall) — never
// another exception (a V8 TypeError from deeper down means a missing check), never a crash.
// Ranges stay inside memory the test owns: registering arbitrary memory of this process could
// deadlock it, which is the one rule, not a validator bug.
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  FaultServer,
  Mapping,
  PAGE_SIZE,
  Userfaultfd,
  isUserfaultfd,
  parseRegions,
  peerCredentials,
  socketFd,
} from '../src/index'
import { checkHandshakeLimits } from '../src/firecracker/handler'
import { check, cleanly, hostile } from './helpers/properties'

const PAGES = 16
let m: Mapping // registered with `uffd`; every generated range lies inside it
let uffd: Userfaultfd
let scratch: Mapping // for Mapping's own methods, and copy sources (never registered)

beforeAll(() => {
  m = Mapping.anonymous(PAGES * PAGE_SIZE)
  uffd = Userfaultfd.open()
  scratch = Mapping.anonymous(16 * PAGE_SIZE)
})
afterAll(() => {
  uffd.close()
  m.unmap()
  scratch.unmap()
})

/** Addresses and ranges near `m`: aligned or not, inside it (never past its end). */
function nearRange(): fc.Arbitrary<unknown> {
  return fc.oneof(
    fc.constant(m),
    fc
      .record({
        page: fc.nat(PAGES - 1),
        skew: fc.constantFrom(0, 0, 1, 8, 4095),
        pages: fc.integer({ min: 0, max: PAGES }),
      })
      .filter(({ page, pages }) => page + pages <= PAGES)
      .map(({ page, skew, pages }) => ({
        address: m.address + BigInt(page * PAGE_SIZE + skew),
        length: fc.sample(
          fc.constantFrom(pages * PAGE_SIZE, BigInt(pages * PAGE_SIZE), pages * PAGE_SIZE - 1, -pages),
          1,
        )[0],
      })),
    fc.nat(PAGES - 1).map((page) => m.address + BigInt(page * PAGE_SIZE)),
  )
}

/**
 * Addresses in the first pages of `scratch` (never registered), aligned or not: with lengths of
 * up to 4 pages, a source range stays inside it (past its end may be `m`).
 */
function scratchAddress(): fc.Arbitrary<unknown> {
  return fc.oneof(
    fc.constant(scratch),
    fc
      .record({ page: fc.nat(3), skew: fc.constantFrom(0, 0, 8) })
      .map(({ page, skew }) => scratch.address + BigInt(page * PAGE_SIZE + skew)),
  )
}

const arg = (): fc.Arbitrary<unknown> =>
  fc.oneof({ weight: 2, arbitrary: hostile }, { weight: 1, arbitrary: nearRange() })
const bytesArg = fc.oneof(
  hostile,
  fc.constantFrom(
    new Uint8Array(PAGE_SIZE),
    new ArrayBuffer(PAGE_SIZE),
    new BigUint64Array(512),
    new DataView(new ArrayBuffer(8)),
  ),
)

function resetUffd(): void {
  try {
    uffd.unregister(m)
  } catch {
    /* not registered */
  }
  m.madvise('dontneed')
}

describe('validators: arbitrary and hostile arguments get clean errors', () => {
  it('Userfaultfd.open(options)', () => {
    check(
      'open',
      fc.property(hostile, (options) => {
        const r = cleanly(() => Userfaultfd.open(options as never))
        if (r.ok) (r.value as Userfaultfd).close()
      }),
    )
  })

  it('Userfaultfd.fromFd(fd, options) (never adopting an fd that is not a userfaultfd)', () => {
    check(
      'fromFd',
      fc.property(fc.oneof(hostile, fc.integer({ min: -1, max: 64 })), hostile, (fd, options) => {
        if (typeof fd === 'number' && isUserfaultfd(fd)) return // adopting a live uffd twice is the caller's bug
        const r = cleanly(() => Userfaultfd.fromFd(fd as never, options as never))
        expect(r.ok).toBe(false)
      }),
    )
  })

  it('register, unregister, wake, zeropage, continue, writeProtect, poison', () => {
    const calls: Array<[string, (a: unknown, b: unknown) => unknown]> = [
      ['register', (a, b) => uffd.register(a as never, b as never)],
      ['unregister', (a) => uffd.unregister(a as never)],
      ['wake', (a) => uffd.wake(a as never)],
      ['zeropage', (a, b) => uffd.zeropage(a as never, b as never)],
      ['continue', (a, b) => uffd.continue(a as never, b as never)],
      ['writeProtect', (a, b) => uffd.writeProtect(a as never, b as never)],
      ['poison', (a, b) => uffd.poison(a as never, b as never)],
    ]
    check(
      'range ioctls',
      fc.property(fc.constantFrom(...calls), arg(), hostile, ([, call], a, b) => {
        try {
          cleanly(() => call(a, b))
        } finally {
          resetUffd()
        }
      }),
      600,
    )
  })

  it('copy(dst, src, length, options) and move(dst, src, length, options)', () => {
    check(
      'copy/move',
      // src never lies in `m`: the kernel reading a registered missing page for this thread's
      // own ioctl would wait for this very thread (the one rule).
      fc.property(
        fc.boolean(),
        arg(),
        fc.oneof(bytesArg, scratchAddress()),
        fc.oneof(hostile, fc.constantFrom(PAGE_SIZE, 4 * PAGE_SIZE)),
        hostile,
        (isMove, dst, src, length, options) => {
          try {
            uffd.register(m)
            cleanly(() =>
              isMove
                ? uffd.move(dst as never, src as never, length as never, options as never)
                : uffd.copy(dst as never, src as never, length as never, options as never),
            )
          } finally {
            resetUffd()
          }
        },
      ),
      600,
    )
  })

  it('read(max) and events(options)', () => {
    check(
      'read/events',
      fc.property(hostile, hostile, (max, options) => {
        cleanly(() => uffd.read(max as never))
        const r = cleanly(() => uffd.events(options as never))
        if (r.ok) (r.value as { close(): void }).close()
      }),
    )
  })

  it('Mapping.anonymous / Mapping.memfd (length, options)', () => {
    check(
      'Mapping constructors',
      fc.property(
        fc.boolean(),
        fc.oneof(hostile, fc.constantFrom(PAGE_SIZE, 2 * PAGE_SIZE, PAGE_SIZE + 1)),
        hostile,
        (memfd, length, options) => {
          const r = cleanly(() =>
            memfd
              ? Mapping.memfd(length as never, options as never)
              : Mapping.anonymous(length as never, options as never),
          )
          if (r.ok) (r.value as Mapping).unmap()
        },
      ),
    )
  })

  it('mapping.read / write / protect / madvise / range / at', () => {
    const P = PAGE_SIZE
    const offset = fc.oneof(hostile, fc.integer({ min: -1, max: 5 * P }))
    check(
      'Mapping methods',
      fc.property(
        fc.nat(5),
        offset,
        fc.oneof(bytesArg, offset),
        fc.oneof(hostile, offset, fc.constantFrom('none', 'r', 'rw', 'dontneed', 'free')),
        (which, a, b, c) => {
          try {
            cleanly(() => {
              switch (which) {
                case 0:
                  return scratch.read(a as never, b as never)
                case 1:
                  return scratch.write(a as never, b as never)
                case 2:
                  return scratch.protect(c as never, a as never, b as never)
                case 3:
                  return scratch.madvise(c as never, a as never, b as never)
                case 4:
                  return scratch.range(a as never, b as never)
                default:
                  return scratch.at(a as never)
              }
            })
          } finally {
            scratch.protect('rw')
          }
        },
      ),
      600,
    )
  })

  it('FaultServer(uffd, options) and serve(range, source, options)', () => {
    check(
      'FaultServer',
      fc.property(
        hostile,
        arg(),
        fc.oneof(hostile, fc.constantFrom({ zero: true }, { buffer: new Uint8Array(PAGE_SIZE) })),
        hostile,
        (options, range, source, serveOptions) => {
          const own = Userfaultfd.open()
          try {
            const r = cleanly(() => new FaultServer(own, options as never))
            if (!r.ok) return
            const server = r.value as FaultServer
            try {
              cleanly(() => server.serve(range as never, source as never, serveOptions as never))
            } finally {
              server.close()
            }
          } finally {
            own.close()
            m.madvise('dontneed')
          }
        },
      ),
      200,
    )
  })

  it('handshake limits and parseRegions options', () => {
    check(
      'handshake limits',
      fc.property(hostile, hostile, hostile, (timeout, bytes, fileSize) => {
        cleanly(() => checkHandshakeLimits({ handshakeTimeout: timeout, maxMessageBytes: bytes }))
        cleanly(() =>
          parseRegions('[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]', { fileSize } as never),
        )
      }),
    )
  })

  it('socket helpers: socketFd, peerCredentials', () => {
    check(
      'socket helpers',
      fc.property(hostile, (socket) => {
        if (typeof socket === 'number') return // any fd number is taken as is
        cleanly(() => socketFd(socket as never))
        cleanly(() => peerCredentials(socket as never))
      }),
    )
  })
})
