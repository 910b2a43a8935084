// Memory for userfaultfd to manage. A Mapping owns an mmap'd region (anonymous, or MAP_SHARED
// over a memfd); `buffer` is an external ArrayBuffer over it that unmap() detaches first.
import * as fs from 'node:fs'
import type { MappingHandle } from '../addon/binding'
import { native } from '../addon/native'
import { checkOptions, describe, flag, int } from '../util/validate'
import { PAGE_SIZE } from './constants'
import { uffdError } from './errors'
import { asBytes, checkAligned, toLength, type Bytes, type Range } from './range'

const c = native.constants

/** madvise(2) advice, as Mapping.madvise() takes it ('dontneed' is MADV_DONTNEED). */
export type Advice =
  | 'normal'
  | 'random'
  | 'sequential'
  | 'willneed'
  | 'dontneed'
  | 'remove'
  | 'dontfork'
  | 'dofork'
  | 'hugepage'
  | 'nohugepage'
  | 'free'
  | 'cold'
  | 'pageout'
  | 'populate_read'
  | 'populate_write'
  | 'collapse'

/** mprotect(2) protection: 'none', 'r', 'rw', 'rx', 'rwx', or PROT_* bits. */
export type Protection = 'none' | 'r' | 'rw' | 'rx' | 'rwx' | number

/** What backs a range, as the kernel's userfaultfd features tell them apart. */
export type MemoryKind = 'anonymous' | 'shmem' | 'hugetlb'

/** Options of Mapping.anonymous(). */
export interface AnonymousOptions {
  /** MAP_HUGETLB: back with huge pages (needs /proc/sys/vm/nr_hugepages > 0). */
  hugetlb?: boolean
  /** MAP_POPULATE: fault everything in now. */
  populate?: boolean
  /**
   * MAP_SHARED: shared anonymous memory (shmem, or hugetlbfs with `hugetlb`), which has a page
   * cache: MINOR faults, and alias() (a second mapping of the same pages). Default false
   * (MAP_PRIVATE).
   */
  shared?: boolean
}

/** Options of Mapping.fromFd(). */
export interface FromFdOptions {
  /** bytes to map from offset 0 (default: the file's size) */
  length?: number
  /** MAP_PRIVATE instead of MAP_SHARED (copy-on-write over the file) */
  private?: boolean
}

/** Options of Mapping.memfd(). */
export interface MemfdOptions {
  /** memfd name, shown in /proc/PID/maps. */
  name?: string
  /** MFD_HUGETLB: back with huge pages. */
  hugetlb?: boolean
  /** MAP_PRIVATE instead of MAP_SHARED (copy-on-write over the memfd: "shmem-private"). */
  private?: boolean
}

let hugePageSizeCache: number | undefined

/** The default huge page size (Hugepagesize in /proc/meminfo), in bytes. */
export function hugePageSize(): number {
  if (hugePageSizeCache === undefined) {
    const m = /Hugepagesize:\s+(\d+)\s+kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))
    hugePageSizeCache = m ? Number(m[1]) * 1024 : 2 * 1024 * 1024
  }
  return hugePageSizeCache
}

function toProt(prot: Protection): number {
  if (typeof prot === 'number') return prot
  const table: Record<string, number> = {
    none: c.Prot.PROT_NONE,
    r: c.Prot.PROT_READ,
    rw: c.Prot.PROT_READ | c.Prot.PROT_WRITE,
    rx: c.Prot.PROT_READ | c.Prot.PROT_EXEC,
    rwx: c.Prot.PROT_READ | c.Prot.PROT_WRITE | c.Prot.PROT_EXEC,
  }
  // Own keys only ('toString' is not a protection); a non-string is never a key.
  const value = typeof prot === 'string' && Object.hasOwn(table, prot) ? table[prot] : undefined
  if (value === undefined)
    throw new TypeError(
      `unknown protection ${typeof prot === 'string' ? `'${prot}'` : describe(prot)} (use ${Object.keys(table).join(', ')} or a number)`,
    )
  return value
}

export class Mapping implements Range {
  /** Start address. */
  readonly address: bigint
  /** Length in bytes. */
  readonly length: number
  /** Page size of this mapping: the huge page size for hugetlb mappings. */
  readonly pageSize: number
  /** 'anonymous' or 'memfd' (aliases of a memfd and mappings of an fd are 'memfd'). */
  readonly kind: 'anonymous' | 'memfd'
  /** Backed by huge pages (MAP_HUGETLB / MFD_HUGETLB / a hugetlbfs file). */
  readonly hugetlb: boolean
  /** MAP_SHARED: the memory has a page cache that other mappings share (shmem, hugetlbfs). */
  readonly shared: boolean
  #handle: MappingHandle | null
  #unmapListeners: Array<(address: bigint, length: number) => void> = []
  // Native engines using the memory (a FaultServer source, a snapshot sink): unmap() waits for them.
  #pins = 0
  #unmapWhenUnpinned: MappingHandle | null = null

