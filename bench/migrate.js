// Live migration benchmark: source and target as two processes in two network namespaces joined
// by a veth pair (userfaultfd migrate send / receive), against references measured in the same
// rounds over the same link:
//   floor   a plain TCP stream of the same bytes (bench/c/tcp_stream.c), into memory the receiver
//           touched beforehand ("touched", the fastest case) and into memory it just mapped
//           ("fresh", as a migration target's memory is)
//   rtt     one 16-byte request and its 4 KiB answer on the idle link (bench/c/rtt.c)
// and the figures of the issue:
//   total   migration of idle memory (no writer) / floor            target <= 1.15
//   down    downtime with a 64 MiB/s writer, post-copy and hybrid   target <= 20 ms, 4 GiB / 1 GiB <= 1.2
//   demand  demand-fault p99 in post-copy while the push runs / idle rtt p50   target <= 3
//           (the default postcopyPriority, 'latency'; postcopythr: 'throughput', for its time)
//   wire    bytes on the wire / memory size, post-copy              target <= 1.05
//
//   npm run bench:migrate [-- --sizes 1024,4096 --rounds 3 --placements split,packed --warmGiB 6 --only NAME,NAME --json]
//   (--only: the variants whose names contain one of the NAMEs, e.g. rtt,writer-postcopy)
//
// Ratios are medians over rounds; each round runs every variant once, in a shuffled order.
// Placements: split (source on CPU 0, target on CPU 1), packed (both on CPU 0).
'use strict'
const { spawn, spawnSync } = require('node:child_process')
const path = require('node:path')
const readline = require('node:readline')
const { buildC, median, parseArgs, shuffle } = require('./lib')
const { createLinkPair } = require('../dist/cli/migrate/netns')

const MiB = 1 << 20
const cli = path.join(__dirname, '..', 'dist', 'cli', 'index.js')
const SECRET = 'bench-secret-0123456789abcdef'

const args = parseArgs(process.argv.slice(2), {
  sizes: '1024,4096',
  rounds: 3,
  placements: 'split,packed',
  warmGiB: 6,
  dirtyRate: 64,
  json: false,
  only: '',
})
const sizes = args.sizes.split(',').map(Number)
const small = sizes[0]
const large = sizes[1]

function start(argv, onLine) {
  const child = spawn(argv[0], argv.slice(1), {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, USERFAULTFD_MIGRATE_SECRET: SECRET },
  })
  const lines = []
  let stderr = ''
  readline.createInterface({ input: child.stdout }).on('line', (l) => {
    lines.push(l)
    onLine?.(l)
  })
  child.stderr.on('data', (d) => {
    stderr += d
  })
  const exit = new Promise((resolve) => child.on('close', (code) => resolve(code)))
  return { child, lines, exit, stderr: () => stderr }
}

function prefix(link, side, cpus) {
  return ['taskset', '-c', cpus, ...link.exec(side)]
}

