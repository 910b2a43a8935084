// `userfaultfd serve`, run as the real binary against Firecracker-like guests (child processes):
// serving, shutdown, logs (timestamped text, JSON lines), per-VM progress, and the socket checks
// (a live socket refused, a stale one replaced, the longest path that fits).
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import * as net from 'node:net'
import { writeSnapshot } from '../src/cli/demo/snapshot'
import { dist, killChildren, runGuest, runNode, startServe, timeScale } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')
const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z /
let dir: string
let memFile: string
let bigMemFile: string

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-serve-'))
  memFile = path.join(dir, 'small.mem')
  writeSnapshot(memFile, 4 << 20)
  bigMemFile = path.join(dir, 'big.mem')
  writeSnapshot(bigMemFile, 128 << 20)
})
afterEach(() => killChildren())
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

describe('userfaultfd serve', () => {
  it('serves a Firecracker-like guest; logs with timestamps; SIGTERM stops it with --json stats', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const socket = path.join(dir, 'serve.sock')
    const { child, done, stderr } = await startServe(['--socket', socket, '--mem-file', memFile, '--json'])
    const g = await runGuest({ socket, memFile, dontneed: 65536 })
    expect(g.parseError).toBeUndefined()
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, zeroMismatches: 0 })
    await stderr.waitFor(/connection 1 ended/)
    child.kill('SIGTERM')
    const r = await done
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout)).toMatchObject({
      pagesServed: 1024,
      zeroPages: 16,
      removes: 1,
      connections: { total: 1, active: 0, failed: 0 },
    })
    const lines = r.stderr.trimEnd().split('\n')
    for (const line of lines) expect(line).toMatch(ISO)
    expect(lines[0]).toMatch(
      /userfaultfd serve: listening on .*serve\.sock \(memory file .*, 4\.0 MiB, on remove: zero\)$/,
    )
    expect(r.stderr).toMatch(/connection 1: pid \d+ uid \d+, 1 region\(s\), 4\.0 MiB of guest memory/)
    expect(r.stderr).toMatch(/connection 1 ended \(1024 pages served, 16 zero, 1 removes\)/)
    expect(lines.at(-1)).toMatch(/stopped by SIGTERM; 1024 pages served to 1 connection\(s\)/)
    expect(fs.existsSync(socket)).toBe(false) // removed on shutdown
  })

  it('--trace FILE: every fault of the guest in a Chrome trace-event file, written when stopped', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const socket = path.join(dir, 'trace.sock')
    const trace = path.join(dir, 'serve-trace.json')
    const { child, done, stderr } = await startServe([
      '--socket',
      socket,
      '--mem-file',
      memFile,
      '--json',
      '--trace',
      trace,
    ])
    const g = await runGuest({ socket, memFile, dontneed: 65536 })
    expect(g.code).toBe(0)
    await stderr.waitFor(/connection 1 ended/)
    child.kill('SIGTERM')
    const r = await done
    expect(r.code).toBe(0)
    const stats = JSON.parse(r.stdout)
    const events = JSON.parse(fs.readFileSync(trace, 'utf8')).traceEvents as Array<Record<string, unknown>>
    const faults = events.filter((e) => e.ph === 'X')
    expect(faults.length).toBe(stats.faults)
    expect(faults.filter((e) => e.name === 'zero').length).toBe(16)
    expect(faults.filter((e) => e.name === 'demand').length).toBe(stats.faults - 16)
    for (const e of faults) {
      expect(e).toMatchObject({ cat: 'userfaultfd', pid: expect.any(Number), tid: expect.any(Number) })
      expect(e.dur as number).toBeGreaterThanOrEqual(0)
      expect((e.args as { address: string }).address).toMatch(/^0x[0-9a-f]+$/)
    }
    expect(r.stderr).toMatch(new RegExp(`trace of ${stats.faults} fault\\(s\\) written to .*serve-trace\\.json`))
    // What the CLI refuses up front: a directory, or a file in a directory that is not there.
    for (const bad of [dir, path.join(dir, 'nope', 't.json')]) {
      const u = await runNode([
        cli,
        'serve',
        '--socket',
        path.join(dir, 'x.sock'),
        '--mem-file',
        memFile,
        '--trace',
        bad,
      ])
      expect(u.code).toBe(2)
      expect(u.stderr).toMatch(/--trace/)
    }
  })

  it('--log-format json: one JSON object per line, with per-VM progress (percent, rate, ETA)', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const socket = path.join(dir, 'json.sock')
    const { child, done, stderr } = await startServe([
      '--socket',
      socket,
      '--mem-file',
      bigMemFile,
      '--log-format',
      'json',
      '--progress-interval',
      '20',
    ])
    const g = await runGuest({ socket, memFile: bigMemFile, threads: 2 }, 45_000)
    expect(g.code).toBe(0)
    await stderr.waitFor(/"event":"end"/)
    child.kill('SIGINT')
    const r = await done
    expect(r.code).toBe(0)
    expect(r.stdout).toBe('')
    const records = r.stderr
      .trimEnd()
      .split('\n')
      .map((line) => JSON.parse(line) as Record<string, unknown>)
    for (const rec of records) {
      expect(rec).toMatchObject({ level: expect.any(String), scope: 'userfaultfd serve', msg: expect.any(String) })
      expect(new Date(rec.time as string).toISOString()).toBe(rec.time)
    }
    const events = records.map((rec) => rec.event)
    expect(events[0]).toBe('listening')
    expect(events).toContain('ready')
    expect(events.at(-1)).toBe('stopped')
    expect(records.find((rec) => rec.event === 'ready')).toMatchObject({
      connection: 1,
      pid: g.result!.pid,
      regions: 2,
      totalBytes: 128 << 20,
    })
    const progress = records.filter((rec) => rec.event === 'progress')
    expect(progress.length).toBeGreaterThan(0)
    for (const p of progress) {
      expect(p).toMatchObject({ connection: 1, totalBytes: 128 << 20 })
      expect(p.servedBytes as number).toBeGreaterThan(0)
      expect(p.percent).toBeCloseTo(((p.servedBytes as number) / (128 << 20)) * 100, 2)
      expect(p.percent as number).toBeLessThanOrEqual(100)
      expect(p.msg).toMatch(/^connection 1 \(pid \d+\): \d+\.\d% of 128\.0 MiB served, [\d.]+ MiB\/s, ETA /)
    }
    // Served bytes only grow.
    const served = progress.map((p) => p.servedBytes as number)
    expect([...served].sort((a, b) => a - b)).toEqual(served)
    expect(records.find((rec) => rec.event === 'end')).toMatchObject({ connection: 1, pagesServed: 32768 })
  })

  it('refuses a socket another serve is serving (exit 1); the first keeps serving', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const socket = path.join(dir, 'live.sock')
    const first = await startServe(['--socket', socket, '--mem-file', memFile])
    const second = await runNode([cli, 'serve', '--socket', socket, '--mem-file', memFile])
    expect(second.code).toBe(1)
    expect(second.stderr).toMatch(
      /^userfaultfd serve: --socket .*live\.sock: another handler is serving this socket \(a connection to it succeeded\)/,
    )
    expect(fs.statSync(socket).isSocket()).toBe(true)
    const g = await runGuest({ socket, memFile, size: 1 << 20 })
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0 })
    first.child.kill('SIGTERM')
    expect((await first.done).code).toBe(0)
  })

  it('replaces a stale socket file nobody listens on, and says so', { timeout: 30_000 * timeScale }, async () => {
    const socket = path.join(dir, 'stale.sock')
    // A handler that died without removing its socket.
    const dead = await runNode([
      '-e',
      `require('net').createServer().listen(${JSON.stringify(socket)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ])
    expect(dead.signal).toBe('SIGKILL')
    expect(fs.statSync(socket).isSocket()).toBe(true)
    const { child, done } = await startServe(['--socket', socket, '--mem-file', memFile])
    const g = await runGuest({ socket, memFile, size: 1 << 20 })
    expect(g.code).toBe(0)
    child.kill('SIGTERM')
    const r = await done
    expect(r.code).toBe(0)
    expect(r.stderr).toMatch(/replacing the stale socket .*stale\.sock \(no handler listens on it\)/)
  })

  it('listens on a socket path of exactly 107 bytes (the longest sun_path holds)', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const base = path.join(dir, 'p'.repeat(30))
    fs.mkdirSync(base, { recursive: true })
    const socket = path.join(base, `${'q'.repeat(107 - base.length - 6)}.sock`)
    expect(Buffer.byteLength(socket)).toBe(107)
    const { child, done } = await startServe(['--socket', socket, '--mem-file', memFile])
    expect(fs.statSync(socket).isSocket()).toBe(true)
    const g = await runGuest({ socket, memFile, size: 1 << 20 })
    expect(g.code).toBe(0)
    child.kill('SIGTERM')
    expect((await done).code).toBe(0)
  })

  it('a memory file that cannot be served fails with exit 1 and says why', {
    timeout: 15_000 * timeScale,
  }, async () => {
    const empty = path.join(dir, 'empty.mem')
    fs.writeFileSync(empty, '')
    const r = await runNode([cli, 'serve', '--socket', path.join(dir, 'empty.sock'), '--mem-file', empty])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/^userfaultfd serve: memory file .*empty\.mem is empty\n$/)
  })

  it('--metrics-port 0: /metrics over loopback in the Prometheus text format, 404 and 405 elsewhere', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const socket = path.join(dir, 'metrics.sock')
    const { child, done, stderr } = await startServe(['--socket', socket, '--mem-file', memFile, '--metrics-port', '0'])
    const logged = await stderr.waitFor(/metrics on http:\/\/127\.0\.0\.1:\d+\/metrics/)
    const url = /metrics on (http:\/\/127\.0\.0\.1:\d+\/metrics)/.exec(logged)![1]
    const scrape = async (): Promise<Map<string, number>> => {
      const res = await fetch(url)
      expect(res.status).toBe(200)
      expect(res.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8')
      const text = await res.text()
      expect(text).toMatch(/^# HELP userfaultfd_serve_connections .+\n# TYPE userfaultfd_serve_connections gauge$/m)
      const out = new Map<string, number>()
      for (const line of text.split('\n').filter((l) => l !== '' && !l.startsWith('#'))) {
        const at = line.lastIndexOf(' ')
        out.set(line.slice(0, at), Number(line.slice(at + 1)))
      }
      return out
    }
    const before = await scrape()
    expect(before.get('userfaultfd_serve_connections_total')).toBe(0)
    expect(before.get('userfaultfd_serve_pages_served_total{connection="all"}')).toBe(0)
    const g = await runGuest({ socket, memFile, dontneed: 65536 })
    expect(g.code).toBe(0)
    await stderr.waitFor(/connection 1 ended/)
    const after = await scrape()
    expect(after.get('userfaultfd_serve_connections_total')).toBe(1)
    expect(after.get('userfaultfd_serve_connections')).toBe(0)
    expect(after.get('userfaultfd_serve_connections_failed_total')).toBe(0)
    expect(after.get('userfaultfd_serve_pages_served_total{connection="all"}')).toBe(1024)
    expect(after.get('userfaultfd_serve_bytes_served_total{connection="all"}')).toBe(4 << 20)
    expect(after.get('userfaultfd_serve_zero_pages_total{connection="all"}')).toBe(16)
    expect(after.get('userfaultfd_serve_removes_total{connection="all"}')).toBe(1)
    expect(after.get('userfaultfd_serve_faults_total{connection="all"}')).toBeGreaterThan(0)
    expect((await fetch(url.replace(/metrics$/, 'other'))).status).toBe(404)
    expect((await fetch(url, { method: 'POST' })).status).toBe(405)
    const head = await fetch(url, { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(await head.text()).toBe('')
    child.kill('SIGTERM')
    expect((await done).code).toBe(0)
    await expect(fetch(url)).rejects.toThrow() // closed with the handler
  })

  it('--metrics-port: a port in use fails with exit 1 (socket removed); a bad port is a usage error', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const busy = net.createServer()
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve))
    try {
      const port = (busy.address() as net.AddressInfo).port
      const socket = path.join(dir, 'metrics-busy.sock')
      const r = await runNode([cli, 'serve', '--socket', socket, '--mem-file', memFile, '--metrics-port', String(port)])
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(new RegExp(`--metrics-port ${port}: .*EADDRINUSE`))
      expect(fs.existsSync(socket)).toBe(false)
    } finally {
      busy.close()
    }
    const bad = await runNode([
      cli,
      'serve',
      '--socket',
      path.join(dir, 'x.sock'),
      '--mem-file',
      memFile,
      '--metrics-port',
      '65536',
    ])
    expect(bad.code).toBe(2)
    expect(bad.stderr).toMatch(/--metrics-port/)
  })

  it('--on-source-error: a value other than retry, poison or zero is a usage error', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const args = [cli, 'serve', '--socket', path.join(dir, 'y.sock'), '--mem-file', memFile, '--on-source-error']
    const bad = await runNode([...args, 'ignore'])
    expect(bad.code).toBe(2)
    expect(bad.stderr).toMatch(/--on-source-error/)
  })
})
