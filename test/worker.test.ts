// worker_threads: each Worker opens its own uffd (per-environment addon state), serves faults on
// its own event loop, and exits by itself once it closed everything; terminating a worker in
// the middle of serving neither crashes the process nor leaks its fds.
import { describe, expect, it } from 'vitest'
import * as path from 'node:path'
import { Worker } from 'node:worker_threads'
import { Mapping, PAGE_SIZE } from '../src/index'
import { touch } from '../src/testing'
import { dist } from './helpers/children'
import { countFds, sleep, useCleanup } from './helpers/uffd'
import { timeScale } from './helpers/children'

const track = useCleanup()

const PRELUDE = `const { parentPort, workerData } = require('worker_threads');
const uffd = require(${JSON.stringify(path.join(dist, 'index.js'))});
const internal = require(${JSON.stringify(path.join(dist, 'testing', 'index.js'))});\n`

/** Starts a worker from source; it is terminated after the test if still running. */
function startWorker(
  source: string,
  workerData: unknown = {},
): { worker: Worker; messages: unknown[]; exited: Promise<number> } {
  const worker = new Worker(PRELUDE + source, { eval: true, workerData })
  track({
    close: () => {
      void worker.terminate()
    },
  })
  const messages: unknown[] = []
  worker.on('message', (m) => messages.push(m))
  const exited = new Promise<number>((resolve, reject) => {
    worker.on('error', reject)
    worker.on('exit', resolve)
  })
  return { worker, messages, exited }
}

// Serves `pages` stamped pages of its own memory to native touch threads, then closes all.
const SELF_SERVE = `
const P = uffd.PAGE_SIZE
const u = uffd.Userfaultfd.open()
const m = uffd.Mapping.anonymous(workerData.pages * P)
u.register(m)
const touched = internal.touch(internal.pages(m), { threads: 2 })
;(async () => {
  let served = 0
  for await (const e of u.events()) {
    const page = new BigUint64Array(P / 8)
    page[0] = BigInt(workerData.base) + (e.address - m.address) / BigInt(P)
    u.copy(e.address, page)
    if (++served === workerData.pages) break
  }
  const { values } = await touched
  parentPort.postMessage({ served, values: Array.from(values, String), fd: u.fd })
  u.close()
  m.unmap()
})()`

describe('a Worker with its own uffd', () => {
  it('serves faults from native threads on its event loop, then exits by itself (code 0)', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const { messages, exited } = startWorker(SELF_SERVE, { pages: 16, base: 1000 })
    expect(await exited).toBe(0)
    expect(messages).toHaveLength(1)
    const { served, values } = messages[0] as { served: number; values: string[] }
    expect(served).toBe(16)
    expect(values).toEqual(Array.from({ length: 16 }, (_, i) => String(1000 + i)))
  })

  it('two workers at once, each with its own uffd and reader', { timeout: 20_000 * timeScale }, async () => {
    const a = startWorker(SELF_SERVE, { pages: 32, base: 0 })
    const b = startWorker(SELF_SERVE, { pages: 32, base: 5000 })
    expect(await Promise.all([a.exited, b.exited])).toEqual([0, 0])
    const va = (a.messages[0] as { values: string[] }).values
    const vb = (b.messages[0] as { values: string[] }).values
    expect(va).toEqual(Array.from({ length: 32 }, (_, i) => String(i)))
    expect(vb).toEqual(Array.from({ length: 32 }, (_, i) => String(5000 + i)))
  })

  it('serves memory of the main thread: main touches it from a native thread, the worker resolves', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const m = track(Mapping.anonymous(8 * PAGE_SIZE))
    const { worker, exited } = startWorker(
      `
      const P = uffd.PAGE_SIZE
      const u = uffd.Userfaultfd.open()
      const range = { address: BigInt(workerData.address), length: workerData.length }
      u.register(range)
      const stream = u.events()
      parentPort.postMessage('ready')
      ;(async () => {
        for await (const e of stream) {
          const page = new BigUint64Array(P / 8)
          page[0] = 0xabcn
          u.copy(e.address, page)
        }
      })()
      parentPort.on('message', () => { u.close(); parentPort.close() })`,
      { address: m.address.toString(), length: m.length },
    )
    await new Promise((resolve) => worker.once('message', resolve))
    const { values } = await touch(
      Array.from({ length: 8 }, (_, i) => m.at(i * PAGE_SIZE)),
      { threads: 4 },
    )
    expect(Array.from(values)).toEqual(Array(8).fill(0xabcn))
    // Resolved for good: the main JS thread can read the memory itself now.
    expect(new BigUint64Array(m.buffer, 3 * PAGE_SIZE, 1)[0]).toBe(0xabcn)
    worker.postMessage('done')
    expect(await exited).toBe(0)
  })

  it('terminate() while the worker waits on events: no crash, its uffd and memfds are closed', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const before = countFds()
    const { worker, exited } = startWorker(`
      const u = uffd.Userfaultfd.open()
      const m = uffd.Mapping.memfd(4 * uffd.PAGE_SIZE)
      u.register(m)
      ;(async () => { for await (const e of u.events()) { /* never */ } })()
      parentPort.postMessage({ fd: u.fd })`)
    await new Promise((resolve) => worker.once('message', resolve))
    await worker.terminate()
    await exited
    await sleep(50)
    expect(countFds()).toBe(before)
  })

  it("terminate() of a worker that registered main-thread memory wakes the main thread's faulters (no hang)", {
    timeout: 20_000 * timeScale,
  }, async () => {
    const m = track(Mapping.anonymous(2 * PAGE_SIZE))
    const { worker, exited } = startWorker(
      `
      const u = uffd.Userfaultfd.open()
      u.register({ address: BigInt(workerData.address), length: workerData.length })
      ;(async () => { for await (const e of u.events()) { parentPort.postMessage('fault') } })()
      parentPort.postMessage('ready')`,
      { address: m.address.toString(), length: m.length },
    )
    await new Promise((resolve) => worker.once('message', resolve))
    const reader = touch([m.address + 8n])
    await new Promise((resolve) => worker.once('message', resolve)) // the worker saw the fault and left it
    await worker.terminate()
    await exited
    // The worker's environment closed its uffd: the faulter retried as an ordinary fault.
    expect((await reader).values[0]).toBe(0n)
  })
})
