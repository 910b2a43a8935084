// The guest's memory work, in plain JavaScript: map regions, touch their pages (each first touch
// is a page fault that the handler, in another process, resolves), verify every byte against
// the snapshot file, and check that a MADV_DONTNEED'd range reads back as zeros. One
// RegionOwner per thread: the guest's main thread, or each worker with --threads N (a worker can
// only read memory it mapped itself, so each thread maps and owns whole regions).
import * as fs from 'node:fs'
import { Mapping } from '../../core/mapping'
import { PAGE_SIZE } from '../../core/constants'
import { LatencyHistogram, type HistogramJSON } from '../../util/histogram'

/** One guest memory region: `length` bytes served from `offset` of the snapshot file. */
export interface RegionSpec {
  index: number
  length: number
  offset: number
}

export interface MappedRegion {
  index: number
  address: bigint
  length: number
}

/** Slots of the shared progress counters (an Int32Array over a SharedArrayBuffer). */
export const Counter = { touched: 0, verified: 1, size: 2 } as const

export interface TouchResult {
  touched: number
  latency: HistogramJSON
}

export interface VerifyResult {
  verifiedBytes: number
  mismatches: number
}

export interface ZeroResult {
  zeroChecked: number
  zeroMismatches: number
}

const YIELD_MS = 50
const COUNT_EVERY = 64

/** Lets timers and IPC run between slices of work (the guest's main thread reports progress). */
const yieldNow = (): Promise<void> => new Promise((resolve) => setImmediate(resolve))

export class RegionOwner {
  readonly #regions: Array<{ spec: RegionSpec; map: Mapping }>
  readonly #stride: number
  readonly #counters: Int32Array

  constructor(
    specs: RegionSpec[],
    options: { hugetlb: boolean; memfd?: boolean; stride: number; counters: SharedArrayBuffer },
  ) {
    this.#stride = options.stride
    this.#counters = new Int32Array(options.counters)
    this.#regions = []
    try {
      for (const spec of specs)
        this.#regions.push({
          spec,
          map: options.memfd
            ? Mapping.memfd(spec.length, { hugetlb: options.hugetlb })
            : Mapping.anonymous(spec.length, { hugetlb: options.hugetlb }),
        })
    } catch (err) {
      this.close()
      throw err
    }
  }

  get regions(): MappedRegion[] {
    return this.#regions.map(({ spec, map }) => ({ index: spec.index, address: map.address, length: map.length }))
  }

  /** Reads one byte of every `stride`-th page, timing each read (the first read of a page faults). */
  async touch(): Promise<TouchResult> {
    const histogram = new LatencyHistogram()
    const step = PAGE_SIZE * this.#stride
    let touched = 0
    let pending = 0
    let sink = 0
    let sliceStart = performance.now()
    for (const { map } of this.#regions) {
      const view = new Uint8Array(map.buffer)
      for (let p = 0; p < view.length; p += step) {
        const t0 = performance.now()
        sink ^= view[p]
        const t1 = performance.now()
        histogram.record((t1 - t0) * 1e6)
        touched++
        if (++pending === COUNT_EVERY) {
          Atomics.add(this.#counters, Counter.touched, pending)
          pending = 0
          if (t1 - sliceStart > YIELD_MS) {
            await yieldNow()
            sliceStart = performance.now()
          }
        }
      }
    }
    Atomics.add(this.#counters, Counter.touched, pending)
    // `sink` keeps the reads from being optimized away; the snapshot has no byte 256.
    if (sink > 255) throw new Error('unreachable')
    return { touched, latency: histogram.toJSON() }
  }

  /** Compares every touched page with the snapshot file (the pages are present now: no faults). */
  async verify(memFile: string): Promise<VerifyResult> {
    const fd = fs.openSync(memFile, 'r')
    try {
      const chunk = Buffer.allocUnsafe(1 << 20)
      const step = PAGE_SIZE * this.#stride
      let verifiedBytes = 0
      let mismatches = 0
      let sliceStart = performance.now()
      for (const { spec, map } of this.#regions) {
        const memory = Buffer.from(map.buffer)
        for (let off = 0; off < map.length; off += chunk.length) {
          const len = Math.min(chunk.length, map.length - off)
          const got = fs.readSync(fd, chunk, 0, len, spec.offset + off)
          if (got !== len) throw new Error(`snapshot file ended early: ${got} of ${len} bytes at ${spec.offset + off}`)
          let pages = 0
          for (let p = off % step === 0 ? 0 : step - (off % step); p < len; p += step) {
            if (!memory.subarray(off + p, off + p + PAGE_SIZE).equals(chunk.subarray(p, p + PAGE_SIZE))) mismatches++
            verifiedBytes += PAGE_SIZE
            pages++
          }
          Atomics.add(this.#counters, Counter.verified, pages)
          if (performance.now() - sliceStart > YIELD_MS) {
            await yieldNow()
            sliceStart = performance.now()
          }
        }
      }
      return { verifiedBytes, mismatches }
    } finally {
      fs.closeSync(fd)
    }
  }

  /**
   * Balloon-like MADV_DONTNEED of the first `length` bytes of region `index` (rounded up to its
   * page size): the handler reads UFFD_EVENT_REMOVE (madvise blocks until it has), and every
   * page of the range must read back as zeros (each read faults again).
   */
  zeros(index: number, length: number): ZeroResult {
    const region = this.#regions.find((r) => r.spec.index === index)
    if (region === undefined) throw new RangeError(`region ${index} is not owned by this thread`)
    const { map } = region
    const len = Math.ceil(Math.min(length, map.length) / map.pageSize) * map.pageSize
    map.madvise('dontneed', 0, len)
    const memory = Buffer.from(map.buffer, 0, len)
    const zero = Buffer.alloc(PAGE_SIZE)
    let zeroChecked = 0
    let zeroMismatches = 0
    for (let p = 0; p < len; p += PAGE_SIZE) {
      if (!memory.subarray(p, p + PAGE_SIZE).equals(zero)) zeroMismatches++
      zeroChecked++
    }
    return { zeroChecked, zeroMismatches }
  }

  /** Unmaps every region. Idempotent. */
  close(): void {
    for (const { map } of this.#regions) map.unmap()
  }
}
