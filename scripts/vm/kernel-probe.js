#!/usr/bin/env node
// What this kernel can do with userfaultfd, MEASURED: each row of README's "What works on which
// kernel" table is a real try here (open with the feature, register the memory kind, run the
// ioctl once), not a changelog. Prints one JSON object; scripts/vm/kernel-table.js turns the
// probes of several kernels into the table. scripts/vm/test-vm.sh runs it in every guest.
//   node scripts/vm/kernel-probe.js          (needs the built package: npm run build)
'use strict'
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const u = require(path.join(__dirname, '..', '..', 'dist', 'index.js'))
const testing = require(path.join(__dirname, '..', '..', 'dist', 'testing', 'index.js'))

const { Userfaultfd, Mapping, Feature, PAGE_SIZE } = u
const probe = Userfaultfd.probe()

/** Runs fn: 'yes' if it returns (true or nothing), 'wrong' if it returns false, else 'no (CODE)'. */
function attempt(fn) {
  try {
    return fn() === false ? 'wrong' : 'yes'
  } catch (err) {
    return `no (${err.name === 'UnsupportedError' ? 'UnsupportedError' : (err.code ?? err.name)})`
  }
}

async function attemptAsync(fn) {
  try {
    return (await fn()) === false ? 'wrong' : 'yes'
  } catch (err) {
    return `no (${err.name === 'UnsupportedError' ? 'UnsupportedError' : (err.code ?? err.name)})`
  }
}

function withUffd(features, fn) {
  const uffd = Userfaultfd.open({ features })
  try {
    return fn(uffd)
  } finally {
    uffd.close()
  }
}

function withMapping(kind, fn) {
  const m =
    kind === 'anonymous'
      ? Mapping.anonymous(4 * PAGE_SIZE)
      : kind === 'shmem'
        ? Mapping.memfd(4 * PAGE_SIZE)
        : Mapping.anonymous(u.hugePageSize(), { hugetlb: true })
  try {
    return fn(m)
  } finally {
    m.unmap()
  }
}

const kindFeatures = {
  anonymous: { missing: 0n, wp: Feature.PAGEFAULT_FLAG_WP, minor: null },
  shmem: {
    missing: Feature.MISSING_SHMEM,
    wp: Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM,
    minor: Feature.MINOR_SHMEM,
  },
  hugetlb: {
    missing: Feature.MISSING_HUGETLBFS,
    wp: Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM,
    minor: Feature.MINOR_HUGETLBFS,
  },
}

function registerTry(kind, mode) {
  const features = kindFeatures[kind][mode]
  if (features === null) return 'n/a'
  if (kind === 'hugetlb' && Number(fs.readFileSync('/proc/sys/vm/nr_hugepages', 'utf8')) === 0) return 'no huge pages'
  return attempt(() => withUffd(features, (uffd) => withMapping(kind, (m) => uffd.register(m, { [mode]: true }))))
}

async function main() {
  const result = {
    kernel: os.release(),
    arch: process.arch,
    node: process.version,
    supported: probe.supported,
    via: probe.via,
    features: `0x${probe.features.toString(16)}`,
    featureNames: probe.featureNames,
    ioctlNames: probe.ioctlNames,
    devUserfaultfd: attempt(() => {
      fs.closeSync(fs.openSync('/dev/userfaultfd', 'r+'))
    }),
    register: {},
    tries: {},
  }
  if (probe.supported) {
    for (const kind of ['anonymous', 'shmem', 'hugetlb']) {
      result.register[kind] = {}
      for (const mode of ['missing', 'wp', 'minor']) result.register[kind][mode] = registerTry(kind, mode)
    }
    const t = result.tries
    // WP_UNPOPULATED: a write (from a native thread) to a never-touched, write-protected
    // anonymous page raises a WP fault; the probe serves it by unprotecting.
    t.WP_UNPOPULATED = await attemptAsync(async () => {
      const uffd = Userfaultfd.open({ features: Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED })
      const m = Mapping.anonymous(PAGE_SIZE)
      try {
        uffd.register(m, { wp: true })
        uffd.writeProtect(m)
        let done = false
        const writer = testing.touch([m.address], { write: true }).then(() => {
          done = true
        })
        const deadline = Date.now() + 5000
        let events = []
        while (events.length === 0 && !done && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 2))
          events = uffd.read()
        }
        uffd.writeProtect(m, { protect: false })
        await writer
        return events.length === 1 && events[0].wp === true
      } finally {
        uffd.close()
        m.unmap()
      }
    })
    // POISON: one page of a registered anonymous range poisoned (nobody touches it).
    t.POISON = attempt(() =>
      withUffd(Feature.POISON, (uffd) =>
        withMapping('anonymous', (m) => {
          uffd.register(m)
          return uffd.poison({ address: m.address, length: PAGE_SIZE }) === PAGE_SIZE
        }),
      ),
    )
    // WP_ASYNC + PAGEMAP_SCAN: a write to a protected page is recorded without any message, and
    // PAGEMAP_SCAN reports it as written.
    t.PAGEMAP_SCAN = attempt(() =>
      withMapping('anonymous', (m) => u.pagemapScan(m).walkEnd === m.address + BigInt(m.length)),
    )
    // CONTINUE_MODE_WP: a page of the page cache mapped write-protected by UFFDIO_CONTINUE.
    t.CONTINUE_MODE_WP = attempt(() =>
      withUffd(Feature.MINOR_SHMEM | Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM, (uffd) =>
        withMapping('shmem', (m) => {
          const alias = m.alias()
          try {
            alias.write(0, Buffer.from([7]))
            uffd.register(m, { minor: true, wp: true })
            return uffd.continue({ address: m.address, length: PAGE_SIZE }, { wp: true }) === PAGE_SIZE
          } finally {
            alias.unmap()
          }
        }),
      ),
    )
    t.WP_ASYNC = attempt(() =>
      withUffd(Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP, (uffd) =>
        withMapping('anonymous', (m) => {
          uffd.register(m, { wp: true })
          uffd.writeProtect(m)
          m.write(PAGE_SIZE, Buffer.from([1]))
          if (!u.pagemapScanSupported()) return true
          const { regions } = u.pagemapScan(m, { categoryMask: u.PageCategory.WRITTEN })
          return regions.length === 1 && regions[0].address === m.address + BigInt(PAGE_SIZE)
        }),
      ),
    )
    // MOVE: a populated page moved into a registered hole.
    t.MOVE = attempt(() =>
      withUffd(Feature.MOVE, (uffd) =>
        withMapping('anonymous', (dst) =>
          withMapping('anonymous', (src) => {
            src.write(0, Buffer.from([42]))
            uffd.register(dst)
            uffd.move(dst, src, PAGE_SIZE)
            const b = Buffer.alloc(1)
            dst.read(0, b)
            return b[0] === 42
          }),
        ),
      ),
    )
    // What the package's engines pick here.
    const tracker = u.DirtyTracker.support()
    result.dirtyTracker = tracker.supported ? tracker.mode : 'unsupported'
    result.dirtyTrackerReason = tracker.reason
    result.liveSnapshot =
      (probe.features & Feature.PAGEFAULT_FLAG_WP) === 0n
        ? 'unsupported'
        : (probe.features & Feature.WP_UNPOPULATED) === 0n
          ? 'populates first'
          : 'yes'
    result.missing = u.missingFeatures()
  }
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`)
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
