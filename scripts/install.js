#!/usr/bin/env node
// The package's install script. Uses the prebuilt binary for this platform when it loads; compiles
// with node-gyp only when none does (and says why), or when asked to:
//   npm install userfaultfd --build-from-source     (npm_config_build_from_source)
//   USERFAULTFD_BUILD_FROM_SOURCE=1 npm install      (or USERFAULTFD_NATIVE=build)
// In a development checkout (a git work tree) it always compiles: the sources are what is tested.
// npm shows this script's output only with --foreground-scripts (or when it fails).
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const root = path.join(__dirname, '..')
const say = (msg) => console.error(`userfaultfd: ${msg}`)
const yes = (v) => v !== undefined && v !== '' && v !== 'false' && v !== '0'

function libc() {
  try {
    if (fs.readdirSync('/lib').some((f) => f.startsWith('ld-musl-'))) return 'musl'
  } catch {
    /* assume glibc */
  }
  return 'glibc'
}

/** Loads the prebuild for this platform: { file } or { file, error }. */
function tryPrebuild() {
  const dir = `${process.platform}-${process.arch}`
  const file = path.join(root, 'prebuilds', dir, `userfaultfd.${libc()}.node`)
  if (!fs.existsSync(file)) {
    const have = fs.existsSync(path.join(root, 'prebuilds'))
      ? fs.readdirSync(path.join(root, 'prebuilds')).filter((d) => d.includes('-'))
      : []
    return { file, error: `no prebuilt binary for ${dir} (${libc()}); prebuilt: ${have.join(', ') || 'none'}` }
  }
  try {
    const binding = require(file)
    if (typeof binding.openSyscall !== 'function') throw new Error('it does not export openSyscall')
    return { file }
  } catch (err) {
    return {
      file,
      error: `the prebuilt binary ${path.relative(root, file)} does not load: ${err.message.split('\n')[0]}`,
    }
  }
}

/** npm's node-gyp, else one on PATH, else a local one: { script } (run with node) or { script: undefined } (on PATH). */
function findNodeGyp() {
  const npmGyp = process.env.npm_config_node_gyp
  if (npmGyp && fs.existsSync(npmGyp)) return { script: npmGyp, what: `npm's node-gyp (${npmGyp})` }
  const onPath = (process.env.PATH || '')
    .split(path.delimiter)
    .find((d) => d && fs.existsSync(path.join(d, 'node-gyp')))
  if (onPath) return { script: undefined, what: `node-gyp from PATH (${path.join(onPath, 'node-gyp')})` }
  try {
    const local = require.resolve('node-gyp/bin/node-gyp.js', { paths: [root] })
    return { script: local, what: `node-gyp from ${path.dirname(path.dirname(local))}` }
  } catch {
    return undefined
  }
}

function compile(why) {
  say(`compiling the addon with node-gyp: ${why}`)
  // node-gyp is not a dependency (it is 12 MB for every consumer whose prebuild loads): npm
  // ships one and names it to lifecycle scripts (npm_config_node_gyp, and node-gyp on PATH).
  // Other package managers: node-gyp on PATH; a development checkout: its devDependency.
  const gyp = findNodeGyp()
  if (gyp === undefined) {
    say(
      'cannot compile: node-gyp was not found (npm provides it to install scripts; elsewhere: npm install -g node-gyp)',
    )
    process.exit(1)
  }
  say(`using ${gyp.what}`)
  // Build against this Node's own headers when it has them (official builds and Debian's do),
  // rather than downloading them.
  const env = { ...process.env }
  const prefix = path.dirname(path.dirname(fs.realpathSync(process.execPath)))
  if (!env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h')))
    env.npm_config_nodedir = prefix
  const r = gyp.script
    ? spawnSync(process.execPath, [gyp.script, 'rebuild'], { cwd: root, stdio: 'inherit', env })
    : spawnSync('node-gyp', ['rebuild'], { cwd: root, stdio: 'inherit', env })
  if (r.status !== 0) {
    say(
      'node-gyp failed: compiling needs python3, make and a C++ compiler (Debian: apt-get install python3 make g++;' +
        ' Alpine: apk add python3 make g++)',
    )
    process.exit(r.status ?? 1)
  }
  say(`compiled ${path.join('build', 'Release', 'userfaultfd.node')}`)
}

function main() {
  if (process.platform !== 'linux') {
    say(`userfaultfd is Linux-only (this is ${process.platform}): nothing to build`)
    return
  }
  const forced = yes(process.env.npm_config_build_from_source)
    ? '--build-from-source'
    : yes(process.env.USERFAULTFD_BUILD_FROM_SOURCE)
      ? 'USERFAULTFD_BUILD_FROM_SOURCE'
      : process.env.USERFAULTFD_NATIVE === 'build'
        ? 'USERFAULTFD_NATIVE=build'
        : null
  if (forced) return compile(`asked to build from source (${forced})`)
  if (fs.existsSync(path.join(root, '.git'))) return compile('a development checkout builds its own sources')
  const pre = tryPrebuild()
  if (pre.error === undefined) {
    // A stale local build would win over the prebuild (src/addon/native.ts): remove it.
    fs.rmSync(path.join(root, 'build'), { recursive: true, force: true })
    say(`using the prebuilt binary ${path.relative(root, pre.file)} (N-API; no compiler needed)`)
    return
  }
  compile(pre.error)
}

main()
