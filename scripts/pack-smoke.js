#!/usr/bin/env node
// Smoke test of an installed userfaultfd (run in the project that installed it, by test:pack):
// loads it from require and import, checks which addon file loaded, then, with the public API
// only (the package ships no test helpers):
//   1. a worker thread maps memory and reads it; this thread registers that memory, serves the
//      worker's faults from uffd.events() with UFFDIO_COPY, and checks every value the worker read;
//   2. a FaultServer serves a buffer into memory that this very thread reads (the engine's own
//      thread resolves the faults), every byte checked.
//   node pack-smoke.js prebuild|build
'use strict'
const path = require('node:path')
const { createRequire } = require('node:module')
const { Worker } = require('node:worker_threads')

const expected = process.argv[2]
const req = createRequire(path.join(process.cwd(), 'package.json'))
const pkgDir = path.dirname(req.resolve('userfaultfd/package.json'))
const fail = (msg) => {
  console.error(`pack-smoke: FAIL: ${msg}`)
  process.exit(1)
}
setTimeout(() => fail('timed out after 20 s'), 20_000).unref()

// The faulting side: maps `pages` pages, says where, then reads the first u64 of each page.
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads')
const { Mapping, PAGE_SIZE } = require(workerData.pkg)
const m = Mapping.anonymous(workerData.pages * PAGE_SIZE)
parentPort.postMessage({ address: m.address, length: m.length })
parentPort.once('message', () => {
  const words = new BigUint64Array(m.buffer)
  const values = []
  for (let p = 0; p < workerData.pages; p++) values.push(words[(p * PAGE_SIZE) / 8])
  parentPort.postMessage({ values })
  parentPort.once('message', () => m.unmap())
})
`

async function workerFaults(api, pages) {
  const { Userfaultfd, PAGE_SIZE } = api
  const worker = new Worker(WORKER, { eval: true, workerData: { pkg: req.resolve('userfaultfd'), pages } })
  const next = () => new Promise((resolve, reject) => worker.once('message', resolve).once('error', reject))
  const range = await next()
  const uffd = Userfaultfd.open()
  uffd.register(range)
  const read = next()
  worker.postMessage('go')
  let served = 0
  for await (const e of uffd.events()) {
    if (e.type !== 'pagefault') continue
    const start = e.address & ~BigInt(PAGE_SIZE - 1)
    const index = (start - range.address) / BigInt(PAGE_SIZE)
    uffd.copy(start, new BigUint64Array(PAGE_SIZE / 8).fill(0xfeed0000n + index))
    if (++served === pages) break
  }
  const { values } = await read
  for (let i = 0; i < pages; i++) if (values[i] !== 0xfeed0000n + BigInt(i)) fail(`worker: page ${i} read ${values[i]}`)
  uffd.close()
  worker.postMessage('unmap')
  await worker.terminate()
  return served
}

function serverFaults(api, pages) {
  const { Userfaultfd, Mapping, FaultServer, PAGE_SIZE } = api
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(pages * PAGE_SIZE)
  const source = new Uint8Array(pages * PAGE_SIZE).map((_, i) => (i * 7 + 3) & 0xff)
  const server = new FaultServer(uffd, { faultAround: PAGE_SIZE })
  server.serve(m, { buffer: source })
  const out = new Uint8Array(m.length)
  m.read(0, out) // faults on this thread, resolved by the engine's thread
  if (Buffer.compare(out, source) !== 0) fail('FaultServer: the memory does not hold the source bytes')
  const { faults } = server.stats()
  server.close()
  uffd.close()
  m.unmap()
  return faults
}

async function main() {
  const api = req('userfaultfd')
  const esm = await import(req.resolve('userfaultfd').replace(/index\.js$/, 'index.mjs'))
  if (esm.Userfaultfd !== api.Userfaultfd) fail('import and require give different Userfaultfd classes')
  const { nativePath } = req(path.join(pkgDir, 'dist', 'addon', 'native.js'))
  const loaded = path.relative(pkgDir, nativePath)
  const want =
    expected === 'build'
      ? path.join('build', 'Release', 'userfaultfd.node')
      : path.join('prebuilds', `linux-${process.arch}`, 'userfaultfd.glibc.node')
  if (loaded !== want) fail(`loaded ${loaded}, expected ${want}`)

  const served = await workerFaults(api, 8)
  const faults = serverFaults(api, 16)
  console.log(
    `pack-smoke: ok: ${loaded} (${process.arch}, node ${process.version}): served ${served} faults of a worker by ` +
      `UFFDIO_COPY from events(), and a FaultServer ${faults} faults of this thread; every value checked`,
  )
}
main().catch((err) => fail(err.stack))
