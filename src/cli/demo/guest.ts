// A guest that behaves like Firecracker restoring a snapshot with a Uffd memory backend: maps
// guest memory, registers it (MISSING, with UFFD_EVENT_REMOVE), connects to the handler and
// sends the region JSON with its uffd attached, then touches pages from native threads,
// verifies every byte against the snapshot file, MADV_DONTNEEDs a range and checks that it
// reads zeros afterwards. Used by `userfaultfd demo` and the tests (as a child process).
import * as fs from 'node:fs'
import * as net from 'node:net'
import { Userfaultfd } from '../../core/userfaultfd'
import { Mapping, hugePageSize } from '../../core/mapping'
import { Feature, PAGE_SIZE } from '../../core/constants'
import { touch, pages } from '../../testing'
import { sendFds } from '../../ipc/fd-passing'

export interface GuestOptions {
  socket: string
  memFile: string
  /** guest memory size in bytes (default: the whole file) */
  size?: number
  /** split guest memory into this many regions (default 1), each its own mapping */
  regions?: number
  /** file offset of the first region (default 0) */
  offset?: number
  /** send page_size_kib only, as older Firecracker versions do (in bytes, despite the name) */
  legacyPageSize?: boolean
  /** native threads touching pages (default 1) */
  threads?: number
  /** touch every `stride`-th page only (default 1: all) */
  stride?: number
  /** bytes to MADV_DONTNEED (from the start of the first region) and expect zeros in, after */
  dontneed?: number
  /** back guest memory with huge pages (MAP_HUGETLB): regions get page_size = the huge page size */
  hugetlb?: boolean
  /** SIGKILL itself after touching this many pages in flight (the "dies mid-stream" test) */
  dieMidway?: boolean
}

export interface GuestResult {
  pid: number
  pages: number
  touched: number
  verifiedBytes: number
  mismatches: number
  zeroChecked: number
  zeroMismatches: number
  elapsedMs: number
  /** per-fault latency seen by the touching threads, in microseconds */
  latencyUs: number[]
}

export async function runGuest(options: GuestOptions): Promise<GuestResult> {
  const fileSize = fs.statSync(options.memFile).size
  const offset = options.offset ?? 0
  const size = options.size ?? fileSize - offset
  const count = options.regions ?? 1
  const pageSize = options.hugetlb ? hugePageSize() : PAGE_SIZE
  const per = Math.floor(size / count / pageSize) * pageSize
  const uffd = Userfaultfd.open({ features: Feature.EVENT_REMOVE })
  const maps: Array<{ map: Mapping; offset: number }> = []
  for (let i = 0; i < count; i++) {
    const map = Mapping.anonymous(per, { hugetlb: options.hugetlb === true })
    uffd.register(map, { missing: true })
    maps.push({ map, offset: offset + i * per })
  }
  const body = maps.map(({ map, offset }) =>
    options.legacyPageSize
      ? { base_host_virt_addr: Number(map.address), size: map.length, offset, page_size_kib: pageSize }
      : {
          base_host_virt_addr: Number(map.address),
          size: map.length,
          offset,
          page_size: pageSize,
          page_size_kib: pageSize,
        },
  )
  const socket = net.connect(options.socket)
  socket.pause()
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve)
    socket.once('error', reject)
  })
  await sendFds(socket, JSON.stringify(body), uffd)

  const start = performance.now()
  const stride = options.stride ?? 1
  const addresses: bigint[] = []
  for (const { map } of maps)
    addresses.push(...pages(map, Math.ceil(map.length / PAGE_SIZE / stride), PAGE_SIZE * stride))
  if (options.dieMidway) {
    // Faults in flight on native threads while the process dies.
    // (keep the memory and the uffd reachable: a collected Mapping would be unmapped under the threads)
    ;(globalThis as { guestKeepAlive?: unknown }).guestKeepAlive = { maps, uffd, socket }
    void touch(addresses, { threads: options.threads ?? 1 })
    setTimeout(() => process.kill(process.pid, 'SIGKILL'), 5)
    await new Promise(() => {
      /* never */
    })
  }
  const { ns } = await touch(addresses, { threads: options.threads ?? 1, timings: true })
  const elapsedMs = performance.now() - start

  // Every byte of every touched page equals the snapshot (pages are resolved now: no faults).
  const fd = fs.openSync(options.memFile, 'r')
  let verifiedBytes = 0
  let mismatches = 0
  const page = Buffer.alloc(PAGE_SIZE)
  const want = Buffer.alloc(PAGE_SIZE)
  for (const { map, offset } of maps) {
    for (let p = 0; p < map.length; p += PAGE_SIZE * stride) {
      map.read(p, page)
      fs.readSync(fd, want, 0, PAGE_SIZE, offset + p)
      if (!page.equals(want)) mismatches++
      verifiedBytes += PAGE_SIZE
    }
  }
  fs.closeSync(fd)

  // Balloon-like MADV_DONTNEED: the handler reads UFFD_EVENT_REMOVE (this call blocks until
  // it has), and afterwards the range reads as zeros.
  let zeroChecked = 0
  let zeroMismatches = 0
  if (options.dontneed !== undefined && options.dontneed > 0) {
    const first = maps[0].map
    const len = Math.ceil(Math.min(options.dontneed, first.length) / pageSize) * pageSize
    first.madvise('dontneed', 0, len)
    await touch(pages(first, len / PAGE_SIZE), { threads: 1 })
    const zeros = Buffer.alloc(PAGE_SIZE)
    for (let p = 0; p < len; p += PAGE_SIZE) {
      first.read(p, page)
      if (!page.equals(zeros)) zeroMismatches++
      zeroChecked++
    }
  }
  socket.destroy()
  uffd.close()
  return {
    pid: process.pid,
    pages: Math.ceil(size / PAGE_SIZE),
    touched: addresses.length,
    verifiedBytes,
    mismatches,
    zeroChecked,
    zeroMismatches,
    elapsedMs,
    latencyUs: Array.from(ns ?? [], (v) => v / 1000),
  }
}

// As a child process: node guest.js '<GuestOptions JSON>' prints a GuestResult as JSON.
if (require.main === module) {
  runGuest(JSON.parse(process.argv[2]) as GuestOptions).then(
    (r) => {
      process.stdout.write(`${JSON.stringify(r)}\n`)
      process.exit(r.mismatches === 0 && r.zeroMismatches === 0 ? 0 : 1)
    },
    (err) => {
      process.stderr.write(`guest: ${(err as Error).stack}\n`)
      process.exit(2)
    },
  )
}