function waitLine(proc, re, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${re}: ${proc.stderr()}`)), timeoutMs)
    const check = () => {
      const l = proc.lines.find((x) => re.test(x))
      if (l !== undefined) {
        clearTimeout(timer)
        resolve(l)
        return true
      }
      return false
    }
    if (check()) return
    proc.child.stdout.on('data', () => setImmediate(check))
    proc.exit.then(() => {
      if (!check()) reject(new Error(`exited before ${re}: ${proc.stderr()}`))
    })
  })
}

let port = 47200
async function floor(link, cpus, mib, kind) {
  const bin = buildC('tcp_stream')
  const p = port++
  const recv = start([
    ...prefix(link, 'target', cpus.target),
    bin,
    'recv',
    link.targetIp,
    String(p),
    String(mib * MiB),
    kind,
  ])
  await waitLine(recv, /listening/, 20_000)
  const send = start([...prefix(link, 'source', cpus.source), bin, 'send', link.targetIp, String(p), String(mib * MiB)])
  const [a, b] = await Promise.all([send.exit, recv.exit])
  if (a !== 0 || b !== 0) throw new Error(`tcp_stream failed: ${send.stderr()} ${recv.stderr()}`)
  return { ms: JSON.parse(send.lines[send.lines.length - 1]).seconds * 1000 }
}

async function rtt(link, cpus) {
  const bin = buildC('rtt')
  const p = port++
  const server = start([...prefix(link, 'target', cpus.target), bin, 'server', link.targetIp, String(p), '4096'])
  await waitLine(server, /listening/, 20_000)
  const client = start([
    ...prefix(link, 'source', cpus.source),
    bin,
    'client',
    link.targetIp,
    String(p),
    '2000',
    '4096',
  ])
  await client.exit
  server.child.kill('SIGKILL')
  await server.exit
  return JSON.parse(client.lines[client.lines.length - 1])
}

// priority: postcopyPriority, undefined for the default
async function migration(link, cpus, mib, mode, dirtyRate, readers, prealloc = false, priority = undefined) {
  const p = port++
  const target = start([
    ...prefix(link, 'target', cpus.target),
    process.execPath,
    cli,
    'migrate',
    'receive',
    '--listen',
    `${link.targetIp}:${p}`,
    '--events',
    ...(prealloc ? ['--prealloc', `${mib}M`] : []),
  ])
  await waitLine(target, /"listening"/, 20_000)
  const source = start([
    ...prefix(link, 'source', cpus.source),
    process.execPath,
    cli,
    'migrate',
    'send',
    '--to',
    `${link.targetIp}:${p}`,
    '--size',
    `${mib}M`,
    '--mode',
    mode,
    '--dirty-rate',
    String(dirtyRate),
    '--target-readers',
    String(readers),
    ...(priority === undefined ? [] : ['--postcopy-priority', priority]),
    '--events',
  ])
  const timer = setTimeout(() => {
    source.child.kill('SIGKILL')
    target.child.kill('SIGKILL')
  }, 300_000)
  await Promise.all([source.exit, target.exit])
  clearTimeout(timer)
  const find = (proc) => {
    const l = proc.lines.find((x) => x.includes('"event":"result"'))
    return l === undefined ? undefined : JSON.parse(l)
  }
  const s = find(source)
  const t = find(target)
  if (s === undefined || t === undefined || s.result.verified !== true || t.verified !== true)
    throw new Error(`migration ${mode} ${mib} MiB failed: ${source.stderr()} ${target.stderr()} ${JSON.stringify(s)}`)
  return { ...s.result, targetFaultP99us: t.workload?.faultP99us ?? 0 }
}

function warm(gib) {
  // This VM backs guest memory lazily: first touches of fresh guest memory are ~10x slower.
  // Touch and free a few GiB so that every variant gets warm memory.
  const r = spawnSync(process.execPath, [
    '-e',
    `for (let i = 0; i < ${gib}; i++) { const b = Buffer.allocUnsafeSlow(1 << 30); b.fill(1) }`,
  ])
  if (r.status !== 0) throw new Error(`warm-up failed: ${r.stderr}`)
}

function variants() {
  const rate = args.dirtyRate * MiB
  const v = [
    { name: 'floor-touched', run: (l, c) => floor(l, c, small, 'touched') },
    { name: 'floor-fresh', run: (l, c) => floor(l, c, small, 'fresh') },
    { name: 'rtt', run: (l, c) => rtt(l, c) },
    { name: 'idle-hybrid', run: (l, c) => migration(l, c, small, 'hybrid', 0, 0) },
    { name: 'idle-hybrid-touched', run: (l, c) => migration(l, c, small, 'hybrid', 0, 0, true) },
    { name: 'idle-precopy-touched', run: (l, c) => migration(l, c, small, 'precopy', 0, 0, true) },
    { name: 'idle-postcopy', run: (l, c) => migration(l, c, small, 'postcopy', 0, 0) },
    { name: 'idle-precopy', run: (l, c) => migration(l, c, small, 'precopy', 0, 0) },
    { name: `writer-hybrid-${small}`, run: (l, c) => migration(l, c, small, 'hybrid', rate, 1) },
    { name: `writer-postcopy-${small}`, run: (l, c) => migration(l, c, small, 'postcopy', rate, 1) },
    {
      name: `writer-postcopythr-${small}`,
      run: (l, c) => migration(l, c, small, 'postcopy', rate, 1, false, 'throughput'),
    },
    { name: `writer-precopy-${small}`, run: (l, c) => migration(l, c, small, 'precopy', rate, 1) },
  ]
  if (large) {
    v.push({ name: `writer-hybrid-${large}`, run: (l, c) => migration(l, c, large, 'hybrid', rate, 1) })
    v.push({ name: `writer-postcopy-${large}`, run: (l, c) => migration(l, c, large, 'postcopy', rate, 1) })
    v.push({
      name: `writer-postcopythr-${large}`,
      run: (l, c) => migration(l, c, large, 'postcopy', rate, 1, false, 'throughput'),
    })
  }
  if (!args.only) return v
  const only = String(args.only).split(',')
  return v.filter((x) => only.some((o) => x.name.includes(o)))
}

const PLACEMENTS = {
  split: { source: '0', target: '1' },
  packed: { source: '0', target: '0' },
}

function fmt(x, digits = 2) {
  return Number.isFinite(x) ? x.toFixed(digits) : '-'
}

async function main() {
  if (process.getuid?.() !== 0) throw new Error('bench:migrate needs root (network namespaces)')
  warm(args.warmGiB)
  const report = {}
  for (const placementName of args.placements.split(',')) {
    const cpus = PLACEMENTS[placementName]
    const link = createLinkPair(`b${process.pid}`)
    if ('reason' in link) throw new Error(link.reason)
    const rounds = []
    try {
      for (let r = 0; r < args.rounds; r++) {
        const row = {}
        for (const v of shuffle(variants())) {
          row[v.name] = await v.run(link, cpus)
          if (!args.json) process.stderr.write(`${placementName} round ${r + 1} ${v.name}\n`)
        }
        rounds.push(row)
      }
    } finally {
      link.remove()
    }
    const m = (f) => median(rounds.map(f).filter((x) => Number.isFinite(x)))
    const summary = {
      floorTouchedMs: m((r) => r['floor-touched']?.ms),
      floorFreshMs: m((r) => r['floor-fresh']?.ms),
      rttP50us: m((r) => r.rtt?.p50us),
      rttP99us: m((r) => r.rtt?.p99us),
    }
    for (const mode of ['hybrid', 'postcopy', 'precopy', 'hybrid-touched', 'precopy-touched']) {
      const k = `idle-${mode}`
      summary[`${k}.totalMs`] = m((r) => r[k]?.totalMs)
      summary[`${k}.vsTouched`] = m((r) => r[k]?.totalMs / r['floor-touched']?.ms)
      summary[`${k}.vsFresh`] = m((r) => r[k]?.totalMs / r['floor-fresh']?.ms)
    }
    for (const size of [small, large].filter(Boolean)) {
      for (const mode of ['hybrid', 'postcopy', 'postcopythr', 'precopy']) {
        const k = `writer-${mode}-${size}`
        if (!rounds.some((r) => r[k])) continue
        summary[`${k}.downtimeMs`] = m((r) => r[k]?.downtimeMs)
        summary[`${k}.totalMs`] = m((r) => r[k]?.totalMs)
        summary[`${k}.wire`] = m((r) => r[k]?.wireBytes / r[k]?.bytes)
        summary[`${k}.rounds`] = m((r) => r[k]?.rounds)
        summary[`${k}.dirtyAtStop`] = m((r) => r[k]?.dirtyAtStop)
        summary[`${k}.demandP50us`] = m((r) => r[k]?.demandP50Us)
        summary[`${k}.demandP99us`] = m((r) => r[k]?.demandP99Us)
        summary[`${k}.demandP99vsRtt`] = m((r) => r[k]?.demandP99Us / r.rtt?.p50us)
        summary[`${k}.threadFaultP99us`] = m((r) => r[k]?.targetFaultP99us)
        // The default postcopyPriority ('latency') against 'throughput', same size, same rounds.
        if (mode === 'postcopy')
          summary[`${k}.totalVsThroughput`] = m((r) => r[k]?.totalMs / r[`writer-postcopythr-${size}`]?.totalMs)
      }
    }
    if (large) {
      for (const mode of ['hybrid', 'postcopy'])
        summary[`downtime-${mode}.${large}vs${small}`] = m(
          (r) => r[`writer-${mode}-${large}`]?.downtimeMs / r[`writer-${mode}-${small}`]?.downtimeMs,
        )
    }
    report[placementName] = { summary, rounds }
    if (!args.json) {
      const out = (l) => process.stdout.write(`${l}\n`)
      out(
        `\n== ${placementName} (source on CPU ${cpus.source}, target on CPU ${cpus.target}), ${args.rounds} rounds, medians`,
      )
      out(
        `floor: ${small} MiB plain TCP ${fmt(summary.floorTouchedMs, 0)} ms into touched memory, ${fmt(summary.floorFreshMs, 0)} ms into fresh memory; idle rtt (4 KiB answer) p50 ${fmt(summary.rttP50us, 0)} us, p99 ${fmt(summary.rttP99us, 0)} us`,
      )
      for (const mode of ['hybrid', 'postcopy', 'precopy'])
        out(
          `idle ${mode.padEnd(9)} into fresh memory:   total ${fmt(summary[`idle-${mode}.totalMs`], 0)} ms = ${fmt(summary[`idle-${mode}.vsFresh`])}x floor (fresh), ${fmt(summary[`idle-${mode}.vsTouched`])}x floor (touched)`,
        )
      for (const mode of ['hybrid', 'precopy'])
        out(
          `idle ${mode.padEnd(9)} into touched memory: total ${fmt(summary[`idle-${mode}-touched.totalMs`], 0)} ms = ${fmt(summary[`idle-${mode}-touched.vsTouched`])}x floor (touched)`,
        )
      for (const size of [small, large].filter(Boolean))
        for (const mode of ['hybrid', 'postcopy', 'postcopythr', 'precopy']) {
          const k = `writer-${mode}-${size}`
          if (summary[`${k}.downtimeMs`] === undefined) continue
          out(
            `writer ${args.dirtyRate} MiB/s ${mode.padEnd(9)} ${String(size).padStart(5)} MiB: downtime ${fmt(summary[`${k}.downtimeMs`])} ms, total ${fmt(summary[`${k}.totalMs`], 0)} ms, wire ${fmt(summary[`${k}.wire`], 3)}x, rounds ${fmt(summary[`${k}.rounds`], 0)}, dirty at stop ${fmt(summary[`${k}.dirtyAtStop`], 0)}` +
              (mode === 'precopy'
                ? ''
                : `, demand p50 ${fmt(summary[`${k}.demandP50us`], 0)} us p99 ${fmt(summary[`${k}.demandP99us`], 0)} us = ${fmt(summary[`${k}.demandP99vsRtt`])}x idle rtt p50 (faulting thread p99 ${fmt(summary[`${k}.threadFaultP99us`], 0)} us)`) +
              (mode === 'postcopy' ? `, total / postcopythr ${fmt(summary[`${k}.totalVsThroughput`])}` : ''),
          )
        }
      if (large)
        for (const mode of ['hybrid', 'postcopy'])
          out(`downtime ${mode} ${large} MiB / ${small} MiB: ${fmt(summary[`downtime-${mode}.${large}vs${small}`])}`)
    }
  }
  if (args.json) process.stdout.write(`${JSON.stringify(report)}\n`)
}

main().catch((err) => {
  process.stderr.write(`bench:migrate: ${err.stack}\n`)
  process.exit(1)
})
