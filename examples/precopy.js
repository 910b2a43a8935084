// Pre-copy migration with dirty-page tracking: send all memory while the program runs, then
// only what it dirtied since the last round, until that is small; then pause the program and
// send the rest (stop-and-copy). Tracking is asynchronous on Linux 6.7+ (UFFD WP_ASYNC +
// PAGEMAP_SCAN); on older kernels with userfaultfd write protection (x86_64 5.7+, arm64 6.10+) it
// falls back to synchronous write protection served by a native thread: same result, each
// first write to a page after a round costs a fault.
//   node examples/precopy.js [MiB]
// "Sending" here copies into a destination buffer and counts bytes; a real migration would
// write each range to a socket. The link is simulated: the program runs one slice of work per
// MiB sent, so it dirties memory at a fixed rate relative to the bandwidth.
const path = require('node:path')
const { DirtyTracker, Mapping, PAGE_SIZE } = require(path.join(__dirname, '..', 'dist'))

const MiB = 1024 * 1024

async function main() {
  const support = DirtyTracker.support()
  if (!support.supported) {
    console.log(`skipped: ${support.reason}`)
    return
  }
  const size = Number(process.argv[2] || 64) * MiB
  const source = Mapping.anonymous(size)
  const destination = Buffer.alloc(size)
  const pages = size / PAGE_SIZE
  const words = new Float64Array(source.buffer)

  // The running program: a small hot set written all the time, the rest rarely.
  const hot = Array.from({ length: 64 }, () => (Math.random() * pages) | 0)
  let writes = 0
  const work = (n) => {
    for (let i = 0; i < n; i++) {
      const page = Math.random() < 0.999 ? hot[i % hot.length] : (Math.random() * pages) | 0
      words[(page * PAGE_SIZE) / 8 + (i % 512)] = ++writes
    }
  }
  work(100_000)

  let sent = 0
  let credit = 0
  const send = async (offset, length) => {
    source.read(offset, destination.subarray(offset, offset + length))
    sent += length
    for (credit += length; credit >= MiB; credit -= MiB) await new Promise((resolve) => setImmediate(resolve))
  }

  // Track from here on, then send everything once (round 0).
  const tracker = DirtyTracker.start(source)
  console.log(`tracking mode: ${tracker.mode}`)
  let running = true
  const program = (async () => {
    while (running) {
      work(2_000)
      await new Promise((resolve) => setImmediate(resolve))
    }
  })()
  for (let offset = 0; offset < size; offset += MiB) await send(offset, Math.min(MiB, size - offset))
  console.log(`round 0: sent all ${size / MiB} MiB`)

  // Rounds of dirty pages until the dirty set is small enough to send with the program paused.
  const threshold = 128 * PAGE_SIZE
  for (let round = 1; round <= 20; round++) {
    // peek() looks without resetting: if little is dirty, leave it for the stop-and-copy.
    const pending = tracker.peek().reduce((sum, r) => sum + r.length, 0)
    if (pending <= threshold) {
      console.log(`round ${round}: ${(pending / 1024).toFixed(0)} KiB dirty: small enough, pausing the program`)
      break
    }
    const dirty = tracker.collect()
    const bytes = dirty.reduce((sum, r) => sum + r.length, 0)
    for (const r of dirty) await send(r.offset, r.length)
    console.log(`round ${round}: ${dirty.length} dirty ranges, ${(bytes / 1024).toFixed(0)} KiB sent`)
  }

  // Stop-and-copy: pause the program, send what it dirtied last.
  running = false
  await program
  const last = tracker.collect()
  const downtimeBytes = last.reduce((sum, r) => sum + r.length, 0)
  for (const r of last) send(r.offset, r.length)
  tracker.stop()

  const identical = Buffer.from(source.buffer).equals(destination)
  console.log(`stop-and-copy: ${last.length} ranges, ${(downtimeBytes / 1024).toFixed(0)} KiB sent while paused`)
  console.log(
    `total sent ${(sent / MiB).toFixed(1)} MiB for ${size / MiB} MiB of memory after ${writes} writes; destination identical: ${identical ? 'yes' : 'NO'}`,
  )
  source.unmap()
  if (!identical) process.exitCode = 1
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
