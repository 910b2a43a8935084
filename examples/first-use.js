// First use: register memory, fault on it from one thread, resolve the fault from another.
// The main thread reads lazily filled memory; a worker thread serves each page on first touch.
//   node examples/first-use.js
const { Worker } = require('node:worker_threads')
const { once } = require('node:events')
const path = require('node:path')
const { Mapping, PAGE_SIZE } = require(path.join(__dirname, '..', 'dist'))

async function main() {
  const memory = Mapping.anonymous(16 * PAGE_SIZE) // mmap'd, nothing populated yet
  // The worker opens a uffd, registers `memory` and copies a page in on each fault.
  const handler = new Worker(path.join(__dirname, 'worker-handler.js'), {
    workerData: { address: memory.address, length: memory.length },
  })
  await once(handler, 'message') // registered

  // This read faults; the main thread sleeps in the kernel until the worker copies page 5 in.
  const view = new BigUint64Array(memory.buffer)
  console.log('page 5 holds', view[(5 * PAGE_SIZE) / 8]) // 1005n

  await handler.terminate()
  memory.unmap()
}

main()
