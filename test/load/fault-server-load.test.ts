// FaultServer under load: a million faults without memory growth, close() while threads fault
// hard, and environments (a worker, a process) that end with a server still running.
import * as path from 'node:path'
import { Worker } from 'node:worker_threads'
import { afterEach, describe, expect, it } from 'vitest'
import { PAGE_SIZE } from '../../src/index'
import { pages, touch } from '../../src/testing'
import { killChildren, root, runNode } from '../helpers/children'
import { closeAll, randomContent, setup, until, within } from '../helpers/fault-server'
import { timeScale } from '../helpers/children'

afterEach((ctx) => {
  closeAll(ctx)
  killChildren()
})

function rssMiB(): number {
  return process.memoryUsage().rss / (1 << 20)
}

describe('FaultServer load', () => {
  it('1,000,000 faults without memory growth', { timeout: 120_000 * timeScale }, async () => {
    const n = 50_000
    const rounds = 20
    const { m, server, errors } = setup(n, { faultAround: PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    const list = pages(m)
    const rss: number[] = []
    for (let round = 0; round < rounds; round++) {
      const { values } = await within(touch(list, { threads: 2 }), 60_000, `round ${round}`)
      if (values[n - 1] !== BigInt(n)) throw new Error(`round ${round}: last page has ${values[n - 1]}`)
      // Drop the pages (no EVENT_REMOVE: no event, the map just goes stale); they fault again.
      m.madvise('dontneed')
      if (round === 1 || round === rounds - 1) {
        globalThis.gc?.()
        rss.push(rssMiB())
      }
    }
    await until(() => server.stats().faults >= n * rounds, 5000, 'fault count')
    const s = server.stats()
    expect(s.faults).toBeGreaterThanOrEqual(1_000_000)
    expect(s.errors).toBe(0)
    expect(errors).toEqual([])
    // The engine allocates nothing per fault: RSS after 20 rounds is that after 2, give or take
    // the JS heap's own noise.
    expect(rss[1] - rss[0]).toBeLessThan(32)
  })

  it('close() during heavy faulting from 2 threads: no crash, the threads finish once the uffd closes', async () => {
    const n = 20_000
    const { uffd, m, server } = setup(n, { faultAround: PAGE_SIZE })
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    const touching = touch(pages(m), { threads: 2 })
    await until(() => server.stats().faults > 2000, 10_000, 'faulting')
    server.close()
    const after = server.stats().faults
    await new Promise((r) => setTimeout(r, 20))
    expect(server.stats().faults).toBe(after) // the engine stopped
    uffd.close() // the kernel wakes the blocked threads; the rest reads as zeros
    const { values } = await within(touching, 10_000, 'touch')
    let served = 0
    for (let p = 0; p < n; p++) {
      if (values[p] === BigInt(p + 1)) served++
      else expect(values[p]).toBe(0n)
    }
    expect(served).toBeGreaterThanOrEqual(after - 2)
    expect(served).toBeLessThan(n)
  })

  it('close() while { handler } requests are in flight: late answers are ignored', async () => {
    const n = 64
    const { uffd, m, server } = setup(n)
    let answered = 0
    let called = 0
    server.serve(m, {
      handler: async ({ length }) => {
        called++
        await new Promise((r) => setTimeout(r, 30))
        answered++
        return new Uint8Array(length).fill(7)
      },
    })
    const touching = touch(pages(m), { threads: 2 })
    await until(() => called > 0, 5000, 'handler called')
    server.close()
    uffd.close()
    await within(touching, 10_000, 'touch')
    await new Promise((r) => setTimeout(r, 60))
    expect(answered).toBeGreaterThan(0)
  })
})

describe('FaultServer environment teardown', () => {
  const dist = path.join(root, 'dist')

  it('a worker that ends with its server running joins the engine threads (cleanup hook)', async () => {
    const code = `
      const { Userfaultfd, Mapping, FaultServer } = require(${JSON.stringify(dist)})
      const { touch, pages } = require(${JSON.stringify(path.join(dist, 'testing'))})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(64 * 4096)
      const server = new FaultServer(uffd, { prefetch: false })
      server.serve(m, { zero: true })
      touch(pages(m, 8)).then(() => process.exit(0))  // leaves the server open
    `
    const worker = new Worker(code, { eval: true })
    const exitCode = await within(
      new Promise<number>((resolve, reject) => {
        worker.on('exit', resolve)
        worker.on('error', reject)
      }),
      10_000,
      'worker exit',
    )
    expect(exitCode).toBe(0)
  })

  it('a process that exits with a server serving exits cleanly', async () => {
    const code = `
      const { Userfaultfd, Mapping, FaultServer } = require(${JSON.stringify(dist)})
      const { touch, pages } = require(${JSON.stringify(path.join(dist, 'testing'))})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(1024 * 4096)
      const server = new FaultServer(uffd, { prefetch: true, prefetchChunk: 4096 })
      server.serve(m, { buffer: new Uint8Array(m.length).fill(1) })
      touch(pages(m, 100), { threads: 2 }).then(() => { console.log('ok'); process.exit(0) })
    `
    const r = await runNode(['-e', code], 15_000)
    expect(r.stderr).toBe('')
    expect(r.stdout.trim()).toBe('ok')
    expect(r.code).toBe(0)
  })

  it('the JS thread touching { handler } memory it alone can serve aborts with an explanation, not a silent hang', async () => {
    const code = `
      const { Userfaultfd, Mapping, FaultServer } = require(${JSON.stringify(dist)})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(4 * 4096)
      const server = new FaultServer(uffd, { watchdogMs: 300 })
      server.serve(m, { handler: ({ length }) => new Uint8Array(length) })
      new Uint8Array(m.buffer)[0]  // this thread runs the handler: it can never answer
      console.log('unreachable')
    `
    const r = await runNode(['-e', code], 15_000)
    expect(r.signal).toBe('SIGABRT')
    expect(r.stdout).toBe('')
    expect(r.stderr).toMatch(/DEADLOCK/)
    expect(r.stderr).toMatch(/\{ handler \}/)
  })
})
