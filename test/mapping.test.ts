// Mapping: anonymous and memfd memory, aliases, read/write with every kind of byte container,
// madvise/protect, and unmap() detaching the buffer before munmap.
import { describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import { Mapping, PAGE_SIZE, UffdError, hugePageSize } from '../src/index'
import { expectUffdError, lastJson, runScript, useCleanup } from './helpers/uffd'
import { mmapRaw, munmapOnThread, pages, touch } from '../src/testing'

/** Pages of [address, address + length) present in this process's page table (/proc/self/pagemap). */
function residentPages(address: bigint, length: number): number {
  const n = length / PAGE_SIZE
  const entries = Buffer.alloc(8 * n)
  const fd = fs.openSync('/proc/self/pagemap', 'r')
  try {
    fs.readSync(fd, entries, 0, 8 * n, Number(address / BigInt(PAGE_SIZE)) * 8)
  } finally {
    fs.closeSync(fd)
  }
  let present = 0
  for (let i = 0; i < n; i++) if (entries.readBigUInt64LE(8 * i) >> 63n === 1n) present++
  return present
}

const track = useCleanup()

/** The /proc/self/maps line of the mapping starting at `address`, if any. */
// The /proc/self/maps line whose range holds `address` (an anonymous mapping may have been
// merged with a neighbour of the same kind, so it need not start there).
function mapsLine(address: bigint): string | undefined {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .find((l) => {
      const [start, end] = l
        .split(' ')[0]
        .split('-')
        .map((x) => BigInt(`0x${x}`))
      return start <= address && address < end
    })
}

describe('Mapping.anonymous', () => {
  it('maps private anonymous memory, page-aligned, readable and writable through buffer', () => {
    const m = track(Mapping.anonymous(3 * PAGE_SIZE))
    expect(m).toMatchObject({
      length: 3 * PAGE_SIZE,
      pageSize: PAGE_SIZE,
      kind: 'anonymous',
      hugetlb: false,
      unmapped: false,
    })
    expect(m.address % BigInt(PAGE_SIZE)).toBe(0n)
    expect(m.fd).toBe(-1)
    expect(mapsLine(m.address)).toMatch(/ rw-p /)
    const view = new Uint8Array(m.buffer)
    expect(view.length).toBe(3 * PAGE_SIZE)
    expect(view.every((b) => b === 0)).toBe(true)
    view[5] = 42
    expect(m.buffer).toBe(m.buffer) // one ArrayBuffer per mapping
    const out = new Uint8Array(8)
    m.read(0, out)
    expect(out[5]).toBe(42)
  })

  it('is a mapping of its own between PROT_NONE guard pages, which unmap() removes too', () => {
    // Never merged with a neighbour: a transparent huge page faulted in a neighbouring mapping
    // (Linux 6.1 does not THP-align large anonymous mappings) could otherwise cover the start of
    // this range and populate it with zeros before a uffd registers it, and those pages would
    // never fault (FaultServer served them as zeros; see CONTRIBUTING.md, Older kernels).
    const m = Mapping.anonymous(8 * PAGE_SIZE)
    const end = m.address + BigInt(m.length)
    const line = mapsLine(m.address)!
    expect(line.split(' ')[0]).toBe(`${m.address.toString(16)}-${end.toString(16)}`)
    expect(mapsLine(m.address - BigInt(PAGE_SIZE))).toMatch(/ ---p /)
    expect(mapsLine(end)).toMatch(/ ---p /)
    m.unmap()
    expect(
      mapsLine(m.address - BigInt(PAGE_SIZE))
        ?.split(' ')[0]
        .split('-')[1],
    ).not.toBe(m.address.toString(16))
    expect(mapsLine(end)?.split(' ')[0].split('-')[0]).not.toBe(end.toString(16))
  })

  it("a neighbour's pages, however large, populate nothing of it", async () => {
    const m = track(Mapping.anonymous(4 * 1024 * 1024))
    // Fresh anonymous memory right below it (where mmap puts the next mapping), of the same
    // kind (no madvise: merged with it but for the guard), written all over: where
    // transparent_hugepage is 'always' (Debian's default) its huge pages would reach into m.
    const length = 8 * 1024 * 1024
    const below = mmapRaw(length)
    track({ close: () => void munmapOnThread(below, length) })
    await touch(pages({ address: below, length }), { write: true, threads: 2 })
    expect(residentPages(m.address, m.length)).toBe(0)
  })

  it('populate: true maps the pages at once (all resident)', () => {
    const m = track(Mapping.anonymous(4 * PAGE_SIZE, { populate: true }))
    expect(new Uint8Array(m.buffer).every((b) => b === 0)).toBe(true)
  })

  it('accepts a bigint length; rejects zero, negative, fractional and unaligned lengths', () => {
    track(Mapping.anonymous(BigInt(PAGE_SIZE) as never))
    expect(() => Mapping.anonymous(0)).toThrow(/length must be > 0/)
    expect(() => Mapping.anonymous(-PAGE_SIZE)).toThrow(RangeError)
    expect(() => Mapping.anonymous(1.5)).toThrow(/must be an integer/)
    expect(() => Mapping.anonymous(100)).toThrow(/not a multiple of the page size/)
    expect(() => Mapping.anonymous('4096' as never)).toThrow(TypeError)
    expect(() => Mapping.anonymous(2 ** 60)).toThrow(RangeError)
  })
})

describe('Mapping.memfd and alias()', () => {
  it('maps a named memfd MAP_SHARED; an alias sees the same pages', () => {
    const m = track(Mapping.memfd(2 * PAGE_SIZE, { name: 'mapping-test' }))
    expect(m.kind).toBe('memfd')
    expect(m.fd).toBeGreaterThan(2)
    expect(fs.readlinkSync(`/proc/self/fd/${m.fd}`)).toMatch(/^\/memfd:mapping-test/)
    expect(mapsLine(m.address)).toMatch(/ rw-s .*\/memfd:mapping-test/)
    const a = track(m.alias())
    expect(a.address).not.toBe(m.address)
    expect(a).toMatchObject({ length: m.length, kind: 'memfd', hugetlb: false })
    m.write(PAGE_SIZE, Buffer.from('through the original'))
    const out = Buffer.alloc(20)
    a.read(PAGE_SIZE, out)
    expect(out.toString()).toBe('through the original')
    a.write(0, Buffer.from('and back'))
    expect(Buffer.from(m.buffer, 0, 8).toString()).toBe('and back')
    // An alias of an alias is the same file again; unmapping the original leaves the aliases.
    const b = track(a.alias())
    m.unmap()
    expect(Buffer.from(b.buffer, 0, 8).toString()).toBe('and back')
  })

  it('a private alias is copy-on-write over the file', () => {
    const m = track(Mapping.memfd(PAGE_SIZE))
    m.write(0, Buffer.from('shared'))
    const p = track(m.alias({ private: true }))
    expect(mapsLine(p.address)).toMatch(/ rw-p /)
    p.write(0, Buffer.from('PRIVATE'))
    expect(Buffer.from(m.buffer, 0, 6).toString()).toBe('shared')
  })

  it('alias() of private anonymous memory is a TypeError', () => {
    const m = track(Mapping.anonymous(PAGE_SIZE))
    expect(() => m.alias()).toThrow(TypeError)
    expect(() => m.alias()).toThrow(/needs shared memory/)
  })

  it('rejects a non-string name and options that are not objects of booleans', () => {
    expect(() => Mapping.memfd(PAGE_SIZE, { name: 5 as never })).toThrow(/name must be a string/)
    expect(() => Mapping.memfd(PAGE_SIZE, null as never)).toThrow(
      /Mapping\.memfd options must be an object \(got null\)/,
    )
    expect(() => Mapping.memfd(PAGE_SIZE, { hugetlb: 1 as never })).toThrow(/option 'hugetlb' must be a boolean/)
    expect(() => Mapping.anonymous(PAGE_SIZE, 'hugetlb' as never)).toThrow(TypeError)
    expect(() => Mapping.anonymous(PAGE_SIZE, { populate: 'yes' as never })).toThrow(
      /option 'populate' must be a boolean \(got string yes\)/,
    )
    const m = track(Mapping.memfd(PAGE_SIZE))
    expect(() => m.alias({ private: 1 as never })).toThrow(/option 'private' must be a boolean/)
  })

  it('hugePageSize() is the Hugepagesize of /proc/meminfo', () => {
    const kb = Number(/Hugepagesize:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))![1])
    expect(hugePageSize()).toBe(kb * 1024)
  })
})

