#!/usr/bin/env node
// Prints the Debian mirror this machine's apt uses (for debootstrap in standin-image.sh), so the
// stand-in image builds behind a user's own mirror or proxy: DEBIAN_MIRROR if set, else the
// first Debian archive entry (not -security) of /etc/apt/sources.list, sources.list.d/*.list
// (one-line format) and sources.list.d/*.sources (deb822), else deb.debian.org. On stderr: where
// the answer came from.
//   node scripts/docker/debian-mirror.js [APT_ETC_DIR]       (default /etc/apt)
'use strict'
const fs = require('node:fs')
const path = require('node:path')

const FALLBACK = 'http://deb.debian.org/debian'
const CODENAMES = new Set(
  'buzz rex bo hamm slink potato woody sarge etch lenny squeeze wheezy jessie stretch buster bullseye bookworm trixie forky duke sid stable testing unstable oldstable oldoldstable'.split(
    ' ',
  ),
)

/** A Debian archive suite (bookworm, bookworm-updates, stable...), not the security archive. */
function isDebianSuite(suite) {
  const [name, pocket] = suite.split('-')
  return CODENAMES.has(name) && pocket !== 'security'
}

/** [{ uri, suites, file }] of the deb (not deb-src) entries of one file. */
function entries(file) {
  let text
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch {
    return []
  }
  const out = []
  if (file.endsWith('.sources')) {
    // deb822: stanzas separated by blank lines; fields may hold several values.
    for (const stanza of text.split(/\n\s*\n/)) {
      const fields = {}
      for (const line of stanza.split('\n')) {
        if (line.startsWith('#')) continue
        const m = /^([A-Za-z-]+):\s*(.*)$/.exec(line)
        if (m) fields[m[1].toLowerCase()] = m[2].trim()
      }
      if (fields.enabled === 'no' || !(fields.types ?? '').split(/\s+/).includes('deb')) continue
      for (const uri of (fields.uris ?? '').split(/\s+/).filter(Boolean))
        out.push({ uri, suites: (fields.suites ?? '').split(/\s+/).filter(Boolean), file })
    }
  } else {
    for (const raw of text.split('\n')) {
      const line = raw.replace(/#.*/, '').trim()
      // deb [ options ] uri suite components...
      const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line)
      if (m) out.push({ uri: m[1], suites: [m[2]], file })
    }
  }
  return out
}

function aptFiles(etc) {
  const dir = path.join(etc, 'sources.list.d')
  let listed = []
  try {
    listed = fs
      .readdirSync(dir)
      .filter((f) => f.endsWith('.list') || f.endsWith('.sources'))
      .sort()
      .map((f) => path.join(dir, f))
  } catch {
    /* none */
  }
  return [path.join(etc, 'sources.list'), ...listed]
}

/** { mirror, from } */
function debianMirror(etc = '/etc/apt', env = process.env) {
  if (env.DEBIAN_MIRROR) return { mirror: env.DEBIAN_MIRROR, from: 'DEBIAN_MIRROR' }
  for (const file of aptFiles(etc)) {
    for (const e of entries(file)) {
      if (!/^(https?|ftp|file):/.test(e.uri)) continue
      if (e.suites.some(isDebianSuite)) return { mirror: e.uri.replace(/\/+$/, ''), from: e.file }
    }
  }
  return { mirror: FALLBACK, from: `default (no Debian archive in ${etc})` }
}

module.exports = { debianMirror, entries, isDebianSuite }

if (require.main === module) {
  const { mirror, from } = debianMirror(process.argv[2])
  console.error(`debian-mirror: ${mirror} (from ${from})`)
  console.log(mirror)
}
