// Live-snapshot benchmark: a 1 GiB snapshot of memory that a native writer thread keeps writing
// (one 4 KiB slot per write, in a shuffled order over the whole range), against the floor:
// stopping the writer and copying the memory (one memcpy into a buffer, or write(2) of it to a file
// in /dev/shm), then letting it go on.
//
//   npm run bench:live-snapshot [-- --mib 1024 --rounds 3 --sink buffer|file --hot MIB --chunk KIB --around KIB
//   --order shuffled|sequential --priority normal|idle]
// --hot: the writer only writes the first MIB (a hot set); default: the whole range.
//
// Reported as ratios (medians over rounds), all measured in the same run:
//   time ratio     = live snapshot duration / stop-and-copy duration
//   writer speed   = writer's write rate during the live snapshot / its idle rate
//   writer loss    = writes lost to the live snapshot / writes lost to stop-and-copy
//                    (lost = idle rate x duration - writes done during it; < 1: the live snapshot
//                    costs the writer less than stopping it)
//   longest stall  = the writer's longest pause (64 writes' precision) / the stop-and-copy time
'use strict'
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { median, parseArgs } = require('./lib')
const { Mapping, takeSnapshot } = require('../dist')
const { startStamper } = require('../dist/testing')

const MiB = 1024 * 1024
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const now = () => Number(process.hrtime.bigint()) / 1e6
const total = (counts) => counts.reduce((a, b) => a + b, 0)

/** The writer's idle rate (writes/ms) over `ms`. */
async function idleRate(stamper, ms) {
  const c0 = total(stamper.counts())
  const t0 = now()
  await sleep(ms)
  return (total(stamper.counts()) - c0) / (now() - t0)
}

async function round(memory, target, args, dir) {
  const sinkKind = args.sink
  // The writer stamps the first `hot` MiB (all of it by default), in a shuffled order.
  const written = { address: memory.address, length: (args.hot || args.mib) * MiB }
  // Floor: stop the writer, copy, start it again. The writer loses the whole copy time.
  let stamper = startStamper(written, { threads: 1, shuffle: args.order === 'shuffled', seed: 1 })
  await sleep(100)
  const idle1 = await idleRate(stamper, 300)
  await stamper.stop()
  const f0 = now()
  if (sinkKind === 'file') {
    // One write(2) straight from the memory, as the live snapshot's pwrite(2)s do.
    const fd = fs.openSync(path.join(dir, 'floor.bin'), 'w')
    const view = new Uint8Array(memory.buffer)
    for (let done = 0; done < view.length; ) done += fs.writeSync(fd, view, done, view.length - done)
    fs.closeSync(fd)
  } else {
    memory.read(0, target)
  }
  const floorMs = now() - f0

  // Live: the writer keeps going.
  stamper = startStamper(written, { threads: 1, shuffle: args.order === 'shuffled', seed: 2 })
  await sleep(100)
  const idle2 = await idleRate(stamper, 300)
  const idle = (idle1 + idle2) / 2
  const sink = sinkKind === 'file' ? { path: path.join(dir, 'live.bin') } : { buffer: target }
  stamper.maxGapMs(true)
  const c0 = total(stamper.counts())
  const l0 = now()
  const options = { backgroundPriority: args.priority }
  if (args.chunk > 0) options.chunkSize = args.chunk * 1024
  if (args.around >= 0) options.faultAround = args.around * 1024
  const snap = takeSnapshot(memory, sink, options)
  const stats = await snap.done
  const liveMs = now() - l0
  const during = total(stamper.counts()) - c0
  const livePauseMs = stamper.maxGapMs()
  await stamper.stop()

  const liveRate = during / liveMs
  const lostLive = Math.max(0, idle * liveMs - during)
  const lostFloor = idle * floorMs
  return {
    floorMs,
    liveMs,
    livePauseMs,
    idleRate: idle,
    liveRate,
    lostLive,
    lostFloor,
    timeRatio: liveMs / floorMs,
    writerSpeed: liveRate / idle,
    writerLoss: lostLive / lostFloor,
    faultCopies: stats.faultCopies,
    protectMs: stats.protectMs,
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2), {
    mib: 1024,
    rounds: 3,
    sink: 'buffer',
    hot: 0,
    chunk: 0,
    around: -1,
    order: 'shuffled',
    priority: 'normal',
    json: false,
  })
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'bench-snap-'))
  const memory = Mapping.anonymous(args.mib * MiB, { populate: true })
  const target = Buffer.alloc(memory.length) // touched now: neither side pays for first-touch faults
  const results = []
  try {
    for (let i = 0; i < args.rounds; i++) results.push(await round(memory, target, args, dir))
  } finally {
    memory.unmap()
    fs.rmSync(dir, { recursive: true, force: true })
  }
  const m = (key) => median(results.map((r) => r[key]))
  const summary = {
    mib: args.mib,
    sink: args.sink,
    rounds: args.rounds,
    cpus: os.cpus().length,
    floorMs: m('floorMs'),
    liveMs: m('liveMs'),
    timeRatio: m('timeRatio'),
    idleWritesPerMs: m('idleRate'),
    liveWritesPerMs: m('liveRate'),
    writerSpeed: m('writerSpeed'),
    writerLoss: m('writerLoss'),
    livePauseMs: m('livePauseMs'),
    faultCopies: m('faultCopies'),
    protectMs: m('protectMs'),
  }
  if (args.json) {
    console.log(JSON.stringify({ summary, results }, null, 2))
    return
  }
  const f = (x, d = 2) => x.toFixed(d)
  const pattern = `${args.order} writes ${args.hot ? `to a ${args.hot} MiB hot set` : 'all over it'}`
  console.log(
    `live snapshot of ${args.mib} MiB (${args.sink} sink), one writer thread (${pattern}), background priority ${args.priority}, ${args.rounds} rounds, ${summary.cpus} CPUs; medians`,
  )
  console.log('| measure | stop-and-copy (floor) | live snapshot | ratio |')
  console.log('|---|---|---|---|')
  console.log(
    `| time to complete | ${f(summary.floorMs, 0)} ms | ${f(summary.liveMs, 0)} ms | ${f(summary.timeRatio)}x |`,
  )
  console.log(
    `| writer speed meanwhile (idle: ${f(summary.idleWritesPerMs, 0)} writes/ms) | 0 | ${f(summary.liveWritesPerMs, 0)} writes/ms | ${f(summary.writerSpeed)}x idle |`,
  )
  console.log(
    `| writes lost by the writer | ${f(m('lostFloor'), 0)} | ${f(m('lostLive'), 0)} | ${f(summary.writerLoss)}x |`,
  )
  console.log(
    `| writer's longest stall | ${f(summary.floorMs, 0)} ms | ${f(summary.livePauseMs, 1)} ms | ${f(summary.livePauseMs / summary.floorMs)}x |`,
  )
  console.log(
    `pages copied on a writer's fault: ${f(summary.faultCopies, 0)}; write-protect: ${f(summary.protectMs, 1)} ms`,
  )
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
