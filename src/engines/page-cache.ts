// One page-cache state per shared file per process: what FaultServer ranges in MINOR mode fill
// and share (native/engine/page_cache.h). For each file, the engine's own mapping of it (the
// writer) registered for MISSING faults with a uffd that nobody reads, so that UFFDIO_COPY into
// it fills the page cache only where it has no page (EEXIST where it has: never an overwrite),
// and the pages known to be cached. Every server serving the file (one per uffd, e.g. one per
// clone of a VM, each clone's uffd received by fd passing) leases the same one, so a page is
// filled once and every other fault on it costs only the UFFDIO_CONTINUE.
import * as fs from 'node:fs'
import type { PageCacheHandle } from '../addon/binding'
import { native } from '../addon/native'
import { Mapping } from '../core/mapping'
import { Userfaultfd } from '../core/userfaultfd'

/** The file whose page cache MINOR faults come from: a Mapping of it, or an fd of it. */
export type Backing = Mapping | number

interface Entry {
  handle: PageCacheHandle
  uffd: Userfaultfd
  writer: Mapping
  users: number
}

// By file (device:inode); shared anonymous memory has no file to name it by: by its Mapping.
const byFile = new Map<string, Entry>()
const byMapping = new WeakMap<Mapping, Entry>()

export interface PageCacheLease {
  handle: PageCacheHandle
  /** the page size of the file's memory */
  pageSize: number
  /** its writer's length: the file's size when leased */
  length: number
  /** lets go (the writer is unmapped once nobody uses it) */
  release(): void
}

/**
 * The page cache of `backing`'s file, covering at least `end` bytes of it. A file that grew past
 * the cache of it gets a new one (the old one stays with the ranges that use it: the kernel's
 * EEXIST keeps both right).
 */
export function leasePageCache(backing: Backing, end: number): PageCacheLease {
  const anonymous = backing instanceof Mapping && backing.fd < 0
  let key: string | undefined
  let entry: Entry | undefined
  if (anonymous) {
    entry = byMapping.get(backing)
  } else {
    const fd = backing instanceof Mapping ? backing.fd : backing
    const st = fs.fstatSync(fd)
    key = `${st.dev}:${st.ino}`
    entry = byFile.get(key)
    if (entry !== undefined && entry.writer.length < end) entry = undefined
  }
  if (entry === undefined) {
    entry = create(backing, end)
    if (anonymous) byMapping.set(backing as Mapping, entry)
    else byFile.set(key!, entry)
  }
  const e = entry
  e.users++
  let released = false
  return {
    handle: e.handle,
    pageSize: e.writer.pageSize,
    length: e.writer.length,
    release() {
      if (released) return
      released = true
      if (--e.users > 0) return
      if (key !== undefined && byFile.get(key) === e) byFile.delete(key)
      if (anonymous) byMapping.delete(backing as Mapping)
      e.writer.unmap()
      e.uffd.close()
    },
  }
}

function create(backing: Backing, end: number): Entry {
  let writer: Mapping
  if (backing instanceof Mapping) {
    if (!backing.shared)
      throw new TypeError(
        "mode 'minor' needs shared memory: this mapping is private (MINOR faults come from a page cache)",
      )
    // Shared anonymous memory: a second mapping by mremap. A file: the whole file, from its fd.
    writer = backing.fd < 0 ? backing.alias() : Mapping.fromFd(backing.fd, { length: fileLength(backing.fd, end) })
  } else {
    writer = Mapping.fromFd(backing, { length: fileLength(backing, end) })
  }
  let uffd: Userfaultfd | undefined
  try {
    uffd = Userfaultfd.open()
    uffd.register(writer, { missing: true })
    const handle = new native.PageCache(uffd.fd, writer.address, writer.length, writer.pageSize)
    return { handle, uffd, writer, users: 0 }
  } catch (err) {
    uffd?.close()
    writer.unmap()
    throw err
  }
}

function fileLength(fd: number, end: number): number {
  const size = fs.fstatSync(fd).size
  if (size < end)
    throw new RangeError(`the backing file is ${size} bytes: too short for [0, ${end}) (ftruncate it first)`)
  return size
}
