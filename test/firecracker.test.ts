// The Firecracker-compatible handler against a guest child process that does what Firecracker
// does (map, register MISSING + EVENT_REMOVE, send JSON + uffd, touch, verify, MADV_DONTNEED),
// and against every kind of malformed handshake, sent from this process.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import {
  FirecrackerHandler,
  Mapping,
  PAGE_SIZE,
  Userfaultfd,
  parseRegions,
  sendFds,
  type ConnectionStats,
  type GuestRegion,
} from '../src'
import { writeSnapshot } from '../src/cli/demo/snapshot'
import { handlerMetrics } from '../src/firecracker/metrics'
import { touch } from '../src/testing'
import { dist, killChildren, runGuest, runNode } from './helpers/children'
import { until } from './helpers/fault-server'
import { execFileSync } from 'node:child_process'
import { timeScale } from './helpers/children'

const MEM_SIZE = 8 << 20
let dir: string
let memFile: string
let socketCounter = 0
const handlers: FirecrackerHandler[] = []
const cleanup: Array<() => void> = []

const openFds = (): number => fs.readdirSync('/proc/self/fd').length
const fdList = (): string[] =>
  fs.readdirSync('/proc/self/fd').map((f) => {
    try {
      return `${f} ${fs.readlinkSync(`/proc/self/fd/${f}`)}`
    } catch {
      return f
    }
  })

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fc-handler-'))
  memFile = path.join(dir, 'mem')
  writeSnapshot(memFile, MEM_SIZE)
})

afterEach(async () => {
  killChildren()
  for (const f of cleanup.splice(0).reverse()) {
    try {
      f()
    } catch {
      /* gone */
    }
  }
  for (const h of handlers.splice(0)) await h.close()
})

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

async function listen(
  options: Partial<Parameters<typeof FirecrackerHandler.listen>[0]> = {},
): Promise<FirecrackerHandler> {
  const h = await FirecrackerHandler.listen({
    socketPath: path.join(dir, `s${socketCounter++}`),
    memFile,
    handshakeTimeout: 2000,
    ...options,
  })
  handlers.push(h)
  return h
}

function nextEnd(h: FirecrackerHandler): Promise<{ stats: ConnectionStats; error?: Error }> {
  return new Promise((resolve) => h.once('end', (stats: ConnectionStats, error?: Error) => resolve({ stats, error })))
}

async function connect(h: FirecrackerHandler): Promise<net.Socket> {
  const s = net.connect(h.socketPath)
  s.pause()
  s.on('error', () => {
    /* the handler may reset it */
  })
  cleanup.push(() => s.destroy())
  await new Promise((r) => s.once('connect', r))
  return s
}

/** A uffd of this process with `pages` registered pages, and the region JSON describing them. */
function peerMemory(pages = 16): { uffd: Userfaultfd; map: Mapping; region: Record<string, number> } {
  const uffd = Userfaultfd.open()
  const map = Mapping.anonymous(pages * PAGE_SIZE)
  uffd.register(map)
  cleanup.push(() => {
    uffd.close()
    map.unmap()
  })
  return {
    uffd,
    map,
    region: {
      base_host_virt_addr: Number(map.address),
      size: map.length,
      offset: 0,
      page_size: PAGE_SIZE,
      page_size_kib: PAGE_SIZE,
    },
  }
}

/** Sends one raw handshake and returns the error the handler ended that connection with. */
async function rejected(
  h: FirecrackerHandler,
  payload: string | Buffer,
  fds: number[],
  closeAfter = false,
): Promise<Error | undefined> {
  const ended = nextEnd(h)
  const s = await connect(h)
  const closed = new Promise((r) => s.once('close', r))
  if (payload.length > 0) {
    // A refused peer may find the connection already closed.
    await sendFds(s, payload, fds).catch((e: { code?: string }) => {
      if (e.code !== 'EPIPE' && e.code !== 'ECONNRESET') throw e
    })
  }
  if (closeAfter) s.end()
  s.resume() // read, to see the handler's hang-up
  const { error } = await ended
  await closed // the handler closed the connection
  return error
}

