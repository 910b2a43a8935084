// Lazy restore from remote stores (issue 15), in interleaved rounds, as ratios:
//
//   workingset  a snapshot (default 1 GiB) and a workload touching a fixed random 10% of its
//               pages in a fixed order (one native thread, --workUs of busy work per page, as a
//               service computes on what it reads), served locally ({ file }) and from nbdkit
//               with 0, 1 and 25 ms added to each read (its delay filter): with the recorded
//               working set vs without, and vs the same workload on memory already resident.
//               Without a working set every touched page is a demand fault, one round trip
//               each, so that variant runs at 0 ms only (its fault count does not depend on the
//               delay; its time at 25 ms would be ~26,000 x 25 ms). Two placements: the
//               scheduler's ('scheduler': nothing pinned) and 'split' (the process, so the
//               engine, the JS client and nbdkit, on CPU 0; the workload's thread on CPU 1, as a
//               VMM pins a guest's vCPU thread away from its restore handler).
//   sequential  a full restore from nbdkit at 25 ms (and 0 ms): one thread reading every page in
//               order with background prefetch, until every page is present: MB/s.
//   around      adaptive fault-around (the default) vs fixed windows, locally: a thread reading
//               the whole snapshot in order (vs the best fixed window), a random 10% (vs 4 KiB
//               fault-around, and the pages it installs), and the main JS thread reading it in
//               order vs bench/c/restore.c (a C handler copying 2 MiB per fault). In both CPU
//               placements: the process on CPU 0 (so the engine's threads are), the faulting
//               thread on CPU 0 ('same') or CPU 1 ('other').
//
//   npm run bench:restore-remote [-- --sizeMiB 1024 --rounds 3 --workUs 20 --only around --json]
//
// Run it alone: flock -x /work/locks/cpu npm run bench:restore-remote
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const { spawn, spawnSync, execFileSync } = require('node:child_process')
const { buildC, median, parseArgs, snapshotFile, out } = require('./lib')

const MiB = 1 << 20
const PAGE = 4096

function dist() {
  return {
    ...require('../dist'),
    ...require('../dist/testing'),
  }
}

// ---- helpers ---------------------------------------------------------------------------------

/** A fixed pseudo-random 10% of the pages, in a fixed order. */
function subset(pages, fraction = 0.1, seed = 12345) {
  const all = new Uint32Array(pages)
  for (let i = 0; i < pages; i++) all[i] = i
  let x = seed
  for (let i = pages - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    const j = x % (i + 1)
    const t = all[i]
    all[i] = all[j]
    all[j] = t
  }
  return all.slice(0, Math.round(pages * fraction))
}

function addressesOf(base, order) {
  const a = new BigUint64Array(order.length)
  for (let i = 0; i < order.length; i++) a[i] = base + BigInt(order[i] * PAGE)
  return a
}

/** Fresh anonymous memory is ~10x slower on first touch on this VM: touch and free some first. */
function warmUp(gib) {
  const { Mapping } = dist()
  for (let i = 0; i < gib; i++) {
    const m = Mapping.anonymous(1 << 30)
    const v = new Uint8Array(m.buffer)
    for (let at = 0; at < v.length; at += PAGE) v[at] = 1
    m.unmap()
  }
}

/** Pins the main thread (only) to `cpu`: threads it creates later inherit it. */
function pinMain(cpu) {
  execFileSync('taskset', ['-p', '-c', String(cpu), String(process.pid)], { stdio: 'ignore' })
}

const DELAY_THREADS = 128
const DELAY_CONNECTIONS = 8

async function startNbdkit(file, delayMs) {
  const dir = fs.mkdtempSync(path.join(out, 'nbdkit-'))
  const sock = path.join(dir, 'sock')
  const pid = path.join(dir, 'pid')
  const args = ['-f', '-r', '--exit-with-parent', '-P', pid, '-U', sock, '-e', 'snap']
  // The delay filter sleeps in a server thread: with nbdkit's default 16 threads, 16 reads per
  // delay at most. A network round trip occupies no server thread, so give it plenty: 128 per
  // connection, over 8 connections (fewer connections with more threads each cost nbdkit more
  // CPU here: its threads contend for each connection's locks).
  if (delayMs > 0) args.push('-t', String(DELAY_THREADS), '--filter=delay')
  args.push('file', `file=${file}`)
  if (delayMs > 0) args.push(`delay-read=${delayMs}ms`)
  const child = spawn('nbdkit', args, { stdio: 'ignore' })
  for (let i = 0; i < 500 && !fs.existsSync(pid); i++) await new Promise((r) => setTimeout(r, 10))
  if (!fs.existsSync(pid)) throw new Error('nbdkit did not start')
  return {
    url: `nbd+unix:///snap?socket=${sock}`,
    stop() {
      child.kill('SIGKILL')
      fs.rmSync(dir, { recursive: true, force: true })
    },
  }
}