  private constructor(handle: MappingHandle, kind: 'anonymous' | 'memfd', hugetlb: boolean, shared: boolean) {
    this.#handle = handle
    this.address = handle.address()
    this.length = handle.length()
    this.kind = kind
    this.hugetlb = hugetlb
    this.shared = shared
    this.pageSize = hugetlb ? hugePageSize() : PAGE_SIZE
  }

  /** Anonymous memory: MAP_PRIVATE | MAP_ANONYMOUS, or shared (shmem) with { shared: true }. */
  static anonymous(length: number, options?: AnonymousOptions): Mapping {
    const o = checkOptions(options, 'Mapping.anonymous')
    const hugetlb = flag(o, 'hugetlb', false)
    const shared = flag(o, 'shared', false)
    const len = Mapping.#checkLength(length, hugetlb)
    const handle = new native.MappingHandle('anonymous', len, { hugetlb, shared, populate: flag(o, 'populate', false) })
    return new Mapping(handle, 'anonymous', hugetlb, shared)
  }

  /** MAP_SHARED over a new memfd (shmem or hugetlbfs): what MINOR faults and CONTINUE need. */
  static memfd(length: number, options?: MemfdOptions): Mapping {
    const o = checkOptions(options, 'Mapping.memfd')
    const hugetlb = flag(o, 'hugetlb', false)
    const len = Mapping.#checkLength(length, hugetlb)
    if (o.name !== undefined && typeof o.name !== 'string') {
      throw new TypeError(`name must be a string (got ${describe(o.name)})`)
    }
    const priv = flag(o, 'private', false)
    const handle = new native.MappingHandle('memfd', len, { hugetlb, name: o.name, private: priv })
    return new Mapping(handle, 'memfd', hugetlb, !priv)
  }

  /**
   * MAP_SHARED over a file you have an fd of, from offset 0: a memfd received from another
   * process (fd passing), a file on hugetlbfs. The fd is dup'ed (close yours when you like).
   * hugetlb is told by the file's block size (hugetlbfs reports its huge page size).
   */
  static fromFd(fd: number, options?: FromFdOptions): Mapping {
    const o = checkOptions(options, 'Mapping.fromFd')
    const f = int(fd, 'fd', 0, 0x7fffffff)
    const st = fs.fstatSync(f)
    const hugetlb = st.blksize > PAGE_SIZE
    const length = o.length === undefined ? st.size : o.length
    const len = Mapping.#checkLength(length, hugetlb)
    const priv = flag(o, 'private', false)
    const handle = new native.MappingHandle('fd', len, { fd: f, private: priv })
    return new Mapping(handle, 'memfd', hugetlb, !priv)
  }