describe('Firecracker handler: serving a guest', () => {
  it('serves every page lazily from the snapshot; zero pages after MADV_DONTNEED (onRemove: zero)', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const h = await listen()
    const ready = new Promise<ConnectionStats>((r) => h.once('ready', r))
    const ended = nextEnd(h)
    const g = await runGuest({ socket: h.socketPath, memFile, dontneed: 1 << 20, regions: 2 })
    expect(g.stderr).toBe('')
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, zeroMismatches: 0, verifiedBytes: MEM_SIZE, zeroChecked: 256 })
    const peer = await ready
    expect(peer.peer.pid).toBe(g.result!.pid)
    expect(peer.regions).toBe(2)
    const { stats, error } = await ended // the guest's exit ends the connection (pidfd)
    expect(error).toBeUndefined()
    expect(stats).toMatchObject({ pagesServed: MEM_SIZE / PAGE_SIZE, zeroPages: 256, removes: 1 })
    expect(h.stats().connections).toEqual({ active: 0, total: 1, failed: 0 })
  })

  it('onRemove: unregister: the removed range faults no more and reads zeros', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const h = await listen({ onRemove: 'unregister', readMethod: 'pread' })
    const ended = nextEnd(h)
    const g = await runGuest({
      socket: h.socketPath,
      memFile,
      dontneed: 2 << 20,
      legacyPageSize: true,
      size: 4 << 20,
      offset: 4 << 20,
    })
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, zeroMismatches: 0, zeroChecked: 512 })
    const { stats, error } = await ended
    expect(error).toBeUndefined()
    // every page from the snapshot, none as zeros (the kernel's own after the unregister); fewer
    // faults than pages: the FaultServer fills around each fault
    expect(stats).toMatchObject({ pagesServed: 1024, zeroPages: 0, removes: 1 })
    expect(stats.faults).toBeGreaterThan(0)
    expect(stats.faults).toBeLessThan(1024)
  })

  it('serves a huge-page guest (page_size 2 MiB) a huge page at a time, zero-filling after MADV_DONTNEED', {
    timeout: 30_000 * timeScale,
  }, async (ctx) => {
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)
    if (free < 8) ctx.skip(`needs 8 free huge pages (HugePages_Free: ${free}; echo 64 > /proc/sys/vm/nr_hugepages)`)
    const h = await listen()
    const ended = nextEnd(h)
    const g = await runGuest({
      socket: h.socketPath,
      memFile,
      hugetlb: true,
      size: 8 << 20,
      dontneed: 2 << 20,
      regions: 2,
    })
    expect(g.stderr).toBe('')
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, zeroMismatches: 0, verifiedBytes: 8 << 20, zeroChecked: 512 })
    const { stats, error } = await ended
    expect(error).toBeUndefined()
    // 4 huge pages served, each faulted once (every 4 KiB touch after the first finds it mapped)
    expect(stats).toMatchObject({ pagesServed: 4, bytesServed: 8 << 20, zeroPages: 1, removes: 1, faults: 5 })
  })

  it('serves a memfd hugetlb guest (MFD_HUGETLB, shared) from two threads in 2 MiB copies', {
    timeout: 30_000 * timeScale,
  }, async (ctx) => {
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)
    if (free < 8) ctx.skip(`needs 8 free huge pages (HugePages_Free: ${free}; echo 64 > /proc/sys/vm/nr_hugepages)`)
    const h = await listen({ readMethod: 'pread' })
    const ready = new Promise<GuestRegion[]>((r) => h.once('ready', (_c, regions) => r(regions)))
    const ended = nextEnd(h)
    const g = await runGuest({ socket: h.socketPath, memFile, hugetlb: true, memfd: true, size: 8 << 20, threads: 2 })
    expect(g.stderr).toBe('')
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, verifiedBytes: 8 << 20 })
    expect((await ready).every((r) => r.pageSize === 2 << 20)).toBe(true)
    const { stats, error } = await ended
    expect(error).toBeUndefined()
    // 4 huge pages, each put in place by one 2 MiB copy (a 4 KiB one would be EINVAL on hugetlbfs)
    expect(stats).toMatchObject({ pagesServed: 4, bytesServed: 8 << 20, zeroPages: 0 })
  })

  for (const readMethod of ['pread', 'mmap'] as const) {
    it(`a memory file truncated under the handler (${readMethod}): the pages past its new end are errors with their address, never stale bytes or zeros; served once it is whole again`, {
      timeout: 30_000 * timeScale,
    }, async () => {
      const size = 4 << 20
      const file = path.join(dir, `truncated-${readMethod}`)
      writeSnapshot(file, size)
      const h = await listen({ memFile: file, readMethod })
      const warnings: Array<Error & { code?: string; address?: bigint }> = []
      let firstWarning: () => void = () => {}
      const warned = new Promise<void>((r) => {
        firstWarning = r
      })
      h.on('warning', (_c, err) => {
        warnings.push(err as Error & { code?: string; address?: bigint })
        firstWarning()
      })
      const ready = new Promise<GuestRegion[]>((r) => h.once('ready', (_c, regions) => r(regions)))
      fs.truncateSync(file, size / 2)
      // A child touches every page, in order: the second half is past the file's new end.
      const guest = runGuest({ socket: h.socketPath, memFile: file, size }, 20_000)
      const [region] = await ready
      await warned
      // The faulting thread waits (no bytes were made up for it): the file whole again, the
      // engine's next try serves the snapshot's own bytes.
      writeSnapshot(file, size)
      const g = await guest
      expect(g.stderr).toBe('')
      expect(g.code).toBe(0)
      expect(g.result).toMatchObject({ mismatches: 0, verifiedBytes: size })
      const w = warnings[0]
      expect(w.code).toBe(readMethod === 'pread' ? 'EIO' : 'EFAULT')
      expect(w.message).toMatch(readMethod === 'pread' ? /short read/ : /cannot be read/)
      expect(w.address).toBeGreaterThanOrEqual(region.base + BigInt(size / 2))
      expect(w.address).toBeLessThan(region.base + BigInt(size))
    })
  }

  it("onSourceError: zero: a page past a truncated memory file's end reads as zeros, with a warning saying so; bad values refused", {
    timeout: 30_000 * timeScale,
  }, async () => {
    await expect(listen({ onSourceError: 'ignore' as 'zero' })).rejects.toThrow(/onSourceError/)
    const size = 1 << 20
    const file = path.join(dir, 'truncated-zero')
    writeSnapshot(file, size)
    const h = await listen({ memFile: file, readMethod: 'pread', onSourceError: 'zero' })
    const warnings: Error[] = []
    h.on('warning', (_c, err) => warnings.push(err))
    fs.truncateSync(file, size / 2)
    const { uffd, map, region } = peerMemory(size / PAGE_SIZE)
    const s = await connect(h)
    const ready = new Promise((r) => h.once('ready', r))
    await sendFds(s, JSON.stringify([region]), [uffd.fd])
    await ready
    // From a native thread: this one must not block in a fault.
    const { values } = await touch([map.address + BigInt(size - PAGE_SIZE), map.address])
    expect(values[0]).toBe(0n) // past the new end: zeros, as asked
    expect(values[1]).not.toBe(0n) // before it: the snapshot's bytes
    expect(warnings.length).toBeGreaterThan(0)
    expect(warnings[0].message).toMatch(/short read.*served as zeros/)
  })

  it('serves two guests at once, several threads each', { timeout: 30_000 * timeScale }, async () => {
    const h = await listen()
    const [a, b] = await Promise.all([
      runGuest({ socket: h.socketPath, memFile, threads: 2, size: 4 << 20 }),
      runGuest({ socket: h.socketPath, memFile, threads: 2, size: 4 << 20, offset: 4 << 20 }),
    ])
    expect([a.code, b.code]).toEqual([0, 0])
    expect(a.result).toMatchObject({ mismatches: 0, verifiedBytes: 4 << 20 })
    expect(b.result).toMatchObject({ mismatches: 0, verifiedBytes: 4 << 20 })
    await new Promise((r) => setTimeout(r, 50))
    expect(h.stats()).toMatchObject({ pagesServed: 2048, connections: { total: 2, failed: 0 } })
  })

  it('survives a guest that dies mid-stream, and serves the next one', { timeout: 30_000 * timeScale }, async () => {
    const h = await listen()
    const ended = nextEnd(h)
    const dead = await runGuest({ socket: h.socketPath, memFile, dieMidway: true, threads: 2 })
    expect(dead.signal).toBe('SIGKILL')
    const { error } = await ended
    expect(error).toBeUndefined() // ESRCH or the pidfd: a clean end
    const g = await runGuest({ socket: h.socketPath, memFile, size: 2 << 20 })
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0 })
  })
})

