// `doctor`'s feature checks: each of the package's features tried for real on a small mapping
// (never trusted from version numbers). Run in a child process (`node doctor-features.js`,
// results over IPC) so that a check that hangs in a page fault cannot hang `doctor`: the parent
// kills it after a timeout and reports what did not finish.
//
// The main thread here only touches memory that a native engine serves (FaultServer, the live
// snapshot's thread), or memory already present: it never waits on a fault it would resolve.
import { Userfaultfd, type OpenOptions } from '../core/userfaultfd'
import { Mapping, hugePageSize } from '../core/mapping'
import { Feature, PAGE_SIZE, ioctlNames } from '../core/constants'
import { FaultServer } from '../engines/fault-server'
import { DirtyTracker } from '../engines/dirty-tracker'
import { takeSnapshot } from '../engines/live-snapshot'
import { UnsupportedError } from '../core/errors'
import { type KernelFeature, kernelRelease, requireFeature } from '../core/kernel-features'

export interface FeatureCheck {
  /** stable identifier (JSON consumers) */
  id: string
  /** what people read */
  name: string
  /** true works, false does not, null not tried (and `detail` says why) */
  ok: boolean | null
  detail: string
  /** a fix, where one exists besides a newer kernel */
  fix?: string
}

/** What UFFDIO_REGISTER answered for a range registered with `modes`. */
export interface RangeIoctls {
  modes: Array<'missing' | 'wp' | 'minor'>
  ioctls: string[]
}

export interface FeatureReport {
  checks: FeatureCheck[]
  /** ioctls UFFDIO_REGISTER reports for a range of each kind (null: could not register one) */
  rangeIoctls: { anonymous: RangeIoctls | null; shmem: RangeIoctls | null; hugetlb: RangeIoctls | null }
}

/** The fix for a check refused for want of `feature`: the release that brings it, on this architecture. */
function newerKernel(feature: string | undefined, what: string): string | undefined {
  if (feature === undefined) return undefined
  const first = feature.split(', ')[0] as KernelFeature
  return `Linux ${kernelRelease(first)}+ for ${what}`
}

export interface FeatureCheckOptions {
  /** open uffds with UFFD_USER_MODE_ONLY (what this process is allowed) */
  userModeOnly: boolean
  /** huge pages free now (hugetlb checks need one) */
  hugePagesFree: number
}

const STAMP = 0x5a