  static #checkLength(length: unknown, hugetlb: boolean): number {
    const len = toLength(length, 'length')
    const page = hugetlb ? hugePageSize() : PAGE_SIZE
    if (len % page !== 0) throw new RangeError(`length ${len} is not a multiple of the page size (${page})`)
    return len
  }

  /**
   * A second mapping of the same memory (MAP_SHARED, or { private: true } for a memfd): write
   * through one, fault through the other. For a memfd (or a mapping of an fd) and for shared
   * anonymous memory (by mremap).
   */
  alias(options?: { private?: boolean }): Mapping {
    const handle = this.#live('alias')
    const priv = flag(checkOptions(options, 'alias'), 'private', false)
    if (this.kind === 'anonymous') {
      if (!this.shared)
        throw new TypeError('alias() needs shared memory (Mapping.memfd, or Mapping.anonymous with { shared: true })')
      if (priv) throw new TypeError('alias() of shared anonymous memory is shared: { private: true } needs a memfd')
      return new Mapping(new native.MappingHandle('alias', this.length, {}, handle), 'anonymous', this.hugetlb, true)
    }
    const copy = new native.MappingHandle('alias', this.length, { private: priv }, handle)
    return new Mapping(copy, 'memfd', this.hugetlb, !priv)
  }

  /** True after unmap(). */
  get unmapped(): boolean {
    return this.#handle === null
  }

  /** The memfd behind a memfd mapping (owned by the mapping; -1 for anonymous memory). */
  get fd(): number {
    return this.#live('fd').fd()
  }

  /**
   * An ArrayBuffer over the mapped memory (no copy). It is detached by unmap(), so views over
   * it become empty rather than dangling. Reading it on the thread that resolves faults for
   * this memory deadlocks: see the README.
   */
  get buffer(): ArrayBuffer {
    return this.#live('buffer').buffer()
  }

  /** A checked sub-range [offset, offset + length) of this mapping, page-aligned (EBADF once unmapped). */
  range(offset = 0, length: number = this.#rest(offset)): Range {
    this.#live('range')
    this.#span(offset, length, 'range')
    const r = { address: this.address + BigInt(offset), length }
    checkAligned(r.address, r.length, 'range', this.pageSize)
    return r
  }

  /** The address of byte `offset` (checked to lie inside the mapping; EBADF once unmapped). */
  at(offset: number): bigint {
    this.#live('at')
    this.#span(offset, 0, 'at')
    return this.address + BigInt(offset)
  }

  /** Copies memory out into target (no view kept). Returns bytes copied. */
  read(offset: number, target: Bytes): number {
    const bytes = asBytes(target)
    if (bytes === undefined)
      throw new TypeError(
        `target must be an ArrayBuffer, SharedArrayBuffer or ArrayBufferView (got ${describe(target)})`,
      )
    this.#span(offset, bytes.byteLength, 'read')
    return this.#live('read').read(offset, bytes)
  }

  /** Copies source into memory (no view kept). Returns bytes copied. */
  write(offset: number, source: Bytes): number {
    const bytes = asBytes(source)
    if (bytes === undefined)
      throw new TypeError(
        `source must be an ArrayBuffer, SharedArrayBuffer or ArrayBufferView (got ${describe(source)})`,
      )
    this.#span(offset, bytes.byteLength, 'write')
    return this.#live('write').write(offset, bytes)
  }

  /**
   * madvise(2) over [offset, offset + length) (default: all). 'dontneed' and 'remove' on a
   * range registered with EVENT_REMOVE block this thread until the event is read.
   */
  madvise(advice: Advice, offset = 0, length: number = this.#rest(offset)): void {
    const value = typeof advice === 'string' && Object.hasOwn(c.Advice, advice) ? c.Advice[advice] : undefined
    if (value === undefined)
      throw new TypeError(
        `unknown advice ${typeof advice === 'string' ? `'${advice}'` : describe(advice)} (use ${Object.keys(c.Advice).join(', ')})`,
      )
    this.#span(offset, length, 'madvise')
    this.#live('madvise').madvise(offset, length, value)
  }

  /** mprotect(2) over [offset, offset + length) (default: all). */
  protect(prot: Protection, offset = 0, length: number = this.#rest(offset)): void {
    const value = toProt(prot)
    this.#span(offset, length, 'protect')
    this.#live('protect').protect(offset, length, value)
  }

  /**
   * Detaches `buffer`, then munmaps (and closes the memfd). Idempotent. While a native engine
   * still uses the memory (a FaultServer serving from it, a snapshot writing to it), the mapping
   * is unusable at once but the memory stays mapped until the engine lets go of it: an engine
   * never copies from or into memory that is gone (or, worse, mapped again for something else).
   */
  unmap(): void {
    const handle = this.#handle
    if (handle === null) return
    this.#handle = null
    if (this.#pins > 0) {
      this.#unmapWhenUnpinned = handle
      return
    }
    this.#release(handle)
  }

  #release(handle: MappingHandle): void {
    const { address, length } = this
    handle.unmap()
    for (const listener of this.#unmapListeners.splice(0)) listener(address, length)
  }

  /**
   * @internal a native engine uses this memory until the returned function is called (once);
   * unmap() meanwhile is deferred until then.
   */
  _pin(): () => void {
    this.#live('pin')
    this.#pins++
    let released = false
    return () => {
      if (released) return
      released = true
      if (--this.#pins === 0 && this.#unmapWhenUnpinned !== null) {
        const handle = this.#unmapWhenUnpinned
        this.#unmapWhenUnpinned = null
        this.#release(handle)
      }
    }
  }

  /** @internal told after unmap(): uffds forget the range (it no longer keeps a process alive). */
  _onUnmap(listener: (address: bigint, length: number) => void): void {
    if (this.#handle !== null) this.#unmapListeners.push(listener)
  }

  /** unmap(), for `using m = Mapping.anonymous(...)`. */
  [Symbol.dispose](): void {
    this.unmap()
  }

  /** @internal the native handle, for other modules of this package */
  get _handle(): MappingHandle {
    return this.#live('handle')
  }

  #live(op: string): MappingHandle {
    if (this.#handle === null) throw uffdError('EBADF', `mapping.${op}`, 'the mapping was unmapped')
    return this.#handle
  }

  // The default length: the rest of the mapping from `offset` (whatever offset is: #span judges it).
  #rest(offset: unknown): number {
    return typeof offset === 'number' ? this.length - offset : 0
  }

  #span(offset: unknown, length: unknown, op: string): void {
    const o = int(offset, `${op}: offset`, 0)
    const n = int(length, `${op}: length`, 0)
    if (o + n > this.length) {
      throw new RangeError(`${op}: [${o}, ${o + n}) lies outside the mapping (length ${this.length})`)
    }
  }
}

/** What backs `range`: a Mapping says so itself; anything else is taken for anonymous memory. */
export function memoryKindOf(range: unknown): MemoryKind {
  if (range instanceof Mapping)
    return range.hugetlb ? 'hugetlb' : range.kind === 'memfd' || range.shared ? 'shmem' : 'anonymous'
  return 'anonymous'
}
