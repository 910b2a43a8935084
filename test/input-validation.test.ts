// Bad input never crashes: it is a TypeError, RangeError or UffdError whose message says what
// was wrong. Through the public API first, then the addon's own guards (what reaches native code
// when the TypeScript layer is bypassed).
import { describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import {
  Mapping,
  PAGE_SIZE,
  UffdError,
  Userfaultfd,
  fdFlags,
  isUserfaultfd,
  receiveFds,
  sendFds,
  socketPair,
} from '../src/index'
import { touch } from '../src/testing'
import { testingNative } from '../src/testing/addon'
import { native } from '../src/addon/native'
import { expectUffdError, useCleanup } from './helpers/uffd'

const track = useCleanup()
const U64_MAX = (1n << 64n) - 1n

function registered(pages = 2): { uffd: Userfaultfd; m: Mapping } {
  const uffd = track(Userfaultfd.open())
  const m = track(Mapping.anonymous(pages * PAGE_SIZE))
  uffd.register(m)
  return { uffd, m }
}

describe('addresses', () => {
  it('a number is a TypeError that says to use a bigint', () => {
    const { uffd, m } = registered()
    expect(() => uffd.copy(Number(m.address) as never, new Uint8Array(PAGE_SIZE))).toThrow(TypeError)
    expect(() => uffd.copy(Number(m.address) as never, new Uint8Array(PAGE_SIZE))).toThrow(
      /dst must be a bigint \(got the number .*BigInt\(x\)/,
    )
    expect(() => uffd.zeropage({ address: 4096 as never, length: PAGE_SIZE })).toThrow(
      /range\.address must be a bigint/,
    )
    expect(() => uffd.move(m, Number(m.address) as never, PAGE_SIZE)).toThrow(/src must be a bigint/)
  })

  it('other types are TypeErrors naming what was passed', () => {
    const { uffd } = registered()
    for (const bad of ['0x1000', null, undefined, true, [], {}, Symbol('x'), () => 1]) {
      expect(() => uffd.copy(bad as never, new Uint8Array(PAGE_SIZE))).toThrow(TypeError)
    }
    expect(() => uffd.copy('0x1000' as never, new Uint8Array(PAGE_SIZE))).toThrow(
      /dst must be a bigint address or a Mapping \(got string 0x1000\)/,
    )
    expect(() => uffd.copy([] as never, new Uint8Array(PAGE_SIZE))).toThrow(/got an array/)
  })

  it('negative or wider than 64 bits (lossy) is a RangeError', () => {
    const { uffd } = registered()
    expect(() => uffd.copy(-4096n, new Uint8Array(PAGE_SIZE))).toThrow(/dst must fit in 64 bits \(got -4096\)/)
    expect(() => uffd.copy(1n << 64n, new Uint8Array(PAGE_SIZE))).toThrow(RangeError)
    expect(() => uffd.zeropage({ address: 1n << 70n, length: PAGE_SIZE })).toThrow(/range\.address must fit in 64 bits/)
    expect(() => uffd.wake({ address: U64_MAX - 4095n, length: 2 * PAGE_SIZE })).toThrow(/wraps past 2\^64/)
  })

  it('unaligned addresses are RangeErrors naming the page size', () => {
    const { uffd, m } = registered()
    expect(() => uffd.copy(m.address + 1n, new Uint8Array(PAGE_SIZE))).toThrow(
      new RegExp(`copy: address 0x[0-9a-f]+ is not aligned to the page size \\(${PAGE_SIZE}\\)`),
    )
    expect(() => uffd.register({ address: m.address + 8n, length: PAGE_SIZE })).toThrow(
      /range: address .* is not aligned/,
    )
    expect(() => uffd.writeProtect({ address: m.address + 8n, length: PAGE_SIZE })).toThrow(RangeError)
  })

  it("addresses outside this process's mappings reach the kernel and come back as UffdErrors", () => {
    const { uffd, m } = registered()
    const kernelSpace = { address: 0xffff_8000_0000_0000n, length: PAGE_SIZE }
    expectUffdError(() => uffd.register(kernelSpace), 'EINVAL', { syscall: 'ioctl(UFFDIO_REGISTER)' })
    expectUffdError(() => uffd.copy(kernelSpace, new Uint8Array(PAGE_SIZE)), 'EINVAL')
    expectUffdError(() => uffd.register({ address: 0x10000n, length: PAGE_SIZE }), 'EINVAL')
    // An unreadable source address: EFAULT.
    expectUffdError(() => uffd.copy(m, 0x10000n, PAGE_SIZE), 'EFAULT', { syscall: 'ioctl(UFFDIO_COPY)' })
  })
})

describe('lengths', () => {
  it('zero, negative, fractional, NaN, infinite or unsafe lengths are RangeErrors', () => {
    const { uffd, m } = registered()
    const r = (length: unknown) => ({ address: m.address, length }) as never
    expect(() => uffd.zeropage(r(0))).toThrow(/range\.length must be > 0 \(got 0\)/)
    expect(() => uffd.zeropage(r(0n))).toThrow(/range\.length must be > 0/)
    expect(() => uffd.zeropage(r(-PAGE_SIZE))).toThrow(RangeError)
    expect(() => uffd.zeropage(r(1.5))).toThrow(/range\.length must be an integer \(got 1\.5\)/)
    expect(() => uffd.zeropage(r(Number.NaN))).toThrow(RangeError)
    expect(() => uffd.zeropage(r(Infinity))).toThrow(RangeError)
    expect(() => uffd.zeropage(r(2n ** 60n))).toThrow(/range\.length is too large/)
    expect(() => uffd.zeropage(r('4096'))).toThrow(/range\.length must be a number or a bigint \(got string 4096\)/)
    expect(() => uffd.zeropage(r(100))).toThrow(/range: length 100 is not a multiple of the page size/)
    expect(() => uffd.copy(m, new Uint8Array(PAGE_SIZE), 0)).toThrow(/length must be > 0/)
    expect(() => uffd.copy(m, new Uint8Array(PAGE_SIZE), 100)).toThrow(
      /copy: length 100 is not a multiple of the page size/,
    )
  })

  it('a bigint length is fine', () => {
    const { uffd, m } = registered()
    expect(uffd.zeropage({ address: m.address, length: BigInt(PAGE_SIZE) })).toBe(PAGE_SIZE)
  })
})

describe('ranges, sources and options', () => {
  it('a range that is not an object is a TypeError', () => {
    const { uffd } = registered()
    for (const bad of [null, undefined, 5, 5n, 'range']) {
      expect(() => uffd.register(bad as never)).toThrow(/range must be a Mapping or \{ address: bigint, length \}/)
    }
  })

  it('copy sources: wrong types, too short, empty or detached', () => {
    const { uffd, m } = registered()
    expect(() => uffd.copy(m, 'bytes' as never)).toThrow(
      /src must be a bigint address or a Mapping \(got string bytes\)/,
    )
    expect(() => uffd.copy(m, [1, 2, 3] as never)).toThrow(TypeError)
    expect(() => uffd.copy(m, new Uint8Array(PAGE_SIZE), 2 * PAGE_SIZE)).toThrow(
      /length 8192 exceeds src \(4096 bytes\)/,
    )
    expect(() => uffd.copy(m, new Uint8Array(0))).toThrow(/src is empty/)
    const detached = new ArrayBuffer(PAGE_SIZE)
    structuredClone(detached, { transfer: [detached] })
    expect(() => uffd.copy(m, detached)).toThrow(/src is empty \(or its buffer was detached\)/)
  })

  it('options must be objects of booleans', () => {
    const { uffd, m } = registered()
    expect(() => uffd.zeropage(m, 'wake' as never)).toThrow(/zeropage options must be an object \(got string wake\)/)
    expect(() => uffd.zeropage(m, { wake: 'no' as never })).toThrow(/option 'wake' must be a boolean \(got string no\)/)
    expect(() => uffd.copy(m, new Uint8Array(PAGE_SIZE), undefined, null as never)).toThrow(
      /copy options must be an object \(got null\)/,
    )
    expect(() => uffd.writeProtect(m, { protect: 1 as never })).toThrow(/'protect' must be a boolean/)
    expect(() => uffd.poison(m, [] as never)).toThrow(TypeError)
  })

  it('read(max) and fromFd(fd) check their numbers', () => {
    const { uffd } = registered()
    expect(() => uffd.read(0)).toThrow(/max must be an integer 1\.\.4096 \(got number 0\)/)
    expect(() => uffd.read(1.5)).toThrow(RangeError)
    expect(() => uffd.read(5000)).toThrow(RangeError)
    expect(() => Userfaultfd.fromFd(-1)).toThrow(/fd must be a non-negative integer/)
    expect(() => Userfaultfd.fromFd(1.5)).toThrow(TypeError)
    expect(() => Userfaultfd.fromFd('3' as never)).toThrow(TypeError)
  })
})

describe('Userfaultfd.fromFd() adopts only userfaultfds', () => {
  it('refuses a regular file, a socket, /dev/null and closed fds, without touching their flags or closing them', () => {
    const file = fs.openSync(__filename, 'r')
    const [pr, pw] = socketPair()
    const devnull = fs.openSync('/dev/null', 'r+')
    try {
      for (const [fd, kind] of [
        [file, /is \/.*input-validation\.test\.ts, not a userfaultfd/],
        [pr, /is socket:\[\d+\], not a userfaultfd/],
        [devnull, /is \/dev\/null, not a userfaultfd/],
      ] as const) {
        const before = fdFlags(fd)
        const err = expectUffdError(() => Userfaultfd.fromFd(fd), 'EINVAL', { syscall: 'fromFd' })
        expect(err.message).toMatch(kind)
        // Untouched: no O_NONBLOCK added to the shared open file, still open (not closed on GC).
        expect(fdFlags(fd)).toEqual(before)
        expect(() => fs.fstatSync(fd)).not.toThrow()
      }
      expect(fdFlags(file).nonblock).toBe(false)
      const closed = fs.openSync('/dev/null', 'r')
      fs.closeSync(closed)
      expectUffdError(() => Userfaultfd.fromFd(closed), 'EBADF', { syscall: 'fromFd' })
      expect(isUserfaultfd(file)).toBe(false)
      expect(() => Userfaultfd.fromFd(Userfaultfd.open().fd, { features: 1 as never })).toThrow(
        /features must be a non-negative bigint/,
      )
    } finally {
      for (const fd of [file, pr, pw, devnull]) fs.closeSync(fd)
    }
  })

  it('adopts a real userfaultfd (a copy received over a socket), which then closes', async () => {
    const original = Userfaultfd.open()
    const [a, b] = socketPair()
    const received = receiveFds(b, { maxFds: 1 })
    await sendFds(a, 'x', [original.fd])
    const [dup] = (await received).fds
    fs.closeSync(a)
    fs.closeSync(b)
    expect(isUserfaultfd(dup)).toBe(true)
    const adopted = Userfaultfd.fromFd(dup)
    expect(adopted.via).toBe('inherited')
    expect(fdFlags(dup)).toEqual({ cloexec: true, nonblock: true })
    adopted.close()
    expect(() => fs.fstatSync(dup)).toThrow()
    original.close()
  })
})

describe('use after close() or unmap()', () => {
  it('a closed uffd is EBADF before any check of the arguments could matter', () => {
    const uffd = Userfaultfd.open()
    uffd.close()
    expectUffdError(() => uffd.copy(0n, new Uint8Array(PAGE_SIZE)), 'EBADF')
  })

  it('an unmapped Mapping as a range, dst or src is EBADF (its address may belong to another mapping by now)', () => {
    const { uffd, m } = registered()
    const gone = Mapping.anonymous(PAGE_SIZE)
    gone.unmap()
    expectUffdError(() => uffd.register(gone), 'EBADF', { syscall: 'range' })
    expectUffdError(() => uffd.zeropage(gone), 'EBADF')
    expectUffdError(() => uffd.copy(gone, new Uint8Array(PAGE_SIZE)), 'EBADF', { syscall: 'dst' })
    expectUffdError(() => uffd.copy(m, gone), 'EBADF', { syscall: 'src' })
    expectUffdError(() => uffd.move(m, gone, PAGE_SIZE), 'EBADF', { syscall: 'src' })
    expect(gone.unmapped).toBe(true)
    expect(() => gone.range()).toThrow(UffdError)
  })
})

describe("the addon's own guards (the TypeScript layer bypassed)", () => {
  it('exact 32-bit integers for fds and flags: no silent truncation', () => {
    for (const bad of [1.5, Number.NaN, Infinity, 2 ** 31, -(2 ** 31) - 1]) {
      expect(() => native.openSyscall(bad)).toThrow(/flags must be a 32-bit integer/)
      expect(() => native.register(bad, 0n, 4096n, 1n)).toThrow(RangeError)
    }
    expect(() => native.api(-1, 0n)).toThrow(/fd must be a non-negative integer/)
    expect(() => native.close('3' as never)).toThrow(/fd must be a number/)
  })

  it('u64 arguments: bigint or safe integer, nothing lossy', () => {
    const uffd = track(Userfaultfd.open())
    expect(() => native.zeropage(uffd.fd, -1n, 4096n, 0n)).toThrow(/address does not fit in 64 bits/)
    expect(() => native.zeropage(uffd.fd, 1n << 64n, 4096n, 0n)).toThrow(RangeError)
    expect(() => native.zeropage(uffd.fd, 4096.5, 4096n, 0n)).toThrow(/address must be a non-negative safe integer/)
    expect(() => native.zeropage(uffd.fd, 2 ** 60, 4096n, 0n)).toThrow(RangeError)
    expect(() => native.zeropage(uffd.fd, 'x' as never, 4096n, 0n)).toThrow(/address must be a bigint or a number/)
    expect(() => native.copy(uffd.fd, 0n, new Uint8Array(10), 4096n, 0n)).toThrow(/src is shorter than length/)
    expect(() => native.readMessages(uffd.fd, new Uint8Array(31))).toThrow(/at least one 32-byte message/)
    expect(() => native.readMessages(uffd.fd, 'buffer' as never)).toThrow(TypeError)
  })

  it('MappingHandle and touch reject what they cannot use', async () => {
    expect(() => new native.MappingHandle('weird' as never, 4096, {})).toThrow(/unknown mapping kind: weird/)
    expect(() => new native.MappingHandle(5 as never, 4096, {})).toThrow(TypeError)
    expect(() => new native.MappingHandle('anonymous', 0, {})).toThrow(/length must be > 0/)
    expect(() => new native.MappingHandle('alias', 4096, {})).toThrow(/alias needs a source mapping/)
    const anon = new native.MappingHandle('anonymous', 4096, {})
    expect(() => new native.MappingHandle('alias', 4096, {}, anon)).toThrow(/alias needs a memfd mapping/)
    expect(() => anon.read(4096, new Uint8Array(1))).toThrow(/exceeds the mapping/)
    expect(() => anon.write(0, {} as never)).toThrow(TypeError)
    anon.unmap()
    expect(() => anon.read(0, new Uint8Array(1))).toThrow(expect.objectContaining({ code: 'EBADF' }))
    expect(() => testingNative().touch([1n] as never, {})).toThrow(/addresses must be a BigUint64Array/)
    await expect(touch([], { threads: 0 })).rejects.toThrow(/threads must be 1\.\.64/)
  })
})
