// `userfaultfd serve` (the Firecracker protocol + one native FaultServer per connection) against
// bench/c/fc_handler.c, a minimal C Firecracker-style handler that copies one page per fault (what
// Firecracker's example handler does). Both serve the same snapshot file (random bytes) to the
// same peer, bench/c/fc_guest.c: it restores like Firecracker (maps anonymous guest memory,
// registers it, sends the region JSON with the uffd attached) and then reads one byte of every
// 4 KiB page of the guest (default 128 MiB) from 2 threads, each its own half, timed from the
// first touch to the last thread's end; every byte is checked against the file afterwards.
//
// Both handlers run for the whole bench, pinned to CPU 0 (taskset); the peer is pinned to CPU 0
// too ('same': handler and guest share a vCPU) or to CPU 1 ('cross': every wake-up crosses
// vCPUs). Each round runs both handlers in both placements, in a shuffled order; a round's ratio
// is the C handler's time over serve's (above 1: serve is faster); we report the median of the
// rounds' ratios per placement, and the median times.
//
//   npm run bench:firecracker-source [-- --rounds 7 --mib 128 --threads 2 --json]
//
// Run it alone: flock -x /work/locks/cpu npm run bench:firecracker-source (CONTRIBUTING.md).
'use strict'
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { spawn, spawnSync } = require('node:child_process')
const { buildC, median, parseArgs, shuffle, snapshotFile } = require('./lib')

const args = parseArgs(process.argv.slice(2), { rounds: 7, mib: 128, threads: 2, json: false })
const cli = path.join(__dirname, '..', 'dist', 'cli', 'index.js')

function pinned(cpu, file, argv) {
  return ['taskset', ['-c', String(cpu), file, ...argv]]
}

/** Starts a handler (pinned to CPU 0) and resolves once its socket accepts connections. */
async function start(name, file, argv, socket) {
  const [cmd, full] = pinned(0, file, argv)
  const child = spawn(cmd, full, { stdio: ['ignore', 'ignore', 'pipe'] })
  let err = ''
  child.stderr.on('data', (d) => {
    err += d
  })
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`${name} exited: ${err}`)
    if (fs.existsSync(socket) && fs.lstatSync(socket).isSocket()) return child
    await new Promise((r) => setTimeout(r, 25))
  }
  throw new Error(`${name} did not listen on ${socket}: ${err}`)
}

function guest(bin, socket, memFile, cpu) {
  const [cmd, full] = pinned(cpu, bin, [socket, memFile, args.mib, args.threads])
  const r = spawnSync(cmd, full.map(String), { encoding: 'utf8', timeout: 120_000 })
  if (r.status !== 0) throw new Error(`fc_guest failed (${r.status ?? r.signal}): ${r.stderr}`)
  const out = JSON.parse(r.stdout)
  if (out.mismatches !== 0) throw new Error(`fc_guest: ${out.mismatches} pages differ from the snapshot`)
  return out.ms
}

/** Fresh memory is much slower on first touch: touch and free some before measuring. */
function warmMemory(mib) {
  for (let i = 0; i < mib / 256; i++) Buffer.alloc(256 << 20).fill(i)
}

async function main() {
  if (os.cpus().length < 2) throw new Error('needs 2 CPUs (the cross placement)')
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fc-bench-'))
  const memFile = snapshotFile(args.mib)
  const handlerBin = buildC('fc_handler')
  const guestBin = buildC('fc_guest')
  const sockets = { c: path.join(dir, 'c.sock'), serve: path.join(dir, 'serve.sock') }
  const children = []
  try {
    children.push(await start('fc_handler', handlerBin, [sockets.c, memFile], sockets.c))
    children.push(
      await start(
        'serve',
        process.execPath,
        [cli, 'serve', '--socket', sockets.serve, '--mem-file', memFile],
        sockets.serve,
      ),
    )
    warmMemory(2048)
    const placements = { same: 0, cross: 1 }
    // one warm-up run of each (page cache, code paths), not counted
    for (const s of Object.values(sockets)) guest(guestBin, s, memFile, 1)
    const times = { same: { c: [], serve: [] }, cross: { c: [], serve: [] } }
    const ratios = { same: [], cross: [] }
    for (let round = 0; round < args.rounds; round++) {
      const runs = shuffle(
        Object.keys(placements).flatMap((placement) => ['c', 'serve'].map((handler) => ({ placement, handler }))),
      )
      const got = { same: {}, cross: {} }
      for (const { placement, handler } of runs)
        got[placement][handler] = guest(guestBin, sockets[handler], memFile, placements[placement])
      for (const p of Object.keys(placements)) {
        times[p].c.push(got[p].c)
        times[p].serve.push(got[p].serve)
        ratios[p].push(got[p].c / got[p].serve)
      }
    }
    const result = {
      mib: args.mib,
      threads: args.threads,
      rounds: args.rounds,
      kernel: os.release(),
      cpus: os.cpus().length,
      placements: Object.fromEntries(
        Object.keys(placements).map((p) => [
          p,
          {
            ratio: median(ratios[p]),
            ratioMin: Math.min(...ratios[p]),
            ratioMax: Math.max(...ratios[p]),
            serveMs: median(times[p].serve),
            cMs: median(times[p].c),
          },
        ]),
      ),
    }
    if (args.json) console.log(JSON.stringify(result))
    else {
      console.log(
        `${args.mib} MiB guest, ${args.threads} reader threads, ${args.rounds} interleaved rounds (${os.cpus().length} CPUs, ${os.release()})`,
      )
      console.log('placement  serve vs C (median of ratios; min..max)  serve ms  C ms (medians)')
      for (const [p, r] of Object.entries(result.placements)) {
        const ratio = `${r.ratio.toFixed(2)}x (${r.ratioMin.toFixed(2)}..${r.ratioMax.toFixed(2)})`
        console.log(
          `${p.padEnd(9)}  ${ratio.padEnd(40)}  ${r.serveMs.toFixed(1).padStart(8)}  ${r.cMs.toFixed(1).padStart(6)}`,
        )
      }
    }
  } finally {
    for (const c of children) c.kill('SIGTERM')
    await Promise.all(children.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once('exit', r)))))
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
