// Workers terminated at arbitrary moments: while they load the addon (module init), and while
// they call native entry points or have event streams, fd watchers and fault servers open.
// During environment teardown every Node-API call that could run JavaScript fails; node-addon-api
// turns that into a C++ exception, and one that escapes (a failed napi_throw, or a libuv callback
// of ours) aborts the whole process (exit 134), not just the worker. Each case runs in a child
// process so that such an abort fails the test instead of killing the test runner.
import * as path from 'node:path'
import { describe, expect, it } from 'vitest'
import { dist, runNode, timeScale } from './helpers/children'

const lib = JSON.stringify(path.join(dist, 'index.js'))
const testing = JSON.stringify(path.join(dist, 'testing', 'index.js'))

/**
 * A parent that starts `count` workers running `body`, each terminated (i % 40) ms after it
 * started, or with `afterReady` after it posted its first message (once its setup is done).
 */
function terminateLoop(body: string, count: number, afterReady = false): string {
  return `
const { Worker } = require('node:worker_threads')
const body = ${JSON.stringify(body)}
// Memory for the workers' native threads to touch (the parent loads the addon only then).
const shared = ${afterReady} ? require(${lib}).Mapping.anonymous(8192) : { address: 0n }
;(async () => {
  for (let i = 0; i < ${count}; i++) {
    const w = new Worker(body, { eval: true, workerData: { address: String(shared.address) } })
    w.on('error', () => {}) // a worker may fail mid-load; only the process dying counts
    if (${afterReady}) await new Promise((r) => { w.once('message', r); w.once('exit', r) })
    await new Promise((r) => setTimeout(r, i % 40))
    await w.terminate()
  }
  console.log('survived')
})()`
}

describe('worker teardown', () => {
  it(
    '200 workers terminated 0-39 ms into loading the addon do not abort the process',
    async () => {
      const r = await runNode(['-e', terminateLoop(`require(${lib})`, 200)], 120_000)
      expect(r.stderr).not.toMatch(/terminate called|Napi::Error|FATAL ERROR/)
      expect({ code: r.code, signal: r.signal, stdout: r.stdout }).toEqual({
        code: 0,
        signal: null,
        stdout: 'survived\n',
      })
    },
    130_000 * timeScale,
  )

  it(
    'workers terminated while calling native entry points, with streams, watchers and servers open, do not abort the process',
    async () => {
      // Every family of entry point, in a loop, so that termination lands inside native calls,
      // their error paths (bad input throws), event-loop callbacks and thread-safe calls. Native
      // threads touch only memory of the parent (it outlives each worker): memory a dying worker
      // unmaps under a thread still touching it would be the test's own crash, not the library's.
      const body = `
const { parentPort, workerData } = require('node:worker_threads')
const u = require(${lib})
const t = require(${testing})
const { FaultServer, Mapping, Userfaultfd, PAGE_SIZE, socketPair, sendFds, receiveFds, whenReadable } = u
const fs = require('node:fs')
const shared = { address: BigInt(workerData.address), length: 2 * PAGE_SIZE }
const page0 = { address: shared.address, length: PAGE_SIZE }
const page1 = { address: shared.address + BigInt(PAGE_SIZE), length: PAGE_SIZE }
;(async () => {
  parentPort.postMessage('ready')
  for (;;) {
    await t.madviseOnThread(shared, 'dontneed')
    const uffd = Userfaultfd.open()
    uffd.register(page0)
    const stream = uffd.events({ batch: true })
    const touched = t.touch([page0.address])
    for await (const batch of stream) { for (const e of batch) uffd.copy(e.address, new Uint8Array(PAGE_SIZE)); break }
    await touched
    try { uffd.copy(page0.address, new Uint8Array(PAGE_SIZE)) } catch {}
    uffd.unregister(page0)
    uffd.close()
    const m = Mapping.anonymous(PAGE_SIZE)
    try { m.read(-1, new Uint8Array(1)) } catch {}
    const out = new Uint8Array(64)
    m.read(0, out)
    m.write(0, out)
    m.unmap()
    const server = new FaultServer(Userfaultfd.open())
    server.serve(page1, { zero: true })
    await t.touch([page1.address])
    server.close()
    const [a, b] = socketPair()
    const cancel = whenReadable(b, () => {})
    const received = receiveFds(b, { maxFds: 1 })
    await sendFds(a, 'x', [a])
    for (const fd of (await received).fds) fs.closeSync(fd)
    cancel()
    fs.closeSync(a)
    fs.closeSync(b)
  }
})()`
      const r = await runNode(['-e', terminateLoop(body, 120, true)], 120_000)
      expect(r.stderr).not.toMatch(/terminate called|Napi::Error|FATAL ERROR/)
      expect({ code: r.code, signal: r.signal, stdout: r.stdout }).toEqual({
        code: 0,
        signal: null,
        stdout: 'survived\n',
      })
    },
    130_000 * timeScale,
  )
})
