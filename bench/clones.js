// Many clones, one page cache: N clone processes (bench/clone-guest.js) each touch the same
// working set of their memory, each with its own uffd received here by fd passing and served by
// a FaultServer of its own from one snapshot file.
//   one page cache  the clones map one memfd; servers in MINOR mode: the first clone's faults
//                   fill the page cache (once), the others' only UFFDIO_CONTINUE it;
//   copies          each clone has private memory; servers in MISSING mode copy every page
//                   into every clone (UFFDIO_COPY: what a handler without a shared page cache
//                   does, N copies).
// Memory is measured, not computed: the memfd's allocated blocks (the page cache) plus the
// clones' anonymous pages in their mappings (/proc/PID/smaps); fault costs from the servers'
// per-stage histograms, and each clone's time to touch its working set.
//
//   npm run bench:clones [-- --clones 8 --mib 256 --faultAround 65536 --order seq --rounds 3 --oneByOne --json]
//
// Run it under `flock -x /work/locks/cpu` on a shared machine.
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { median, parseArgs, snapshotFile, warmMemory } = require('./lib')
const { FaultServer, Mapping, receiveFds, receiveUffd, sendFds, socketPair } = require('../dist')
const { native } = require('../dist/addon/native')

const MiB = 1 << 20

/** Rss, Pss and Anonymous (bytes) of the mapping at `address` in process `pid`. */
function smapsOf(pid, address) {
  const text = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8')
  const start = text.indexOf(`\n${address.toString(16)}-`)
  const at = start < 0 && text.startsWith(`${address.toString(16)}-`) ? 0 : start + 1
  if (start < 0 && at !== 0) throw new Error(`no mapping at 0x${address.toString(16)} in ${pid}`)
  const block = text.slice(at).split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)[0]
  const kb = (name) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(block)?.[1] ?? 0) * 1024
  return { rss: kb('Rss'), pss: kb('Pss'), anonymous: kb('Anonymous') }
}

async function startClone(shared, length, memfd) {
  const [mine, theirs] = socketPair()
  const fds = shared ? [theirs, memfd.fd] : [theirs]
  const child = spawn(process.execPath, [path.join(__dirname, 'clone-guest.js'), JSON.stringify({ shared, length })], {
    stdio: ['ignore', 'inherit', 'inherit', ...fds],
  })
  native.close(theirs)
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
  const { uffd, data } = await receiveUffd(mine)
  const address = BigInt(JSON.parse(data.toString()).address)
  return {
    uffd,
    address,
    async touch(order) {
      await sendFds(mine, JSON.stringify({ order }), [])
      const report = await receiveFds(mine, { maxFds: 0 })
      return JSON.parse(report.data.toString())
    },
    async exit() {
      await sendFds(mine, 'exit', [])
      await exited
      native.close(mine)
    },
  }
}