describe('Firecracker handler: malformed handshakes end only that connection', () => {
  const cases: Array<[string, (r: Record<string, number>) => string, RegExp]> = [
    ['malformed JSON', () => '[{"base_host_virt_addr": 1,,]', /malformed JSON/],
    ['not an array', () => '{"regions": []}', /JSON array/],
    ['no regions', () => '[]', /no memory regions/],
    [
      'overlapping regions',
      (r) => JSON.stringify([r, { ...r, base_host_virt_addr: r.base_host_virt_addr + PAGE_SIZE, offset: 0 }]),
      /overlaps/,
    ],
    ['beyond the file', (r) => JSON.stringify([{ ...r, offset: MEM_SIZE - PAGE_SIZE }]), /beyond the memory file/],
    [
      'unaligned address',
      (r) => JSON.stringify([{ ...r, base_host_virt_addr: r.base_host_virt_addr + 8 }]),
      /not aligned/,
    ],
    ['unaligned offset', (r) => JSON.stringify([{ ...r, offset: 100 }]), /offset 100 is not aligned/],
    ['zero-sized', (r) => JSON.stringify([{ ...r, size: 0 }]), /zero-sized/],
    ['negative size', (r) => JSON.stringify([{ ...r, size: -4096 }]), /non-negative integer/],
    [
      'missing field',
      (r) => JSON.stringify([{ size: r.size, offset: 0, page_size: PAGE_SIZE }]),
      /missing "base_host_virt_addr"/,
    ],
    ['page sizes disagree', (r) => JSON.stringify([{ ...r, page_size_kib: 8192 }]), /disagrees/],
    [
      'unsupported page size',
      (r) => JSON.stringify([{ ...r, page_size: 12345, page_size_kib: undefined }]),
      /unsupported page size/,
    ],
  ]
  for (const [name, body, pattern] of cases) {
    it(name, { timeout: 10_000 * timeScale }, async () => {
      const h = await listen()
      const { uffd, region } = peerMemory()
      const error = await rejected(h, body(region), [uffd.fd])
      expect(error?.message).toMatch(pattern)
      expect(h.stats().connections).toMatchObject({ active: 0, failed: 1 })
    })
  }

  it('missing fd', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen()
    const { region } = peerMemory()
    expect((await rejected(h, JSON.stringify([region]), []))?.message).toMatch(/no fd|exactly one fd/)
  })

  it('two fds', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen()
    const { uffd, region } = peerMemory()
    const memfd = Mapping.memfd(PAGE_SIZE)
    cleanup.push(() => memfd.unmap())
    expect((await rejected(h, JSON.stringify([region]), [uffd.fd, memfd.fd]))?.message).toMatch(/exactly one fd.*2 fds/)
  })

  it('an fd that is not a userfaultfd', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen()
    const { region } = peerMemory()
    const memfd = Mapping.memfd(PAGE_SIZE)
    cleanup.push(() => memfd.unmap())
    expect((await rejected(h, JSON.stringify([region]), [memfd.fd]))?.message).toMatch(/not a userfaultfd/)
  })

  it('a message too large', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen({ maxMessageBytes: 4096 })
    const { uffd, region } = peerMemory()
    const many = JSON.stringify(
      Array.from({ length: 100 }, (_, i) => ({ ...region, base_host_virt_addr: region.base_host_virt_addr + i * 1e9 })),
    )
    expect((await rejected(h, many, [uffd.fd]))?.message).toMatch(/larger than 4096/)
  })

  it('incomplete JSON then hang-up; silence until the handshake timeout', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen({ handshakeTimeout: 300 })
    const { uffd, region } = peerMemory()
    expect((await rejected(h, JSON.stringify([region]).slice(0, 20), [uffd.fd], true))?.message).toMatch(
      /mid-handshake/,
    )
    expect((await rejected(h, '', []))?.message).toMatch(/incomplete handshake after 300 ms/)
  })

  it('a handshake split over two sends is accepted; an fd on the second piece is not', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const h = await listen()
    const { uffd, region } = peerMemory()
    const text = JSON.stringify([region])
    const s = await connect(h)
    const ready = new Promise<ConnectionStats>((r) => h.once('ready', r))
    await sendFds(s, text.slice(0, 10), [uffd.fd])
    await new Promise((r) => setTimeout(r, 30))
    await sendFds(s, text.slice(10), [])
    expect((await ready).regions).toBe(1)
    const other = peerMemory()
    const memfd = Mapping.memfd(PAGE_SIZE)
    cleanup.push(() => memfd.unmap())
    const ended = nextEnd(h)
    const s2 = await connect(h)
    await sendFds(s2, JSON.stringify([other.region]).slice(0, 10), [other.uffd.fd])
    await new Promise((r) => setTimeout(r, 30))
    await sendFds(s2, JSON.stringify([other.region]).slice(10), [memfd.fd])
    expect((await ended).error?.message).toMatch(/unexpected fd/)
  })

  it('a valid handshake split in two at EVERY byte position (also inside a multibyte character) is accepted', {
    timeout: 60_000 * timeScale,
  }, async () => {
    // Framed by the JSON grammar on bytes and decoded once: no guessing from V8's error text,
    // no character broken at a piece boundary (the "é" is two bytes).
    const h = await listen()
    const { uffd, region } = peerMemory()
    const body = Buffer.from(JSON.stringify([{ ...region, vm: 'guest-é' }]))
    expect(body.length).toBeGreaterThan(100)
    const failures: string[] = []
    for (let at = 1; at < body.length; at++) {
      const s = await connect(h)
      const done = new Promise<string | undefined>((resolve) => {
        const onReady = (): void => {
          h.off('end', onEnd)
          resolve(undefined)
        }
        const onEnd = (_: unknown, error?: Error): void => {
          h.off('ready', onReady)
          resolve(error?.message ?? 'ended')
        }
        h.once('ready', onReady)
        h.once('end', onEnd)
      })
      await sendFds(s, body.subarray(0, at), [uffd.fd])
      await new Promise((r) => setTimeout(r, 2)) // most often, two separate reads by the handler
      // A handler that refused the first piece has closed the connection: the end event says why.
      await sendFds(s, body.subarray(at), []).catch(() => {})
      const error = await done
      if (error !== undefined) failures.push(`split at ${at}: ${error}`)
      s.destroy()
    }
    expect(failures).toEqual([])
  })

  it('bytes that are not UTF-8 are a protocol error, not replacement characters', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const h = await listen()
    const { uffd, region } = peerMemory()
    const text = JSON.stringify([{ ...region, vm: 'X' }])
    const bytes = Buffer.from(text)
    bytes[text.indexOf('X')] = 0xff
    expect((await rejected(h, bytes, [uffd.fd]))?.message).toMatch(/not valid UTF-8/)
  })

  it('a peer that is not allowed is refused', { timeout: 10_000 * timeScale }, async () => {
    const h = await listen({ allow: (peer) => peer.uid === 12345 })
    const { uffd, region } = peerMemory()
    expect((await rejected(h, JSON.stringify([region]), [uffd.fd]))?.message).toMatch(/not allowed/)
  })

  it('keeps serving a good guest while bad peers come and go; fd count unchanged after 200 connections', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const { uffd, region } = peerMemory()
    const memfd = Mapping.memfd(PAGE_SIZE)
    cleanup.push(() => memfd.unmap())
    const baseline = openFds()
    const h = await listen({ handshakeTimeout: 1000 })
    const listening = openFds() // + the snapshot's fd and the listening socket
    const guest = runGuest({ socket: h.socketPath, memFile, size: 4 << 20, threads: 2 }, 30_000)
    await new Promise((r) => h.once('ready', r))
    const bodies: Array<[string, number[]]> = [
      ['not json', [uffd.fd]],
      [JSON.stringify([{ ...region, size: 0 }]), [uffd.fd]],
      [JSON.stringify([region]), [uffd.fd, memfd.fd]],
      [JSON.stringify([region]), []],
      [JSON.stringify([region]), [memfd.fd]],
    ]
    for (let i = 0; i < 150; i++) {
      const [body, fds] = bodies[i % bodies.length]
      await rejected(h, body, fds)
    }
    const g = await guest
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0 })
    for (let i = 0; i < 100 && h.stats().connections.active > 0; i++) await new Promise((r) => setTimeout(r, 10))
    await new Promise((r) => setTimeout(r, 50)) // libuv closes handles (sockets, watchers' dups) in its close phase
    if (openFds() !== listening) console.log(fdList().join('\n'))
    expect(openFds()).toBe(listening)
    // 50 valid handshakes from this process: they stay connected until the handler closes.
    for (let i = 0; i < 50; i++) {
      const s = await connect(h)
      const ready = new Promise((r) => h.once('ready', r))
      await sendFds(s, JSON.stringify([region]), [uffd.fd])
      await ready
      s.destroy()
    }
    expect(h.stats().connections).toMatchObject({ total: 201, failed: 150, active: 50 })
    await h.close()
    await new Promise((r) => setTimeout(r, 50)) // libuv closes handles (sockets, watchers' dups) in its close phase
    expect(openFds()).toBe(baseline)
  })
})

