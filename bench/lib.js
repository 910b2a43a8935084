// Shared by the benchmark scripts: building the C references, statistics, arguments.
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const crypto = require('node:crypto')
const { execFileSync } = require('node:child_process')

const out = path.join(__dirname, 'out')

/** Compiles bench/c/NAME.c (if newer than its binary) and returns the binary's path. */
function buildC(name, extra = []) {
  fs.mkdirSync(out, { recursive: true })
  const src = path.join(__dirname, 'c', `${name}.c`)
  const bin = path.join(out, name)
  if (!fs.existsSync(bin) || fs.statSync(bin).mtimeMs < fs.statSync(src).mtimeMs) {
    execFileSync(process.env.CC || 'cc', ['-O2', '-pthread', '-o', bin, src, ...extra], { stdio: 'inherit' })
  }
  return bin
}

function median(values) {
  const s = [...values].sort((a, b) => a - b)
  const mid = s.length >> 1
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}

/** q-th quantile of an ascending array. */
function percentile(sorted, q) {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
}

function shuffle(list) {
  for (let i = list.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    const t = list[i]
    list[i] = list[j]
    list[j] = t
  }
  return list
}

/** --name value / --flag parsing against defaults (numbers stay numbers). */
function parseArgs(argv, defaults) {
  const args = { ...defaults }
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '')
    if (!(key in defaults)) throw new Error(`unknown option ${argv[i]} (know: ${Object.keys(defaults).join(', ')})`)
    if (typeof defaults[key] === 'boolean') args[key] = true
    else args[key] = typeof defaults[key] === 'number' ? Number(argv[++i]) : argv[++i]
  }
  return args
}

/** bench/out/snapshot-<mib>m.bin: `mib` MiB of random bytes (made once, reused). */
function snapshotFile(mib) {
  const file = path.join(out, `snapshot-${mib}m.bin`)
  if (!fs.existsSync(file) || fs.statSync(file).size !== mib * 1024 * 1024) {
    fs.mkdirSync(out, { recursive: true })
    const fd = fs.openSync(file, 'w')
    const block = Buffer.alloc(1 << 20)
    for (let i = 0; i < mib; i++) {
      crypto.randomFillSync(block)
      fs.writeSync(fd, block)
    }
    fs.closeSync(fd)
  }
  return file
}

/**
 * Touches and frees `mib` MiB of fresh memory: on a VM whose host backs guest memory lazily,
 * first touches are ~10x slower, and would be charged to whatever runs first.
 */
function warmMemory(mib) {
  const { Mapping } = require('../dist')
  const m = Mapping.anonymous(mib * 1024 * 1024, { populate: true })
  m.unmap()
}

module.exports = { buildC, median, percentile, shuffle, parseArgs, snapshotFile, warmMemory, out }
