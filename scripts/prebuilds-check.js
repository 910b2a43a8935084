#!/usr/bin/env node
// Checks the committed prebuilt binaries (prebuilds/linux-*/userfaultfd.glibc.node):
//   - fresh: built from the current native/ and binding.gyp (prebuilds/sources.json holds their
//     sha256, written by `npm run prebuilds`); stale ones name the files that changed;
//   - really the architecture their folder says (ELF e_machine, read from the file itself);
//   - need no symbol versions newer than Debian bookworm's (glibc 2.36, GCC 12's libstdc++),
//     when readelf is there to tell.
//   node scripts/prebuilds-check.js            check; exit 1 with the reason
//   node scripts/prebuilds-check.js --write    record the current sources' hash (npm run prebuilds does)
//   node scripts/prebuilds-check.js --json     print what was found
'use strict'
const crypto = require('node:crypto')
const fs = require('node:fs')
const path = require('node:path')
const { execFileSync } = require('node:child_process')

const root = path.join(__dirname, '..')
const TARGETS = { 'linux-x64': { machine: 62, name: 'x86-64' }, 'linux-arm64': { machine: 183, name: 'AArch64' } }
const FILE = 'userfaultfd.glibc.node'
// Debian bookworm: glibc 2.36, libstdc++ from GCC 12 (GLIBCXX_3.4.30, CXXABI_1.3.13), libgcc 12.
const MAX = { GLIBC: '2.36', GLIBCXX: '3.4.30', CXXABI: '1.3.13', GCC: '12.0.0' }

// The shipped addon's sources: native/ without native/testing (the test-only addon, never shipped).
function sourceFiles() {
  const files = fs
    .readdirSync(path.join(root, 'native'), { recursive: true })
    .sort()
    .map((f) => `native/${f}`)
    .filter((f) => f !== 'native/testing' && !f.startsWith('native/testing/'))
  return ['binding.gyp', ...files.filter((f) => fs.statSync(path.join(root, f)).isFile())]
}

function sourceHashes() {
  const files = {}
  for (const f of sourceFiles())
    files[f] = crypto
      .createHash('sha256')
      .update(fs.readFileSync(path.join(root, f)))
      .digest('hex')
  const all = crypto.createHash('sha256')
  for (const [f, h] of Object.entries(files)) all.update(`${f} ${h}\n`)
  return { hash: all.digest('hex'), files }
}

/** { fresh, changed: [files added/removed/modified since the prebuilds were made] } */
function freshness() {
  const now = sourceHashes()
  let recorded
  try {
    recorded = JSON.parse(fs.readFileSync(path.join(root, 'prebuilds', 'sources.json'), 'utf8'))
  } catch {
    return { fresh: false, changed: ['(no prebuilds/sources.json)'] }
  }
  const names = new Set([...Object.keys(now.files), ...Object.keys(recorded.files ?? {})])
  const changed = [...names].filter((f) => now.files[f] !== recorded.files?.[f]).sort()
  return { fresh: recorded.hash === now.hash && changed.length === 0, changed }
}

function elfMachine(file) {
  const b = fs.readFileSync(file)
  if (b.readUInt32BE(0) !== 0x7f454c46) throw new Error(`${file}: not an ELF file`)
  return b.readUInt16LE(18)
}

function cmp(a, b) {
  const x = a.split('.').map(Number)
  const y = b.split('.').map(Number)
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0)
  }
  return 0
}

/** The newest version needed of each versioned library (GLIBC, GLIBCXX, CXXABI, GCC), or null without readelf. */
function symbolVersions(file) {
  let out
  try {
    out = execFileSync('readelf', ['-V', '-W', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
  } catch {
    return null
  }
  const need = out.slice(out.indexOf('.gnu.version_r'))
  const newest = {}
  for (const m of need.matchAll(/Name: (GLIBC|GLIBCXX|CXXABI|GCC)_([0-9.]+)/g)) {
    if (newest[m[1]] === undefined || cmp(m[2], newest[m[1]]) > 0) newest[m[1]] = m[2]
  }
  return newest
}

function inspect() {
  const binaries = {}
  const problems = []
  for (const [dir, want] of Object.entries(TARGETS)) {
    const file = path.join(root, 'prebuilds', dir, FILE)
    if (!fs.existsSync(file)) {
      problems.push(`missing prebuilds/${dir}/${FILE}`)
      continue
    }
    const machine = elfMachine(file)
    const versions = symbolVersions(file)
    binaries[dir] = {
      file: path.relative(root, file),
      machine,
      arch: machine === want.machine ? want.name : `e_machine ${machine}`,
      versions,
    }
    if (machine !== want.machine) problems.push(`prebuilds/${dir}/${FILE} is not ${want.name} (e_machine ${machine})`)
    for (const [lib, v] of Object.entries(versions ?? {})) {
      if (cmp(v, MAX[lib]) > 0)
        problems.push(`prebuilds/${dir}/${FILE} needs ${lib}_${v}, newer than Debian bookworm's ${lib}_${MAX[lib]}`)
    }
  }
  const fresh = freshness()
  if (!fresh.fresh)
    problems.push(
      `prebuilds are stale: built before changes to ${fresh.changed.join(', ')}; run \`npm run prebuilds\` and commit prebuilds/`,
    )
  return { binaries, fresh, problems }
}

module.exports = { inspect, freshness, sourceHashes, symbolVersions, elfMachine, TARGETS, FILE, MAX }

if (require.main === module) {
  if (process.argv.includes('--write')) {
    const { hash, files } = sourceHashes()
    fs.writeFileSync(
      path.join(root, 'prebuilds', 'sources.json'),
      `${JSON.stringify(
        { note: 'sha256 of the sources prebuilds/ was built from; npm run prebuilds rewrites it', hash, files },
        null,
        2,
      )}\n`,
    )
  }
  const r = inspect()
  if (process.argv.includes('--json')) console.log(JSON.stringify(r, null, 2))
  else {
    for (const [dir, b] of Object.entries(r.binaries)) {
      const v =
        b.versions === null
          ? '(no readelf: symbol versions not checked)'
          : Object.entries(b.versions)
              .map(([k, x]) => `${k}_${x}`)
              .join(' ')
      console.log(`prebuilds/${dir}: ${b.arch}; needs ${v}`)
    }
    console.log(r.fresh.fresh ? 'prebuilds: fresh (built from the current native/ and binding.gyp)' : '')
  }
  if (r.problems.length > 0) {
    for (const p of r.problems) console.error(`prebuilds: ${p}`)
    process.exit(1)
  }
}
