// Lifecycle of event streams: no fd or handle leaks, ref/unref, workers, the deadlock watchdog.
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { Worker } from 'node:worker_threads'
import { describe, expect, it } from 'vitest'
import { Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { openPollHandles } from '../src/testing'
import { countFds } from './helpers/events'
import { timeScale } from './helpers/children'

const root = path.join(__dirname, '..')
const dist = JSON.stringify(path.join(root, 'dist'))

function runChild(script: string, timeout = 15_000, nodeFlags: string[] = []) {
  return spawnSync(process.execPath, [...nodeFlags, '-e', script], { encoding: 'utf8', timeout, killSignal: 'SIGKILL' })
}

describe('event stream lifecycle', () => {
  it('1000 start/stop cycles leak no fd and no handle', async () => {
    const uffd = Userfaultfd.open()
    const m = Mapping.anonymous(PAGE_SIZE)
    uffd.register(m)
    const fds = countFds()
    const handles = openPollHandles()
    for (let i = 0; i < 1000; i++) {
      const stream = uffd.events({ batch: i % 2 === 0 })
      if (i % 3 === 0) {
        const ac = new AbortController()
        stream.close()
        uffd.events({ signal: ac.signal })
        ac.abort()
      } else {
        const pending = stream.next()
        await stream.return()
        await pending
      }
    }
    await new Promise((r) => setImmediate(r))
    expect(countFds()).toBe(fds)
    expect(openPollHandles()).toBe(handles)
    uffd.close()
    m.unmap()
  })

  it('2,000 ended streams and 2,000 closed fd watchers are garbage: no buffer, closure or reader kept', () => {
    // The native reader used to keep strong references to its callback (whose closure holds the
    // stream, which holds the reader) and to its buffer after close: every stream ever opened
    // stayed in memory (4 KiB of ArrayBuffer each, ~10 KiB of RSS). Counted by FinalizationRegistry.
    const child = runChild(
      `
      const { Userfaultfd, FdChannel, socketPair } = require(${dist})
      const fs = require('node:fs')
      let collected = 0
      const registry = new FinalizationRegistry(() => collected++)
      const settle = async () => { for (let i = 0; i < 6; i++) { gc(); await new Promise((r) => setImmediate(r)) } }
      ;(async () => {
        const uffd = Userfaultfd.open()
        const [a, b] = socketPair()
        await settle()
        const before = process.memoryUsage().arrayBuffers
        for (let i = 0; i < 2000; i++) {
          const stream = uffd.events({ batch: i % 2 === 0 })
          registry.register(stream, 0)
          if (i % 3 === 0) stream.close()
          else await stream.return()
          const channel = new FdChannel(b)
          const pending = channel.receive().catch(() => {})
          registry.register(channel, 0)
          channel.close()
          await pending
        }
        await settle()
        const grown = process.memoryUsage().arrayBuffers - before
        console.log(JSON.stringify({ collected, grown }))
        uffd.close()
        fs.closeSync(a)
        fs.closeSync(b)
      })()
    `,
      30_000,
      ['--expose-gc'],
    )
    expect(child.stderr).toBe('')
    const { collected, grown } = JSON.parse(child.stdout) as { collected: number; grown: number }
    expect(collected).toBeGreaterThanOrEqual(3900) // a few may still be referenced from the stack
    expect(grown).toBeLessThan(1 << 20) // 2,000 leaked readers held 8 MB
  })

  it('counts live poll handles, so that the leak check above can fail', () => {
    const uffd = Userfaultfd.open()
    const before = openPollHandles()
    const stream = uffd.events()
    expect(openPollHandles()).toBe(before + 1)
    stream.close()
    expect(openPollHandles()).toBe(before)
    uffd.close()
  })

  it('does not keep the process alive with nothing registered, and does while ranges are', () => {
    const idle = runChild(`
      const { Userfaultfd } = require(${dist})
      const uffd = Userfaultfd.open()
      uffd.events().next().then(() => console.log('ended'))
      setTimeout(() => console.log('alive'), 10)
    `)
    expect(idle.status).toBe(0)
    expect(idle.stdout).toBe('alive\n')
    const busy = runChild(`
      const { Userfaultfd, Mapping } = require(${dist})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(4096)
      uffd.register(m)
      uffd.events().next().then((r) => console.log('ended', r.done))
      setTimeout(() => { uffd.unregister(m); console.log('unregistered') }, 300)
    `)
    // After unregister the reader no longer holds the loop: the process exits on its own.
    expect(busy.status).toBe(0)
    expect(busy.stdout).toBe('unregistered\n')
    const unmapped = runChild(`
      const { Userfaultfd, Mapping } = require(${dist})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(4096)
      uffd.register(m)
      uffd.events().next()
      setTimeout(() => { m.unmap(); console.log('unmapped') }, 20)
    `)
    // Unmapping the only registered Mapping lets the process exit too.
    expect(unmapped.status).toBe(0)
    expect(unmapped.stdout).toBe('unmapped\n')
    const unref = runChild(`
      const { Userfaultfd, Mapping } = require(${dist})
      const uffd = Userfaultfd.open()
      uffd.register(Mapping.anonymous(4096))
      uffd.unref().events().next()
    `)
    expect(unref.status).toBe(0)
  })

  it(
    'a Worker opens its own uffd, serves faults, and exits cleanly while its stream is open',
    async () => {
      const worker = new Worker(
        `
      const { parentPort } = require('worker_threads')
      const { Userfaultfd, Mapping } = require(${dist})
      const { touch } = require(${JSON.stringify(path.join(root, 'dist', 'testing'))})
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(4096 * 4)
      uffd.register(m)
      ;(async () => {
        const reading = touch([m.address, m.address + 4096n])
        let n = 0
        for await (const e of uffd.events()) {
          uffd.copy(e.address, new BigUint64Array(512).fill(7n))
          if (++n === 2) break
        }
        const { values } = await reading
        uffd.events() // left open on purpose: teardown must close it
        parentPort.postMessage(values.join(','))
      })()
    `,
        { eval: true },
      )
      const message = await new Promise((resolve, reject) => {
        worker.once('message', resolve)
        worker.once('error', reject)
      })
      expect(message).toBe('7,7')
      const code = await worker.terminate()
      expect(code).toBe(1) // terminated, not crashed
    },
    15_000 * timeScale,
  )

  it('the watchdog turns a self-deadlock (JS thread touching memory it serves) into a loud abort', () => {
    const child = runChild(`
      const { Userfaultfd, Mapping } = require(${dist})
      const uffd = Userfaultfd.open({ features: 0n })
      const m = Mapping.anonymous(4096)
      uffd.register(m)
      ;(async () => { for await (const e of uffd.events({ watchdogMs: 300 })) uffd.zeropage(m) })()
      setTimeout(() => { new Uint8Array(m.buffer)[0] }, 50)
    `)
    expect(child.signal).toBe('SIGABRT')
    expect(child.stderr).toMatch(/DEADLOCK: the JavaScript thread .* blocked in a page fault/)
    expect(child.stderr).toMatch(/FaultServer/)
  })

  it('the watchdog does not abort a JS thread that waits for a slow worker while its own uffd has faults', () => {
    // The JS thread blocks 1.5 s on worker-served memory; meanwhile a native thread faults on the
    // main thread's own uffd (watchdog 300 ms). Not a deadlock: the watchdog must see the unread
    // fault is not the JS thread's, and let it reach the JS reader once the JS thread runs again.
    const child = runChild(`
      const { Worker } = require('worker_threads')
      const { Userfaultfd, Mapping } = require(${dist})
      const { touch } = require(${JSON.stringify(path.join(root, 'dist', 'testing'))})
      const served = Mapping.anonymous(4096)
      const own = Mapping.anonymous(4096)
      const uffd = Userfaultfd.open()
      uffd.register(own)
      ;(async () => {
        for await (const e of uffd.events({ watchdogMs: 300 })) uffd.copy(e.address & ~4095n, new BigUint64Array(512).fill(77n))
      })()
      const w = new Worker(\`
        const { parentPort, workerData } = require('worker_threads')
        const { Userfaultfd } = require(${dist})
        const uffd = Userfaultfd.open()
        uffd.register({ address: workerData.address, length: 4096 })
        parentPort.postMessage('ready')
        ;(async () => {
          for await (const e of uffd.events()) {
            await new Promise((r) => setTimeout(r, 1500))
            uffd.copy(e.address & ~4095n, new BigUint64Array(512).fill(5n))
          }
        })()
      \`, { eval: true, workerData: { address: served.address } })
      w.once('message', async () => {
        const toucher = touch([own.address])
        const fromWorker = new BigUint64Array(served.buffer)[0]   // blocks ~1.5 s
        const { values } = await toucher
        console.log(String(fromWorker), String(values[0]))
        process.exit(0)
      })
    `)
    expect(child.stderr).not.toMatch(/DEADLOCK/)
    expect(child.stdout).toBe('5 77\n')
    expect(child.status).toBe(0)
  })

  it('a Worker serves memory that the main JS thread reads directly (in-process lazy loading)', () => {
    // In a child: the JS thread blocks in each fault, so a stalled worker must not hang vitest.
    const child = runChild(`
      const { Worker } = require('worker_threads')
      const { Mapping } = require(${dist})
      const m = Mapping.anonymous(4096 * 8)
      const w = new Worker(${JSON.stringify(path.join(root, 'examples', 'worker-handler.js'))}, { workerData: { address: m.address, length: m.length } })
      w.once('message', () => {
        const view = new BigUint64Array(m.buffer)
        const seen = []
        for (let i = 0; i < 8; i++) seen.push(String(view[i * 512]))
        console.log(seen.join(','))
        process.exit(0)
      })
    `)
    expect(child.stdout).toBe('1000,1001,1002,1003,1004,1005,1006,1007\n')
    expect(child.status).toBe(0)
  })
})

describe('examples', () => {
  it("the README's first-use modules run as written (import from 'userfaultfd')", () => {
    const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8')
    const first = readme.slice(readme.indexOf('## First use'), readme.indexOf('## The one rule'))
    const blocks = [...first.matchAll(/```js\n\/\/ ([\w.-]+)[^\n]*\n([\s\S]*?)```/g)]
    expect(blocks.map((b) => b[1])).toEqual(['first-use.mjs', 'handler.mjs', 'main.mjs'])
    // A project that depends on this package: node_modules/userfaultfd is the package itself.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-readme-'))
    try {
      fs.mkdirSync(path.join(dir, 'node_modules'))
      fs.symlinkSync(root, path.join(dir, 'node_modules', 'userfaultfd'))
      for (const [, name, code] of blocks) fs.writeFileSync(path.join(dir, name), code)
      const run = (file: string) =>
        spawnSync(process.execPath, [path.join(dir, file)], {
          cwd: dir,
          encoding: 'utf8',
          timeout: 15_000 * timeScale,
          killSignal: 'SIGKILL',
        })
      const lazy = run('first-use.mjs')
      expect(lazy.stderr).toBe('')
      expect(lazy.stdout).toBe('7\n')
      expect(lazy.status).toBe(0)
      const js = run('main.mjs')
      expect(js.stderr).toBe('')
      expect(js.stdout).toBe('1005n\n')
      expect(js.status).toBe(0)
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })

  it('examples/first-use.js runs and prints the served page', () => {
    const r = spawnSync(process.execPath, [path.join(root, 'examples', 'first-use.js')], {
      encoding: 'utf8',
      timeout: 15_000 * timeScale,
      killSignal: 'SIGKILL',
    })
    expect(r.stderr).toBe('')
    expect(r.stdout).toBe('page 5 holds 1005n\n')
    expect(r.status).toBe(0)
  })
})