describe('Firecracker handler: metrics', () => {
  it("metricsSources(): each open connection's FaultServer per-range metrics, labelled with its connection", {
    timeout: 30_000 * timeScale,
  }, async () => {
    const h = await listen()
    const { uffd, map, region } = peerMemory(16)
    const s = await connect(h)
    const ready = new Promise<ConnectionStats>((r) => h.once('ready', (c) => r(c)))
    await sendFds(s, JSON.stringify([region]), [uffd.fd])
    const { id } = await ready
    // The faults come from a native thread (this thread must not block in one).
    const pages = Array.from({ length: 16 }, (_, i) => map.address + BigInt(i * PAGE_SIZE))
    await touch(pages)
    // A touch returns once its page is copied in, which may be just before the engine counts it present.
    await until(() => h.progress().pagesPresent === 16, 5000, 'the 16 pages present')
    const sources = h.metricsSources()
    expect(sources).toHaveLength(1)
    expect(sources[0].labels).toEqual({ connection: String(id) })
    const text = handlerMetrics(h)
    const sample = (name: string): number => {
      const m = new RegExp(`^${name}\\{[^}]*connection="${id}"[^}]*\\} (\\S+)$`, 'm').exec(text)
      expect(m, `${name} for connection ${id} in:\n${text}`).not.toBeNull()
      return Number(m![1])
    }
    expect(sample('userfaultfd_range_faults_total')).toBeGreaterThan(0)
    expect(sample('userfaultfd_range_pages_present')).toBe(16)
    expect(sample('userfaultfd_range_pages')).toBe(16)
    expect(sample('userfaultfd_faults_total')).toBeGreaterThan(0)
    expect(text).toMatch(new RegExp(`^userfaultfd_fault_seconds_count\\{[^}]*connection="${id}"`, 'm'))
    await h.close() // ends the connection (a peer in this process stays connected until then)
    expect(h.metricsSources()).toEqual([])
  })
})