function runC(binary, args, env = {}, cpu = null) {
  const cmd = cpu === null ? binary : 'taskset'
  const argv = cpu === null ? args : ['-c', String(cpu), binary, ...args]
  const r = spawnSync(cmd, argv.map(String), { encoding: 'utf8', timeout: 300_000, env: { ...process.env, ...env } })
  if (r.status !== 0) throw new Error(`${binary} failed: ${r.stderr}`)
  return JSON.parse(r.stdout)
}

const ratio = (xs) => +median(xs).toFixed(2)

// ---- workingset -------------------------------------------------------------------------------

async function recordWorkingSet(file, size, order) {
  const { Userfaultfd, Mapping, FaultServer, touch } = dist()
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(size)
  const server = new FaultServer(uffd)
  try {
    server.serve(m, { file }, { recordWorkingSet: true })
    await touch(addressesOf(m.address, order), { threads: 1 })
    const ws = await server.workingSet()
    if (ws.pages.length !== order.length) throw new Error('working set: wrong page count')
    const wsFile = path.join(out, `ws-${size / MiB}m.bin`)
    ws.save(wsFile)
    return wsFile
  } finally {
    server.close()
    uffd.close()
    m.unmap()
  }
}

async function workload(args, size, order, spec, wsFile) {
  const { Userfaultfd, Mapping, FaultServer, RemoteSource, touch } = dist()
  const m = Mapping.anonymous(size)
  let uffd = null
  let server = null
  let remote = null
  const errors = []
  try {
    // A handler keeps its store connections open between restores: connect before the clock
    // starts (nbdkit creates its worker threads per connection).
    let source = spec
    if (spec !== null && 'nbd' in spec) {
      const delayed = spec.delayMs > 0
      remote = await RemoteSource.open(spec.nbd, delayed ? { connections: DELAY_CONNECTIONS } : {})
      await remote.store.connected() // the working set's native reads borrow them
      source = { remote }
    }
    const addrs = addressesOf(m.address, order)
    if (source === null) {
      // resident: the snapshot's bytes already in memory (copied in before the clock starts)
      const fd = fs.openSync(snapshotFile(args.sizeMiB), 'r')
      const chunk = Buffer.alloc(16 * MiB)
      for (let at = 0; at < size; at += chunk.length) {
        fs.readSync(fd, chunk, 0, chunk.length, at)
        m.write(at, chunk)
      }
      fs.closeSync(fd)
    }
    const t0 = process.hrtime.bigint()
    if (source !== null) {
      uffd = Userfaultfd.open()
      server = new FaultServer(uffd)
      server.on('error', (e) => errors.push(e))
      server.serve(m, source, wsFile ? { workingSet: wsFile } : {})
    }
    const cpu = args.placement === 'split' ? { cpu: 1 } : {}
    await touch(addrs, { threads: 1, workNs: args.workUs * 1000, ...cpu })
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9
    const s = server?.stats()
    if (errors.length > 0) throw errors[0]
    return {
      seconds,
      faults: s ? s.faults : 0,
      pages: s ? s.demandPages + s.prefetchPages + s.handlerPages : 0,
      reads: s ? s.fed.backgroundReads : 0,
      nativeReads: s ? s.fed.nativeReads : 0,
    }
  } finally {
    server?.close()
    uffd?.close()
    m.unmap()
    await remote?.close()
  }
}