async function variant(kind, args, file) {
  const ws = args.mib * MiB
  const shared = kind === 'one page cache'
  const memfd = shared ? Mapping.memfd(ws, { name: 'bench-clones' }) : null
  const clones = []
  const servers = []
  try {
    for (let i = 0; i < args.clones; i++) {
      const c = await startClone(shared, ws, memfd)
      clones.push(c)
      const server = new FaultServer(c.uffd, { faultAround: args.faultAround })
      server.on('error', (e) => console.error(`clone ${i}: ${e.message}`))
      const range = { address: c.address, length: ws }
      server.serve(range, { file }, shared ? { mode: 'minor', backing: memfd } : {})
      servers.push(server)
    }
    // The first clone alone (it fills the page cache, if there is one), then the others at once
    // (or, with --oneByOne, one after another: fault costs without 7 clones sharing 2 CPUs).
    const first = await clones[0].touch(args.order)
    const others = []
    if (args.oneByOne) for (const c of clones.slice(1)) others.push(await c.touch(args.order))
    else others.push(...(await Promise.all(clones.slice(1).map((c) => c.touch(args.order)))))
    if (new Set([first, ...others].map((r) => r.sum)).size !== 1) throw new Error('clones read different bytes')
    const mem = clones.map((c, i) => smapsOf([first, ...others][i].pid, c.address))
    const pageCache = shared ? fs.fstatSync(memfd.fd).blocks * 512 : 0
    const anonymous = mem.reduce((n, m) => n + m.anonymous, 0)
    const stats = servers.map((s) => s.stats())
    const restStats = stats.slice(1)
    return {
      memoryBytes: pageCache + anonymous,
      pageCacheBytes: pageCache,
      anonymousBytes: anonymous,
      pssBytes: mem.reduce((n, m) => n + m.pss, 0),
      firstSeconds: first.ns / 1e9,
      othersSeconds: median(others.map((r) => r.ns / 1e9)),
      firstFaults: stats[0].faults,
      othersFaults: median(restStats.map((s) => s.faults)),
      firstFaultP50us: stats[0].stages.total.p50,
      othersFaultP50us: median(restStats.map((s) => s.stages.total.p50)),
      firstSourceP50us: stats[0].stages.source.p50,
      othersSourceP50us: median(restStats.map((s) => s.stages.source.p50)),
      othersSourceMaxUs: Math.max(...restStats.map((s) => s.stages.source.max)),
      firstFillP50us: stats[0].stages.fill.p50,
      othersFillP50us: median(restStats.map((s) => s.stages.fill.p50)),
      firstCachedPages: stats[0].cachedPages,
      othersCachedPages: restStats.reduce((n, s) => n + s.cachedPages, 0),
    }
  } finally {
    for (const s of servers) s.close()
    await Promise.all(clones.map((c) => c.exit()))
    for (const c of clones) c.uffd.close()
    memfd?.unmap()
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2), {
    clones: 8,
    mib: 256,
    faultAround: 64 * 1024,
    order: 'seq',
    rounds: 3,
    warmMiB: 3072,
    oneByOne: false,
    json: false,
  })
  const file = snapshotFile(args.mib)
  warmMemory(args.warmMiB)
  const runs = { 'one page cache': [], copies: [] }
  for (let r = 0; r < args.rounds; r++)
    for (const kind of Object.keys(runs)) runs[kind].push(await variant(kind, args, file))
  const ws = args.mib * MiB
  const pick = (kind, key) => median(runs[kind].map((x) => x[key]))
  const rows = Object.keys(runs).map((kind) => ({
    variant: kind,
    memoryMiB: +(pick(kind, 'memoryBytes') / MiB).toFixed(1),
    'memory / working set': +(pick(kind, 'memoryBytes') / ws).toFixed(2),
    pssMiB: +(pick(kind, 'pssBytes') / MiB).toFixed(1),
    'clone 1 s': +pick(kind, 'firstSeconds').toFixed(3),
    'clones 2.. s (median)': +pick(kind, 'othersSeconds').toFixed(3),
    'faults per clone': pick(kind, 'firstFaults'),
    'clone 1 fault p50 µs': +pick(kind, 'firstFaultP50us').toFixed(1),
    'clones 2.. fault p50 µs': +pick(kind, 'othersFaultP50us').toFixed(1),
    'clone 1 source p50 µs': +pick(kind, 'firstSourceP50us').toFixed(1),
    'clones 2.. source max µs': +pick(kind, 'othersSourceMaxUs').toFixed(1),
    'clone 1 fill p50 µs': +pick(kind, 'firstFillP50us').toFixed(1),
    'clones 2.. fill p50 µs': +pick(kind, 'othersFillP50us').toFixed(1),
    'pages filled by clones 2..': pick(kind, 'othersCachedPages'),
  }))
  const ratio = median(runs['one page cache'].map((x, i) => x.memoryBytes / runs.copies[i].memoryBytes))
  const summary = {
    clones: args.clones,
    workingSetMiB: args.mib,
    faultAround: args.faultAround,
    order: args.order,
    others: args.oneByOne ? 'one by one' : 'together',
    rounds: args.rounds,
    'one page cache / copies (memory)': +ratio.toFixed(3),
    'one page cache: clones 2.. fault p50 / clone 1': +median(
      runs['one page cache'].map((x) => x.othersFaultP50us / x.firstFaultP50us),
    ).toFixed(2),
    'clones 2.. time, one page cache / copies': +median(
      runs['one page cache'].map((x, i) => x.othersSeconds / runs.copies[i].othersSeconds),
    ).toFixed(2),
  }
  if (args.json) console.log(JSON.stringify({ summary, rows, runs }, null, 2))
  else {
    console.table(rows)
    console.table([summary])
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
