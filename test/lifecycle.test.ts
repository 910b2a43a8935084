// Lifecycle: close() is idempotent and final, nothing leaks across 1000 open/close (fds, maps),
// and garbage collection munmaps exactly once (checked in a child run with --expose-gc).
import { describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import { Mapping, PAGE_SIZE, UffdError, Userfaultfd, isUserfaultfd } from '../src/index'
import { countFds, expectUffdError, lastJson, runScript, useCleanup } from './helpers/uffd'
import { env } from './helpers/env'
import { timeScale } from './helpers/children'

const track = useCleanup()
const mapsLines = (): string[] => fs.readFileSync('/proc/self/maps', 'utf8').split('\n')
const memfdMapsCount = (): number => mapsLines().filter((l) => l.includes('/memfd:')).length
const isMemfdLine = (start: string): boolean =>
  mapsLines().some((l) => l.startsWith(`${start}-`) && l.includes('/memfd:'))

describe('close()', () => {
  it('is idempotent; closed and Symbol.dispose agree; the fd is really closed', () => {
    const uffd = Userfaultfd.open()
    const fd = uffd.fd
    expect(uffd.closed).toBe(false)
    uffd.close()
    expect(uffd.closed).toBe(true)
    expect(isUserfaultfd(fd)).toBe(false)
    uffd.close()
    uffd[Symbol.dispose]()
    const other = Userfaultfd.open()
    other[Symbol.dispose]()
    expect(other.closed).toBe(true)
  })

  it('every use after close is a UffdError EBADF naming the call', () => {
    const uffd = Userfaultfd.open()
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.close()
    const calls: Array<[string, () => unknown]> = [
      ['fd', () => uffd.fd],
      ['ioctl(UFFDIO_REGISTER)', () => uffd.register(m)],
      ['ioctl(UFFDIO_UNREGISTER)', () => uffd.unregister(m)],
      ['ioctl(UFFDIO_WAKE)', () => uffd.wake(m)],
      ['ioctl(UFFDIO_COPY)', () => uffd.copy(m, new Uint8Array(PAGE_SIZE))],
      ['ioctl(UFFDIO_ZEROPAGE)', () => uffd.zeropage(m)],
      ['ioctl(UFFDIO_CONTINUE)', () => uffd.continue(m)],
      ['ioctl(UFFDIO_WRITEPROTECT)', () => uffd.writeProtect(m)],
      ['ioctl(UFFDIO_POISON)', () => uffd.poison(m)],
      ['ioctl(UFFDIO_MOVE)', () => uffd.move(m, m, PAGE_SIZE)],
      ['read', () => uffd.read()],
      ['events', () => uffd.events()],
    ]
    for (const [syscall, call] of calls) {
      const err = expectUffdError(call, 'EBADF', { syscall, errno: 9 })
      expect(err.message).toMatch(/closed/)
    }
  })

  it('a closed uffd never acts on a new fd that reuses its number', () => {
    const a = Userfaultfd.open()
    const fd = a.fd
    a.close()
    const b = track(Userfaultfd.open())
    expect(b.fd).toBe(fd) // the lowest free number comes back
    const m = track(Mapping.anonymous(PAGE_SIZE))
    expectUffdError(() => a.register(m), 'EBADF')
    expectUffdError(() => b.zeropage(m), 'ENOENT') // a did not register it through b's fd
  })

  it('closing unregisters: the memory is ordinary again', () => {
    const uffd = Userfaultfd.open()
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    uffd.close()
    new Uint8Array(m.buffer)[0] = 1 // would hang if still registered
    const again = track(Userfaultfd.open())
    expect(() => again.register(m)).not.toThrow() // no EBUSY: nobody owns it
  })
})

describe('no leaks', () => {
  it('1000 open/close on both paths leave the fd count unchanged', { timeout: 30_000 * timeScale }, () => {
    const before = countFds()
    // both paths where both open; in a container often only one does (see helpers/env)
    const paths = (['syscall', 'device'] as const).filter((via) => env[via])
    for (let i = 0; i < 1000; i++) {
      const uffd = Userfaultfd.open({ via: paths[i % paths.length] })
      uffd.close()
    }
    expect(countFds()).toBe(before)
  })

  it('1000 failed opens (a feature the kernel lacks) leave the fd count unchanged', {
    timeout: 30_000 * timeScale,
  }, () => {
    const before = countFds()
    for (let i = 0; i < 1000; i++) {
      expect(() => Userfaultfd.open({ features: 1n << 60n })).toThrow(UffdError)
    }
    expect(countFds()).toBe(before)
  })

  it('1000 memfd mappings with aliases, unmapped, leave no fd and no mapping behind', {
    timeout: 30_000 * timeScale,
  }, () => {
    const fds = countFds()
    const memfdMaps = memfdMapsCount()
    const addresses = new Set<string>()
    for (let i = 0; i < 1000; i++) {
      const m = Mapping.memfd(PAGE_SIZE)
      const a = m.alias()
      void a.buffer
      addresses.add(m.address.toString(16)).add(a.address.toString(16))
      a.unmap()
      m.unmap()
    }
    expect(countFds()).toBe(fds)
    expect(memfdMapsCount()).toBe(memfdMaps)
    // (Counting every line of /proc/self/maps would also count the allocator's own growth.)
    const starts = fs
      .readFileSync('/proc/self/maps', 'utf8')
      .split('\n')
      .map((l) => l.split('-')[0])
    expect(starts.filter((start) => addresses.has(start) && isMemfdLine(start))).toEqual([])
  })
})

describe('garbage collection (child with --expose-gc)', () => {
  it('munmaps dropped Mappings once the buffer is gone too, closes memfds and uffds, never munmaps twice', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const r = await runScript(
      `
      const fs = require('fs')
      const mapped = (a) => fs.readFileSync('/proc/self/maps', 'utf8').split('\\n').some((l) => l.startsWith(a.toString(16) + '-'))
      const fdTo = (text) => fs.readdirSync('/proc/self/fd').some((fd) => { try { return fs.readlinkSync('/proc/self/fd/' + fd).includes(text) } catch { return false } })
      const collect = async () => {
        for (let i = 0; i < 10; i++) { global.gc(); await new Promise((r) => setImmediate(r)); await new Promise((r) => setTimeout(r, 5)) }
      }
      const P = uffd.PAGE_SIZE
      const out = {}
      process.on('warning', (w) => { out.warning = w.message })
      ;(async () => {
        // A dropped Mapping without a buffer.
        let a = uffd.Mapping.anonymous(4 * P); const aAddr = a.address; a = null
        // A dropped Mapping whose buffer lives on: the memory must stay mapped.
        let b = uffd.Mapping.anonymous(P); const bAddr = b.address; let bBuf = b.buffer; new Uint8Array(bBuf)[0] = 7; b = null
        // A dropped memfd Mapping: its memfd closes too.
        let c = uffd.Mapping.memfd(P, { name: 'gc-memfd' }); const cAddr = c.address; c = null
        // A dropped uffd: closed (with a warning).
        let u = uffd.Userfaultfd.open(); const ufd = u.fd; u = null
        await collect()
        Object.assign(out, { aMapped: mapped(aAddr), bMapped: mapped(bAddr), bValue: new Uint8Array(bBuf)[0],
          cMapped: mapped(cAddr), memfdOpen: fdTo('gc-memfd'), uffdOpen: uffd.isUserfaultfd(ufd) })
        bBuf = null
        await collect()
        out.bMappedAfter = mapped(bAddr)
        // unmap() then GC of the handle and buffer: the kernel reuses the address for the next
        // mapping, which a second munmap would tear down (and reading it would crash).
        let d = uffd.Mapping.anonymous(8 * P); const dAddr = d.address; let dBuf = d.buffer; d.unmap(); d = null
        const e = uffd.Mapping.anonymous(8 * P)
        e.write(0, Buffer.from('alive'))
        dBuf = null
        await collect()
        Object.assign(out, { reused: e.address === dAddr, eMapped: mapped(e.address), eText: Buffer.from(e.buffer, 0, 5).toString() })
        console.log(JSON.stringify(out))
      })().catch((err) => { console.error(err); process.exit(1) })`,
      { execArgv: ['--expose-gc'] },
    )
    expect(r.code, r.stderr).toBe(0)
    expect(lastJson(r)).toEqual({
      aMapped: false,
      bMapped: true,
      bValue: 7,
      cMapped: false,
      memfdOpen: false,
      uffdOpen: false,
      warning: expect.stringMatching(/closing fd \d+ on garbage collection/),
      bMappedAfter: false,
      reused: true,
      eMapped: true,
      eText: 'alive',
    })
  })
})
