// A JavaScript page-fault handler in a worker thread: it serves a mapping that the MAIN thread
// reads directly. Each fault blocks the reading thread only until this worker copies the page.
//
//   const m = Mapping.anonymous(n * 4096)
//   const worker = new Worker('examples/worker-handler.js', { workerData: { address: m.address, length: m.length } })
//   await once(worker, 'message')            // registered: now just read m.buffer
//
// Page i is filled with the u64 value 1000 + i (stand-in for fetching it from a snapshot).
const { parentPort, workerData } = require('node:worker_threads')
const path = require('node:path')
const { Userfaultfd, PAGE_SIZE } = require(path.join(__dirname, '..', 'dist'))

const { address, length } = workerData
const uffd = Userfaultfd.open()
uffd.register({ address, length })
parentPort.postMessage('ready')

const page = new BigUint64Array(PAGE_SIZE / 8)
;(async () => {
  for await (const batch of uffd.events({ batch: true })) {
    for (const fault of batch) {
      if (fault.type !== 'pagefault') continue
      const start = fault.address & ~BigInt(PAGE_SIZE - 1)
      page.fill(1000n + (start - address) / BigInt(PAGE_SIZE))
      uffd.copy(start, page)
    }
  }
})()