function bytesOf(length: number, value = STAMP): Uint8Array {
  return new Uint8Array(length).fill(value)
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

export async function checkFeatures(options: FeatureCheckOptions): Promise<FeatureReport> {
  const openOptions: OpenOptions = options.userModeOnly ? { userModeOnly: true } : {}
  const offered = Userfaultfd.probe().features
  const has = (f: bigint): boolean => (offered & f) !== 0n
  const checks: FeatureCheck[] = []
  const cleanup: Array<{ close(): void } | Mapping> = []
  const own = <T extends { close(): void } | Mapping>(x: T): T => {
    cleanup.push(x)
    return x
  }
  const release = (): void => {
    for (const x of cleanup.splice(0).reverse()) {
      try {
        if (x instanceof Mapping) x.unmap()
        else x.close()
      } catch {
        /* best effort */
      }
    }
  }
  const run = async (id: string, name: string, body: () => string | Promise<string>, fix?: string): Promise<void> => {
    try {
      checks.push({ id, name, ok: true, detail: await body() })
    } catch (err) {
      // The package's own refusal (requireFeature or an API) names the feature and its release.
      const why = err instanceof UnsupportedError ? (newerKernel(err.feature, name) ?? fix) : fix
      checks.push({ id, name, ok: false, detail: message(err), ...(why ? { fix: why } : {}) })
    } finally {
      release()
    }
  }
  const skip = (id: string, name: string, detail: string, fix?: string): void => {
    checks.push({ id, name, ok: null, detail, ...(fix ? { fix } : {}) })
  }
  const hugetlbOk = options.hugePagesFree > 0
  const hugeFix = 'reserve huge pages: echo 64 | sudo tee /proc/sys/vm/nr_hugepages'

  // Which ioctls a registered range offers, per memory kind (UFFDIO_REGISTER's answer).
  const rangeIoctls: FeatureReport['rangeIoctls'] = { anonymous: null, shmem: null, hugetlb: null }
  // Every mode this kernel supports for the kind, so that the answer lists every ioctl.
  const registerKind = (kind: keyof FeatureReport['rangeIoctls'], map: () => Mapping): string => {
    const anonymous = kind === 'anonymous'
    const wp = has(Feature.PAGEFAULT_FLAG_WP) && (anonymous || has(Feature.WP_HUGETLBFS_SHMEM))
    const minorFeature = kind === 'shmem' ? Feature.MINOR_SHMEM : kind === 'hugetlb' ? Feature.MINOR_HUGETLBFS : 0n
    const minor = minorFeature !== 0n && has(minorFeature)
    const features = (wp && !anonymous ? Feature.WP_HUGETLBFS_SHMEM : 0n) | (minor ? minorFeature : 0n)
    const uffd = own(Userfaultfd.open({ ...openOptions, features }))
    const m = own(map())
    const ioctls = ioctlNames(uffd.register(m, { missing: true, wp, minor }))
    const modes: RangeIoctls['modes'] = [
      'missing',
      ...(wp ? ['wp' as const] : []),
      ...(minor ? ['minor' as const] : []),
    ]
    rangeIoctls[kind] = { modes, ioctls }
    return `registered for ${modes.join(' + ')}`
  }
  await run('register-anonymous', 'register anonymous memory', () =>
    registerKind('anonymous', () => Mapping.anonymous(PAGE_SIZE)),
  )
  await run('register-shmem', 'register shmem (memfd)', () => registerKind('shmem', () => Mapping.memfd(PAGE_SIZE)))
  if (hugetlbOk)
    await run('register-hugetlb', 'register hugetlb memory', () =>
      registerKind('hugetlb', () => Mapping.anonymous(hugePageSize(), { hugetlb: true })),
    )
  else skip('register-hugetlb', 'register hugetlb memory', 'no free huge pages', hugeFix)

  // FaultServer: the native engine serves a fault of this thread (a read through mapping.read).
  const serveKind = (make: () => Mapping, source: (m: Mapping) => Parameters<FaultServer['serve']>[1]): string => {
    const uffd = own(Userfaultfd.open(openOptions))
    const m = own(make())
    const server = own(new FaultServer(uffd))
    server.serve(m, source(m))
    const got = new Uint8Array(1)
    m.read(m.length - 1, got)
    if (got[0] !== STAMP) throw new Error(`read ${got[0]} where the source has ${STAMP}`)
    return `served a ${m.pageSize >> 10} KiB page fault`
  }
  await run('fault-server-anonymous', 'FaultServer: anonymous memory, { buffer } source', () =>
    serveKind(
      () => Mapping.anonymous(PAGE_SIZE),
      (m) => ({ buffer: bytesOf(m.length) }),
    ),
  )
  await run('fault-server-file', 'FaultServer: anonymous memory, { file } source', () => {
    const file = own(Mapping.memfd(PAGE_SIZE))
    file.write(0, bytesOf(PAGE_SIZE))
    return serveKind(
      () => Mapping.anonymous(PAGE_SIZE),
      () => ({ file: file.fd }),
    )
  })
  await run('fault-server-shmem', 'FaultServer: shmem (memfd)', () =>
    serveKind(
      () => Mapping.memfd(PAGE_SIZE),
      (m) => ({ buffer: bytesOf(m.length) }),
    ),
  )
  if (hugetlbOk)
    await run('fault-server-hugetlb', 'FaultServer: hugetlb memory', () =>
      serveKind(
        () => Mapping.anonymous(hugePageSize(), { hugetlb: true }),
        (m) => ({ buffer: bytesOf(m.length) }),
      ),
    )
  else skip('fault-server-hugetlb', 'FaultServer: hugetlb memory', 'no free huge pages', hugeFix)

  // Minor faults: the page is in the page cache (written through an alias); CONTINUE maps it.
  await run('minor-shmem', 'minor faults + CONTINUE (shmem)', () => {
    requireFeature('MINOR_SHMEM', 'minor faults on shmem')
    const uffd = own(Userfaultfd.open({ ...openOptions, features: Feature.MINOR_SHMEM }))
    const m = own(Mapping.memfd(PAGE_SIZE))
    const alias = own(m.alias())
    alias.write(0, bytesOf(PAGE_SIZE))
    uffd.register(m, { minor: true })
    uffd.continue(m)
    const got = new Uint8Array(1)
    m.read(0, got)
    if (got[0] !== STAMP) throw new Error(`read ${got[0]} after CONTINUE`)
    return 'UFFDIO_CONTINUE mapped a page-cache page'
  })

  // Write protection, on a present page (no fault: nothing writes it).
  await run('write-protect', 'write protection (WRITEPROTECT)', () => {
    requireFeature('PAGEFAULT_FLAG_WP', 'write protection')
    const uffd = own(Userfaultfd.open(openOptions))
    const m = own(Mapping.anonymous(PAGE_SIZE))
    m.write(0, bytesOf(PAGE_SIZE))
    uffd.register(m, { wp: true })
    uffd.writeProtect(m)
    uffd.writeProtect(m, { protect: false })
    return 'protected and unprotected a present page'
  })

  await run('live-snapshot', 'live snapshot (takeSnapshot)', async () => {
    const m = own(Mapping.anonymous(4 * PAGE_SIZE))
    m.write(0, bytesOf(m.length))
    const out = new Uint8Array(m.length)
    const snapshot = takeSnapshot(m, { buffer: out })
    own({ close: () => snapshot.close() })
    await snapshot.done
    if (out.some((b) => b !== STAMP)) throw new Error('the copy differs from the memory')
    return 'copied 4 pages while write-protected'
  })

  // 'async' (WP_ASYNC + PAGEMAP_SCAN, 6.7+) or the 'sync' fallback: the detail says which.
  await run('dirty-tracker', 'DirtyTracker', () => {
    const m = own(Mapping.anonymous(4 * PAGE_SIZE))
    const tracker = DirtyTracker.start(m)
    own({ close: () => tracker.stop() })
    m.write(PAGE_SIZE, bytesOf(8))
    const dirty = tracker.collect()
    if (dirty.length !== 1 || dirty[0].offset !== PAGE_SIZE)
      throw new Error(`collect() reported ${JSON.stringify(dirty.map((d) => [d.offset, d.length]))}`)
    return `reported the one page written (mode '${tracker.mode}')`
  })

  await run('move', 'MOVE (UFFDIO_MOVE)', () => {
    requireFeature('MOVE', 'MOVE')
    const uffd = own(Userfaultfd.open({ ...openOptions, features: Feature.MOVE }))
    const m = own(Mapping.anonymous(2 * PAGE_SIZE))
    m.write(0, bytesOf(PAGE_SIZE))
    uffd.register(m, { missing: true })
    uffd.move(m.address + BigInt(PAGE_SIZE), m.address, PAGE_SIZE)
    const got = new Uint8Array(1)
    m.read(PAGE_SIZE, got)
    if (got[0] !== STAMP) throw new Error(`read ${got[0]} at the page's new place`)
    return 'moved a page within a registered range'
  })

  await run('poison', 'POISON (UFFDIO_POISON)', () => {
    requireFeature('POISON', 'POISON')
    const uffd = own(Userfaultfd.open({ ...openOptions, features: Feature.POISON }))
    const m = own(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m, { missing: true })
    uffd.poison(m)
    return 'poisoned a missing page (not touched)'
  })

  return { checks, rangeIoctls }
}

// As a child process of doctor: options in argv[2], the report over IPC.
if (require.main === module) {
  const options = JSON.parse(process.argv[2] ?? '{}') as FeatureCheckOptions
  checkFeatures(options).then(
    (report) => process.send?.({ report }, () => process.disconnect()),
    (err: Error) => process.send?.({ error: err.stack ?? err.message }, () => process.disconnect()),
  )
}