describe('read() and write()', () => {
  const kinds: Array<[string, (sab: boolean) => ArrayBuffer | SharedArrayBuffer | ArrayBufferView]> = [
    ['ArrayBuffer', (s) => (s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Uint8Array', (s) => new Uint8Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Int16Array', (s) => new Int16Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Uint32Array', (s) => new Uint32Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Float32Array', (s) => new Float32Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Float64Array', (s) => new Float64Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['BigInt64Array', (s) => new BigInt64Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['BigUint64Array', (s) => new BigUint64Array(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Uint8ClampedArray', (s) => new Uint8ClampedArray(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['DataView', (s) => new DataView(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
    ['Buffer', (s) => Buffer.from(s ? new SharedArrayBuffer(16) : new ArrayBuffer(16))],
  ]
  const bytesOf = (x: ArrayBuffer | SharedArrayBuffer | ArrayBufferView): Uint8Array =>
    ArrayBuffer.isView(x) ? new Uint8Array(x.buffer, x.byteOffset, x.byteLength) : new Uint8Array(x)

  for (const shared of [false, true]) {
    for (const [name, make] of kinds) {
      it(`${name}${shared ? ' over a SharedArrayBuffer' : ''}: write then read round-trips 16 bytes`, () => {
        const m = track(Mapping.anonymous(PAGE_SIZE))
        const src = make(shared)
        bytesOf(src).set(Array.from({ length: 16 }, (_, i) => i + 1))
        expect(m.write(100, src)).toBe(16)
        expect(Array.from(new Uint8Array(m.buffer, 100, 16))).toEqual(Array.from({ length: 16 }, (_, i) => i + 1))
        const dst = make(shared)
        expect(m.read(100, dst)).toBe(16)
        expect(Array.from(bytesOf(dst))).toEqual(Array.from({ length: 16 }, (_, i) => i + 1))
      })
    }
  }

  it("honours a view's byteOffset and byteLength", () => {
    const m = track(Mapping.anonymous(PAGE_SIZE))
    const backing = new Uint8Array(32).map((_, i) => i)
    m.write(0, backing.subarray(8, 12))
    expect(Array.from(new Uint8Array(m.buffer, 0, 5))).toEqual([8, 9, 10, 11, 0])
    const target = new Uint8Array(32)
    m.read(0, new DataView(target.buffer, 20, 4))
    expect(Array.from(target.subarray(18, 26))).toEqual([0, 0, 8, 9, 10, 11, 0, 0])
  })

  it('zero-length reads and writes (also of a detached buffer) do nothing and return 0', () => {
    const m = track(Mapping.anonymous(PAGE_SIZE))
    expect(m.read(0, new Uint8Array(0))).toBe(0)
    expect(m.write(PAGE_SIZE, new ArrayBuffer(0))).toBe(0)
    const detached = new ArrayBuffer(8)
    const overDetached = new Uint8Array(detached)
    structuredClone(detached, { transfer: [detached] })
    expect(detached.byteLength).toBe(0)
    expect(m.write(0, detached)).toBe(0)
    expect(m.read(0, overDetached)).toBe(0)
  })

  it('reads and writes across the whole mapping, never past it', () => {
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    expect(m.write(0, new Uint8Array(2 * PAGE_SIZE).fill(7))).toBe(2 * PAGE_SIZE)
    expect(() => m.write(1, new Uint8Array(2 * PAGE_SIZE))).toThrow(/lies outside the mapping/)
    expect(() => m.read(2 * PAGE_SIZE, new Uint8Array(1))).toThrow(RangeError)
    expect(() => m.read(-1, new Uint8Array(1))).toThrow(/offset must be a non-negative integer/)
    expect(() => m.read(0.5, new Uint8Array(1))).toThrow(RangeError)
    expect(() => m.read(0, [1, 2, 3] as never)).toThrow(/target must be an ArrayBuffer/)
    expect(() => m.write(0, 'text' as never)).toThrow(/source must be an ArrayBuffer/)
  })
})

describe('madvise() and protect()', () => {
  it("madvise('dontneed') drops anonymous pages (they read as zeros again)", () => {
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    m.write(0, new Uint8Array(2 * PAGE_SIZE).fill(9))
    m.madvise('dontneed', PAGE_SIZE, PAGE_SIZE)
    const view = new Uint8Array(m.buffer)
    expect(view[0]).toBe(9)
    expect(view[PAGE_SIZE]).toBe(0)
  })

  it("madvise('remove') punches a hole in a memfd, seen through every alias", () => {
    const m = track(Mapping.memfd(PAGE_SIZE))
    const a = track(m.alias())
    m.write(0, Buffer.from('gone'))
    a.madvise('remove')
    expect(new Uint8Array(m.buffer)[0]).toBe(0)
  })

  it('protect() changes the protection shown in /proc/self/maps', () => {
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    m.protect('r')
    expect(mapsLine(m.address)).toMatch(/ r--p /)
    m.protect('none', PAGE_SIZE, PAGE_SIZE)
    m.protect('rw', 0, PAGE_SIZE)
    expect(mapsLine(m.address)).toMatch(/ rw-p /)
    m.protect('rw')
  })

  it('unknown advice or protection, bad numbers and unaligned spans are errors, not crashes', () => {
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    expect(() => m.madvise('forget' as never)).toThrow(/unknown advice 'forget'/)
    expect(() => m.madvise('toString' as never)).toThrow(/unknown advice 'toString'/)
    expect(() => m.protect('w' as never)).toThrow(/unknown protection 'w'/)
    expect(() => m.protect(1.5)).toThrow(/prot must be a 32-bit integer/)
    expect(() => m.protect(Number.NaN)).toThrow(RangeError)
    expect(() => m.protect(2 ** 40)).toThrow(RangeError)
    expect(() => m.madvise('dontneed', 0, 3 * PAGE_SIZE)).toThrow(/outside the mapping/)
    expectUffdError(() => m.madvise('dontneed', 1, PAGE_SIZE), 'EINVAL', { syscall: 'madvise' })
    expectUffdError(() => m.protect(0xff), 'EINVAL', { syscall: 'mprotect' })
  })
})

describe('read() and write() on memory made inaccessible by protect()', () => {
  // A plain memcpy there is a SIGSEGV of the whole process; these must be UffdError EFAULT. Run
  // in a child, so that a crash fails the test instead of killing the test runner. Both copy
  // methods: process_vm_readv/writev, and the pipe that replaces them where seccomp forbids them.
  for (const method of ['auto', 'pipe'] as const) {
    it(`throws EFAULT (with bytes done) instead of crashing (${method})`, async () => {
      const r = await runScript(`
        const { Mapping, PAGE_SIZE: P } = uffd
        const method = ${JSON.stringify(method)}
        // The internal third argument forces the pipe method, as seccomp would.
        const read = (m, off, t) => method === 'pipe' ? m._handle.read(off, t, 'pipe') : m.read(off, t)
        const write = (m, off, s) => method === 'pipe' ? m._handle.write(off, s, 'pipe') : m.write(off, s)
        const attempt = (f) => { try { return { ok: f() } } catch (e) { return { name: e.name, code: e.code, bytes: e.bytes, syscall: e.syscall } } }
        const m = Mapping.anonymous(3 * P)
        m.write(0, new Uint8Array(3 * P).fill(7))
        const out = {}
        m.protect('none')
        out.noneRead = attempt(() => read(m, 0, new Uint8Array(16)))
        out.noneWrite = attempt(() => write(m, 8, new Uint8Array(16)))
        m.protect('r')
        out.rRead = attempt(() => read(m, 0, new Uint8Array(16)))
        out.rWrite = attempt(() => write(m, 0, new Uint8Array(16)))
        m.protect('rw')
        m.protect('none', P, P)
        const target = new Uint8Array(3 * P)
        out.partialRead = attempt(() => read(m, 0, target))
        out.copiedBeforeTheHole = target[0] === 7 && target[P - 1] === 7 && target[P] === 0
        out.partialWrite = attempt(() => write(m, 100, new Uint8Array(2 * P).fill(9)))
        out.afterHole = attempt(() => read(m, 2 * P, new Uint8Array(P)))
        m.protect('rw')
        out.restoredRead = attempt(() => read(m, 0, new Uint8Array(3 * P)))
        out.restoredWrite = attempt(() => write(m, 0, new Uint8Array(3 * P)))
        m.unmap()
        console.log(JSON.stringify(out))
      `)
      expect(r.signal).toBeNull()
      const out = lastJson(r)
      const efault = (bytes: number, syscall: RegExp) => ({
        name: 'UffdError',
        code: 'EFAULT',
        bytes,
        syscall: expect.stringMatching(syscall),
      })
      // 'auto' uses process_vm_readv/writev, or the pipe where seccomp forbids them (Docker's
      // default profile without CAP_SYS_PTRACE).
      const readCall = method === 'pipe' ? /^write$/ : /^(process_vm_readv|write)$/
      const writeCall = method === 'pipe' ? /^read$/ : /^(process_vm_writev|read)$/
      expect(out).toEqual({
        noneRead: efault(0, readCall),
        noneWrite: efault(0, writeCall),
        rRead: { ok: 16 },
        rWrite: efault(0, writeCall),
        partialRead: efault(PAGE_SIZE, readCall),
        copiedBeforeTheHole: true,
        partialWrite: efault(PAGE_SIZE - 100, writeCall),
        afterHole: { ok: PAGE_SIZE },
        restoredRead: { ok: 3 * PAGE_SIZE },
        restoredWrite: { ok: 3 * PAGE_SIZE },
      })
      expect(r.code).toBe(0)
    })
  }
})

describe('range() and at()', () => {
  it('give checked sub-ranges and addresses', () => {
    const m = track(Mapping.anonymous(4 * PAGE_SIZE))
    expect(m.range()).toEqual({ address: m.address, length: 4 * PAGE_SIZE })
    expect(m.range(PAGE_SIZE)).toEqual({ address: m.address + BigInt(PAGE_SIZE), length: 3 * PAGE_SIZE })
    expect(m.range(PAGE_SIZE, PAGE_SIZE)).toEqual({ address: m.address + BigInt(PAGE_SIZE), length: PAGE_SIZE })
    expect(m.at(4 * PAGE_SIZE)).toBe(m.address + BigInt(4 * PAGE_SIZE)) // one past the end is an address
    expect(() => m.at(4 * PAGE_SIZE + 1)).toThrow(RangeError)
    expect(() => m.range(1, PAGE_SIZE)).toThrow(/not aligned/)
    expect(() => m.range(0, 5)).toThrow(/not a multiple of the page size/)
    expect(() => m.range(0, 5 * PAGE_SIZE)).toThrow(/outside the mapping/)
  })
})

describe('unmap()', () => {
  it('detaches the buffer first (views become empty), then munmaps; idempotent', () => {
    const m = Mapping.anonymous(2 * PAGE_SIZE)
    const buf = m.buffer
    const view = new Uint32Array(buf)
    view[0] = 1
    const address = m.address
    expect(mapsLine(address)).toBeDefined()
    m.unmap()
    expect(m.unmapped).toBe(true)
    expect(buf.byteLength).toBe(0)
    expect(view.length).toBe(0)
    expect(view[0]).toBeUndefined() // no access to unmapped memory
    expect(mapsLine(address)).toBeUndefined()
    m.unmap()
    m[Symbol.dispose]()
  })

  it('closes the memfd of a memfd mapping', () => {
    const m = Mapping.memfd(PAGE_SIZE, { name: 'closed-on-unmap' })
    const fd = m.fd
    expect(fs.readlinkSync(`/proc/self/fd/${fd}`)).toMatch(/closed-on-unmap/)
    m.unmap()
    let link = ''
    try {
      link = fs.readlinkSync(`/proc/self/fd/${fd}`)
    } catch {
      /* closed */
    }
    expect(link).not.toMatch(/closed-on-unmap/)
  })

  it('every use after unmap is a UffdError EBADF naming the operation', () => {
    const m = Mapping.memfd(PAGE_SIZE)
    m.unmap()
    for (const [op, f] of [
      ['buffer', () => m.buffer],
      ['fd', () => m.fd],
      ['read', () => m.read(0, new Uint8Array(1))],
      ['write', () => m.write(0, new Uint8Array(1))],
      ['madvise', () => m.madvise('dontneed')],
      ['protect', () => m.protect('r')],
      ['alias', () => m.alias()],
    ] as Array<[string, () => unknown]>) {
      const err = expectUffdError(f, 'EBADF', { syscall: `mapping.${op}` })
      expect(err).toBeInstanceOf(UffdError)
      expect(err.message).toMatch(/unmapped/)
    }
  })
})