describe('Firecracker handler: lifecycle', () => {
  it('replaces a stale socket file, refuses a live one, never unlinks a non-socket', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const h = await listen()
    await expect(FirecrackerHandler.listen({ socketPath: h.socketPath, memFile })).rejects.toMatchObject({
      code: 'EADDRINUSE',
    })
    const plain = path.join(dir, 'not-a-socket')
    fs.writeFileSync(plain, 'keep me')
    await expect(FirecrackerHandler.listen({ socketPath: plain, memFile })).rejects.toMatchObject({
      code: 'EADDRINUSE',
    })
    expect(fs.readFileSync(plain, 'utf8')).toBe('keep me')
    // A stale socket: bound by a process that was killed before it could unlink it.
    const stale = path.join(dir, 'stale.sock')
    const killed = await runNode([
      '-e',
      `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ])
    expect(killed.signal).toBe('SIGKILL')
    expect(fs.lstatSync(stale).isSocket()).toBe(true)
    const replaced = await listen({ socketPath: stale })
    expect(replaced.socketPath).toBe(stale)
  })

  it('rejects handshakeTimeout and maxMessageBytes that are not integers in range, at listen()', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const socketPath = path.join(dir, 'limits')
    for (const name of ['handshakeTimeout', 'maxMessageBytes'] as const) {
      for (const bad of [-1, 0, Number.NaN, 1.5, 2 ** 40, Number.POSITIVE_INFINITY]) {
        await expect(FirecrackerHandler.listen({ socketPath, memFile, [name]: bad })).rejects.toThrow(
          new RegExp(`^${name} must be an integer number of (milliseconds|bytes) from \\d+ to \\d+ \\(got number`),
        )
      }
      await expect(FirecrackerHandler.listen({ socketPath, memFile, [name]: 'x' as never })).rejects.toThrow(TypeError)
    }
    // 5e9 ms used to be accepted, and then every connection failed at once (a timer cannot wait that long).
    await expect(FirecrackerHandler.listen({ socketPath, memFile, handshakeTimeout: 5_000_000_000 })).rejects.toThrow(
      RangeError,
    )
    expect(fs.existsSync(socketPath)).toBe(false) // refused before listening
    const h = await listen({ handshakeTimeout: 2 ** 31 - 1, maxMessageBytes: 2 })
    expect([h.handshakeTimeout, h.maxMessageBytes]).toEqual([2 ** 31 - 1, 2])
  })

  it('refuses a FIFO, a directory or a character device as the memory file at once (a FIFO used to block open(2) forever)', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const fifo = path.join(dir, 'fifo')
    execFileSync('mkfifo', [fifo])
    // In a child: before the fix, this thread blocked in open(2) for good.
    const r = await runNode(
      [
        '-e',
        `
      const { FirecrackerHandler } = require(${JSON.stringify(path.join(dist, 'index.js'))})
      ;(async () => {
        for (const memFile of ${JSON.stringify([fifo, dir, '/dev/null'])}) {
          await FirecrackerHandler.listen({ socketPath: memFile + '.sock', memFile }).then(
            () => console.log('accepted'),
            (e) => console.log(e.name + ': ' + e.message),
          )
        }
      })()
    `,
      ],
      10_000,
    )
    expect(r.stdout.split('\n').filter(Boolean)).toEqual([
      `TypeError: memory file ${fifo} is a FIFO (named pipe): it must be a regular file or a block device`,
      `TypeError: memory file ${dir} is a directory: it must be a regular file or a block device`,
      'TypeError: memory file /dev/null is a character device: it must be a regular file or a block device',
    ])
  })

  it('serves from a block device (its size comes from /sys, not stat)', {
    timeout: 30_000 * timeScale,
  }, async (ctx) => {
    if (process.getuid?.() !== 0 || !fs.existsSync('/dev/loop-control')) {
      ctx.skip('needs root and /dev/loop-control to attach a loop device')
    }
    let loop: string
    try {
      loop = execFileSync('losetup', ['--find', '--show', '--read-only', memFile], { encoding: 'utf8' }).trim()
    } catch (err) {
      ctx.skip(`losetup could not attach a loop device: ${(err as Error).message}`)
      return
    }
    cleanup.push(() => execFileSync('losetup', ['--detach', loop]))
    const h = await listen({ memFile: loop })
    expect(h.snapshot.size).toBe(MEM_SIZE)
    const guest = await runGuest({ socket: h.socketPath, memFile, size: 1 << 20, threads: 1 }, 20_000)
    expect(guest.code).toBe(0)
    expect(guest.result).toMatchObject({ mismatches: 0 })
  })

  it('rejects bad options and an empty memory file', { timeout: 10_000 * timeScale }, async () => {
    await expect(FirecrackerHandler.listen({ socketPath: '', memFile })).rejects.toThrow(TypeError)
    await expect(
      FirecrackerHandler.listen({ socketPath: path.join(dir, 'x'), memFile, onRemove: 'maybe' as 'zero' }),
    ).rejects.toThrow(TypeError)
    const empty = path.join(dir, 'empty')
    fs.writeFileSync(empty, '')
    await expect(FirecrackerHandler.listen({ socketPath: path.join(dir, 'y'), memFile: empty })).rejects.toThrow(
      /empty/,
    )
    await expect(
      FirecrackerHandler.listen({ socketPath: path.join(dir, 'z'), memFile: path.join(dir, 'absent') }),
    ).rejects.toMatchObject({ code: 'ENOENT' })
  })
})

describe('parseRegions', () => {
  it('accepts page_size_kib only (older senders: bytes despite the name, or literal KiB) and sorts regions by address', () => {
    const regions = parseRegions(
      JSON.stringify([
        { base_host_virt_addr: 0x200000, size: 8192, offset: 8192, page_size_kib: 4096 },
        { base_host_virt_addr: 0x100000, size: 8192, offset: 0, page_size_kib: 4 },
      ]),
      { fileSize: 16384 },
    )
    expect(regions.map((r) => [r.base, r.pageSize, r.offset])).toEqual([
      [0x100000n, 4096, 0],
      [0x200000n, 4096, 8192],
    ])
    const huge = parseRegions(
      '[{"base_host_virt_addr": 2097152, "size": 2097152, "offset": 0, "page_size": 2097152, "page_size_kib": 2097152}]',
      { fileSize: 2097152 },
    )
    expect(huge[0].pageSize).toBe(2097152)
  })

  it('rejects unsafe integers and non-objects', () => {
    expect(() =>
      parseRegions('[{"base_host_virt_addr": 18446744073709551615, "size": 4096, "offset": 0, "page_size": 4096}]', {
        fileSize: 4096,
      }),
    ).toThrow(/too large/)
    expect(() => parseRegions('[1]', { fileSize: 4096 })).toThrow(/must be an object/)
  })
})
