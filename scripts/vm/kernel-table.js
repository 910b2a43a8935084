#!/usr/bin/env node
// README.md's "What works on which kernel", from probes (scripts/vm/kernel-probe.js output):
//   node scripts/vm/kernel-table.js docs/kernels/*.json
// Prints a Markdown table, one column per probe (in the order given), every cell measured.
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { kernelRelease } = require(path.join(__dirname, '..', '..', 'dist', 'index.js'))

const probes = process.argv.slice(2).map((f) => JSON.parse(fs.readFileSync(f, 'utf8')))
if (probes.length === 0) {
  console.error('usage: kernel-table.js PROBE.json...')
  process.exit(2)
}

const yes = (v) => v === 'yes'
const cell = (ok) => (ok ? 'yes' : 'no')
const both = (a, b) => (a === b ? a : `${a} (x86_64), ${b} (arm64)`)
const since = (feature) => both(kernelRelease(feature, 'x64'), kernelRelease(feature, 'arm64'))

const rows = [
  ['MISSING faults, COPY, ZEROPAGE, WAKE: anonymous memory', '4.3', (p) => cell(yes(p.register.anonymous.missing))],
  [
    'MISSING faults: shmem, hugetlb',
    since('MISSING_SHMEM'),
    (p) => cell(yes(p.register.shmem.missing) && yes(p.register.hugetlb.missing)),
  ],
  [
    'MINOR faults + CONTINUE: hugetlbfs, shmem',
    `${since('MINOR_HUGETLBFS')} / ${since('MINOR_SHMEM')}`,
    (p) => cell(yes(p.register.shmem.minor) && yes(p.register.hugetlb.minor)),
  ],
  ['`/dev/userfaultfd`', '6.1', (p) => cell(yes(p.devUserfaultfd))],
  ['write protection (WRITEPROTECT): anonymous', since('PAGEFAULT_FLAG_WP'), (p) => cell(yes(p.register.anonymous.wp))],
  [
    'write protection: shmem, hugetlb (WP_HUGETLBFS_SHMEM)',
    since('WP_HUGETLBFS_SHMEM'),
    (p) => cell(yes(p.register.shmem.wp) && yes(p.register.hugetlb.wp)),
  ],
  ['WP_UNPOPULATED', since('WP_UNPOPULATED'), (p) => cell(yes(p.tries.WP_UNPOPULATED))],
  [
    'CONTINUE with `{ wp: true }` (UFFDIO_CONTINUE_MODE_WP)',
    since('CONTINUE_MODE_WP'),
    (p) => cell(yes(p.tries.CONTINUE_MODE_WP)),
  ],
  ['POISON', since('POISON'), (p) => cell(yes(p.tries.POISON))],
  ['WP_ASYNC + PAGEMAP_SCAN', since('WP_ASYNC'), (p) => cell(yes(p.tries.WP_ASYNC) && yes(p.tries.PAGEMAP_SCAN))],
  ['MOVE', since('MOVE'), (p) => cell(yes(p.tries.MOVE))],
  ['`DirtyTracker` (`tracker.mode`)', '', (p) => (p.dirtyTracker === 'unsupported' ? 'no' : `\`'${p.dirtyTracker}'\``)],
  [
    '`takeSnapshot()`',
    '',
    (p) => (p.liveSnapshot === 'yes' ? 'yes' : p.liveSnapshot === 'unsupported' ? 'no' : 'yes, populates first'),
  ],
  ['features reported (UFFDIO_API)', '', (p) => `\`${p.features}\``],
]

const arch = (a) => (a === 'x64' ? 'x86_64' : a)
const header = ['feature', 'since', ...probes.map((p) => `${p.kernel} (${arch(p.arch)})`)]
const lines = [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`]
for (const [name, from, fn] of rows) lines.push(`| ${[name, from, ...probes.map(fn)].join(' | ')} |`)
process.stdout.write(`${lines.join('\n')}\n`)
