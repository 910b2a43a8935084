'use strict'
// Firecracker handler: serving faults from a read-only mmap of the snapshot (one UFFDIO_COPY
// straight from the page cache) vs pread into a reusable buffer then UFFDIO_COPY. A guest child
// touches every page of SIZE MiB from THREADS native threads; we report the guest-side time and
// fault latency percentiles. Usage: node bench/firecracker-source.js [sizeMiB=64] [runs=3]
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { execFile } = require('node:child_process')
const { promisify } = require('node:util')
const dist = path.join(__dirname, '..', 'dist')
const { FirecrackerHandler } = require(dist)
const { writeSnapshot } = require(path.join(dist, 'cli', 'demo', 'snapshot'))

const sizeMiB = Number(process.argv[2] ?? 64)
const runs = Number(process.argv[3] ?? 3)

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

async function once(readMethod, threads, dir, memFile) {
  const socketPath = path.join(dir, `s-${readMethod}-${threads}-${Math.random()}`)
  const h = await FirecrackerHandler.listen({ socketPath, memFile, readMethod })
  try {
    const { stdout } = await promisify(execFile)(
      process.execPath,
      [path.join(dist, 'cli', 'demo', 'guest.js'), JSON.stringify({ socket: socketPath, memFile, threads })],
      { maxBuffer: 1 << 28 },
    )
    const r = JSON.parse(stdout)
    if (r.mismatches !== 0) throw new Error('mismatch')
    const lat = r.latencyUs.sort((a, b) => a - b)
    return { ms: r.elapsedMs, p50: pct(lat, 0.5), p99: pct(lat, 0.99) }
  } finally {
    await h.close()
  }
}

;(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fc-bench-'))
  const memFile = path.join(dir, 'mem')
  writeSnapshot(memFile, sizeMiB << 20)
  console.log(`${sizeMiB} MiB, 4 KiB pages, best of ${runs} (${os.cpus().length} CPUs, ${os.release()})`)
  for (const threads of [1, 2]) {
    for (const source of ['mmap', 'pread']) {
      const results = []
      for (let i = 0; i < runs; i++) results.push(await once(source, threads, dir, memFile))
      const best = results.sort((a, b) => a.ms - b.ms)[0]
      const mibs = sizeMiB / (best.ms / 1000)
      console.log(
        `${source.padEnd(5)} threads=${threads}: ${best.ms.toFixed(0)} ms, ${mibs.toFixed(0)} MiB/s, ${(((sizeMiB << 8) / best.ms) * 1000).toFixed(0)} faults/s, p50 ${best.p50.toFixed(1)} us, p99 ${best.p99.toFixed(1)} us`,
      )
    }
  }
  fs.rmSync(dir, { recursive: true, force: true })
})()
