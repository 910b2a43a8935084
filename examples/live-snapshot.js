// Live snapshot of a busy buffer: the program keeps writing while its memory is copied out, and
// the copy is exactly the memory as of the moment the snapshot began.
//   node examples/live-snapshot.js [MiB]
// The writer here is this very JS thread (the snapshot's fault handling runs on a native thread,
// so a write that has to wait for its page to be copied out just pauses for a few microseconds).
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { Mapping, PAGE_SIZE, takeSnapshot } = require(path.join(__dirname, '..', 'dist'))

const MiB = 1024 * 1024

async function main() {
  const size = Number(process.argv[2] || 64) * MiB
  const memory = Mapping.anonymous(size)
  const cells = new Float64Array(memory.buffer) // the "application state"
  let version = 0
  const busy = (n) => {
    // n random writes, each stamping a cell with a new version
    for (let i = 0; i < n; i++) cells[(Math.random() * cells.length) | 0] = ++version
  }
  busy(200_000)

  // Ground truth for the check at the end: the memory right before the snapshot (nothing else
  // writes it, so it is also the memory at the snapshot instant).
  const before = Buffer.from(memory.buffer).subarray(0, size).toString('base64')
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'live-snapshot-')), 'memory.snap')
  const snapshot = takeSnapshot(
    memory,
    { path: file },
    {
      maxBytesPerSecond: 256 * MiB, // leave the writer most of the machine
      progressIntervalMs: 50,
      onProgress: (p) =>
        process.stdout.write(
          `\r  copied ${(p.bytesCopied / MiB).toFixed(0).padStart(4)} / ${size / MiB} MiB, ${p.faultCopies} pages copied first because the writer hit them`,
        ),
    },
  )
  const versionAtSnapshot = version

  // Keep writing until the snapshot is done.
  let finished = false
  let writes = 0
  snapshot.done.finally(() => {
    finished = true
  })
  while (!finished) {
    busy(5_000)
    writes += 5_000
    await new Promise((resolve) => setImmediate(resolve))
  }
  const stats = await snapshot.done
  process.stdout.write('\n')

  const copy = fs.readFileSync(file)
  const same = copy.toString('base64') === before
  let newer = 0
  const snapCells = new Float64Array(copy.buffer, copy.byteOffset, size / 8)
  for (let i = 0; i < snapCells.length; i++) if (snapCells[i] > versionAtSnapshot) newer++
  console.log(
    `snapshot of ${size / MiB} MiB in ${stats.elapsedMs.toFixed(0)} ms (protect: ${stats.protectMs.toFixed(1)} ms) while the program made ${writes} more writes`,
  )
  console.log(
    `pages: ${stats.backgroundCopies} copied in the background, ${stats.faultCopies} on first write; page size ${PAGE_SIZE}`,
  )
  console.log(
    `snapshot equals memory as of its start: ${same ? 'yes' : 'NO'}; cells newer than the snapshot in it: ${newer}`,
  )
  fs.rmSync(path.dirname(file), { recursive: true, force: true })
  memory.unmap()
  if (!same || newer !== 0) process.exitCode = 1
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