async function workingSetSection(args) {
  const file = snapshotFile(args.sizeMiB)
  const size = args.sizeMiB * MiB
  const order = subset(size / PAGE)
  const wsFile = await recordWorkingSet(file, size, order)
  const delays = String(args.delays).split(',').map(Number)
  const servers = {}
  for (const d of delays) servers[d] = await startNbdkit(file, d)
  const rows = []
  const res = { resident: [] }
  try {
    for (let r = 0; r < args.rounds; r++) {
      res.resident.push(await workload(args, size, order, null))
      const variants = [
        ['local', { file }, false],
        ['local', { file }, true],
      ]
      for (const d of delays) {
        if (d === 0) variants.push([`nbd ${d} ms`, { nbd: servers[d].url, delayMs: d }, false])
        variants.push([`nbd ${d} ms`, { nbd: servers[d].url, delayMs: d }, true])
      }
      for (const [name, source, ws] of variants) {
        const key = `${name}${ws ? ' +ws' : ''}`
        res[key] ??= []
        res[key].push(await workload(args, size, order, source, ws ? wsFile : null))
      }
    }
  } finally {
    for (const s of Object.values(servers)) s.stop()
  }
  const noWs = (name) => res[name] ?? res['nbd 0 ms']
  for (const [key, list] of Object.entries(res)) {
    if (key === 'resident') continue
    const base = key.endsWith(' +ws') ? noWs(key.slice(0, -4)) : null
    rows.push({
      workload: `${args.placement}: ${order.length} pages (10%) of ${args.sizeMiB} MiB, ${args.workUs} us/page: ${key}`,
      seconds: +median(list.map((x) => x.seconds)).toFixed(3),
      vsResident: ratio(list.map((x, i) => x.seconds / res.resident[i].seconds)),
      demandFaults: Math.round(median(list.map((x) => x.faults))),
      faultsSavedVsNoWs: base ? ratio(list.map((x, i) => 1 - x.faults / base[i].faults)) : null,
      pagesInstalled: Math.round(median(list.map((x) => x.pages))),
      backgroundReads: Math.round(median(list.map((x) => x.reads))),
      nativeReads: Math.round(median(list.map((x) => x.nativeReads))),
    })
  }
  rows.unshift({
    workload: `${args.placement}: ${order.length} pages (10%) of ${args.sizeMiB} MiB, ${args.workUs} us/page: resident`,
    seconds: +median(res.resident.map((x) => x.seconds)).toFixed(3),
    vsResident: 1,
    demandFaults: 0,
    faultsSavedVsNoWs: null,
    pagesInstalled: 0,
    backgroundReads: 0,
    nativeReads: 0,
  })
  return rows
}

// ---- sequential -------------------------------------------------------------------------------

async function sequentialOnce(url, size) {
  const { Userfaultfd, Mapping, FaultServer, RemoteSource, touch, pages } = dist()
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(size)
  const server = new FaultServer(uffd, { prefetch: true })
  const errors = []
  server.on('error', (e) => errors.push(e))
  const remote = await RemoteSource.open(url) // connected before the clock starts, as above
  try {
    const t0 = process.hrtime.bigint()
    server.serve(m, { remote })
    await touch(pages(m), { threads: 1 })
    await server.drained()
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9
    if (errors.length > 0) throw errors[0]
    return { seconds, faults: server.stats().faults }
  } finally {
    server.close()
    uffd.close()
    m.unmap()
    await remote.close()
  }
}

async function sequentialSection(args) {
  const file = snapshotFile(args.sizeMiB)
  const size = args.sizeMiB * MiB
  const rows = []
  for (const d of [25, 0]) {
    const srv = await startNbdkit(file, d)
    const runs = []
    try {
      for (let r = 0; r < args.rounds; r++) runs.push(await sequentialOnce(srv.url, size))
    } finally {
      srv.stop()
    }
    const s = median(runs.map((x) => x.seconds))
    rows.push({
      workload: `sequential full restore of ${args.sizeMiB} MiB from nbdkit, ${d} ms per read`,
      seconds: +s.toFixed(2),
      MBps: Math.round(size / s / 1e6),
      demandFaults: Math.round(median(runs.map((x) => x.faults))),
    })
  }
  return rows
}

// ---- around -----------------------------------------------------------------------------------

async function touchRestore(file, size, order, faultAround, cpu) {
  const { Userfaultfd, Mapping, FaultServer, touch } = dist()
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(size)
  const server = new FaultServer(uffd, faultAround === 'adaptive' ? {} : { faultAround })
  try {
    const addrs = addressesOf(m.address, order)
    const t0 = process.hrtime.bigint()
    server.serve(m, { file })
    await touch(addrs, { threads: 1, cpu })
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9
    const s = server.stats()
    return { seconds, pages: s.demandPages, faults: s.faults }
  } finally {
    server.close()
    uffd.close()
    m.unmap()
  }
}

/** The main JS thread reads the snapshot in order (one u32 per page), default options. */
function mainThreadRead(file, size, cpu) {
  const { Userfaultfd, Mapping, FaultServer } = dist()
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(size)
  const server = new FaultServer(uffd)
  try {
    server.serve(m, { file })
    if (cpu !== 0) pinMain(cpu) // the engine's threads stay on CPU 0
    const v = new Uint32Array(m.buffer)
    const t0 = process.hrtime.bigint()
    let sum = 0
    for (let i = 0; i < v.length; i += PAGE / 4) sum += v[i]
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9
    if (cpu !== 0) pinMain(0)
    return { seconds, sum, faults: server.stats().faults }
  } finally {
    server.close()
    uffd.close()
    m.unmap()
  }
}

// Runs in a child started under `taskset -c 0` (see main()).
async function aroundSection(args) {
  const cpu = args.placement === 'other' ? 1 : 0
  const file = snapshotFile(args.sizeMiB)
  const size = args.sizeMiB * MiB
  const restore = buildC('restore')
  const all = Uint32Array.from({ length: size / PAGE }, (_, i) => i)
  const random = subset(size / PAGE)
  const windows = [4096, 65536, 262144, MiB, 2 * MiB, 4 * MiB, 'adaptive']
  const seq = Object.fromEntries(windows.map((w) => [w, []]))
  const rnd = Object.fromEntries([4096, 65536, 'adaptive'].map((w) => [w, []]))
  const c = []
  const main = []
  for (let r = 0; r < args.rounds; r++) {
    for (const w of windows) seq[w].push(await touchRestore(file, size, all, w, cpu))
    for (const w of Object.keys(rnd))
      rnd[w].push(await touchRestore(file, size, random, w === 'adaptive' ? w : Number(w), cpu))
    c.push(runC(restore, [file, 'uffd', 2 * MiB], cpu === 1 ? { BENCH_TOUCHER_CPU: '1' } : {}, 0))
    main.push(mainThreadRead(file, size, cpu))
  }
  const secs = (list) => median(list.map((x) => x.seconds))
  const fixed = windows.filter((w) => w !== 'adaptive')
  const best = fixed.reduce((a, b) => (secs(seq[b]) < secs(seq[a]) ? b : a))
  const label = (w) => (w === 'adaptive' ? 'adaptive' : `${w / 1024} KiB`)
  return [
    {
      workload: `${args.placement}: sequential ${args.sizeMiB} MiB, one thread`,
      ...Object.fromEntries(windows.map((w) => [label(w), +secs(seq[w]).toFixed(3)])),
      bestFixed: label(best),
      adaptiveVsBest: ratio(seq.adaptive.map((x, i) => seq[best][i].seconds / x.seconds)),
      adaptiveFaults: Math.round(median(seq.adaptive.map((x) => x.faults))),
    },
    {
      workload: `${args.placement}: random 10% of ${args.sizeMiB} MiB (${random.length} pages), one thread`,
      ...Object.fromEntries(
        Object.keys(rnd).map((w) => [label(w === 'adaptive' ? w : Number(w)), +secs(rnd[w]).toFixed(3)]),
      ),
      adaptiveVs4K: ratio(rnd.adaptive.map((x, i) => rnd[4096][i].seconds / x.seconds)),
      adaptivePagesPerTouched: ratio(rnd.adaptive.map((x) => x.pages / random.length)),
      pages64KPerTouched: ratio(rnd[65536].map((x) => x.pages / random.length)),
    },
    {
      workload: `${args.placement}: main JS thread reads ${args.sizeMiB} MiB in order (default options) vs restore.c 2 MiB/fault`,
      serverSeconds: +secs(main).toFixed(3),
      cSeconds: +secs(c).toFixed(3),
      vsC2MiB: ratio(main.map((x, i) => c[i].seconds / x.seconds)),
      serverFaults: Math.round(median(main.map((x) => x.faults))),
    },
  ]
}

// ---- driver -----------------------------------------------------------------------------------

async function child(args) {
  warmUp(args.warmGiB)
  const sections = { workingset: workingSetSection, sequential: sequentialSection, around: aroundSection }
  const rows = await sections[args.child](args)
  process.stdout.write(JSON.stringify(rows))
}

function runChild(args, section, placement) {
  const argv = [__filename, '--child', section, '--placement', placement]
  for (const k of ['sizeMiB', 'rounds', 'workUs', 'delays', 'warmGiB']) argv.push(`--${k}`, String(args[k]))
  // the whole process (and the nbdkit it starts) on CPU 0; the faulting thread is placed apart
  const pinned = section === 'around' || placement === 'split'
  const cmd = pinned ? 'taskset' : process.execPath
  const full = pinned ? ['-c', '0', process.execPath, ...argv] : argv
  const r = spawnSync(cmd, full, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`${section} (${placement}) failed`)
  return JSON.parse(r.stdout)
}

async function main() {
  const args = parseArgs(process.argv.slice(2), {
    sizeMiB: 1024,
    rounds: 3,
    workUs: 20,
    delays: '0,1,25',
    warmGiB: 2,
    only: '',
    placement: 'both',
    child: '',
    json: false,
  })
  if (args.child) return child(args)
  const result = {}
  for (const section of ['workingset', 'sequential', 'around']) {
    if (args.only && args.only !== section) continue
    const both = { around: ['same', 'other'], workingset: ['scheduler', 'split'], sequential: ['scheduler'] }[section]
    const placements = args.placement === 'both' || !both.includes(args.placement) ? both : [args.placement]
    result[section] = placements.flatMap((p) => runChild(args, section, p))
    if (!args.json) console.table(result[section])
  }
  if (args.json) console.log(JSON.stringify(result, null, 2))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
