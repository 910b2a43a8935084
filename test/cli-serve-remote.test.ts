import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { writeSnapshot } from '../src/cli/demo/snapshot'
import { WorkingSet } from '../src/index'
import { dist, killChildren, runGuest, runNode, startServe } from './helpers/children'
import { missing, startNbdkit, startNginx, stopServers, tempDir } from './helpers/servers'
import { timeScale } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')

afterEach(() => killChildren())
afterAll(stopServers)

function snapshotFile(size: number): { dir: string; memFile: string } {
  const dir = tempDir('uffd-serve-remote-')
  const memFile = path.join(dir, 'snap.mem')
  writeSnapshot(memFile, size)
  return { dir, memFile }
}

describe.skipIf(missing('nbdkit'))('serve --mem-file nbd://', () => {
  it('records a working set, then replays it: every page right, and far fewer faults', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const { dir, memFile } = snapshotFile(4 << 20)
    const nbd = await startNbdkit(memFile)
    const wsFile = path.join(dir, 'vm.ws')
    const socket = path.join(dir, 'rec.sock')
    // 1. record
    const rec = await startServe(['--socket', socket, '--mem-file', nbd.url, '--record-working-set', wsFile, '--json'])
    const g1 = await runGuest({ socket, memFile, regions: 2 }, 30_000)
    expect(g1.parseError).toBeUndefined()
    expect(g1.result).toMatchObject({ mismatches: 0 })
    await rec.stderr.waitFor(/working set of 1024 pages written to .*vm\.ws/)
    rec.child.kill('SIGTERM')
    const r1 = await rec.done
    expect(r1.code).toBe(0)
    expect(JSON.parse(r1.stdout)).toMatchObject({ faults: 1024 }) // every first touch faulted
    const ws = WorkingSet.load(wsFile)
    expect([...ws.pages]).toEqual(Array.from({ length: 1024 }, (_, i) => i)) // the guest touches in order
    expect(ws.identity.size).toBe(4 << 20)

    // 2. replay
    const play = await startServe([
      '--socket',
      socket,
      '--mem-file',
      nbd.url,
      '--working-set',
      wsFile,
      '--log-format',
      'json',
      '--progress-interval',
      '20',
      '--json',
    ])
    const g2 = await runGuest({ socket, memFile, regions: 2 }, 30_000)
    expect(g2.result).toMatchObject({ mismatches: 0 })
    await play.stderr.waitFor(/"event":"end"/)
    play.child.kill('SIGINT')
    const r2 = await play.done
    expect(r2.code).toBe(0)
    const stats = JSON.parse(r2.stdout) as { faults: number }
    expect(stats.faults).toBeLessThan(1024 / 4)
    const records = r2.stderr
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
    expect(records.at(-1)?.event).toBe('stopped')
    for (const p of records.filter((x) => x.event === 'progress'))
      expect(p).toMatchObject({ faultsWaiting: expect.any(Number), bytesPresent: expect.any(Number) })
  })

  it('refuses a working set recorded on another snapshot (exit 1, saying why)', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const a = snapshotFile(1 << 20)
    const b = snapshotFile(1 << 20)
    // the same size, another content (its first page, one the fingerprint samples)
    const fdb = fs.openSync(b.memFile, 'r+')
    fs.writeSync(fdb, Buffer.from('another snapshot'), 0, 16, 8)
    fs.closeSync(fdb)
    const nbd = await startNbdkit(b.memFile)
    // a working set of snapshot a (recorded through the API, on the local file)
    const wsFile = path.join(a.dir, 'a.ws')
    const { fileIdentity } = await import('../src/sources/snapshot-identity')
    const fd = fs.openSync(a.memFile, 'r')
    WorkingSet.fromTouches(fileIdentity(fd), [0, 4096]).save(wsFile)
    fs.closeSync(fd)
    const r = await runNode([
      cli,
      'serve',
      '--socket',
      path.join(a.dir, 's.sock'),
      '--mem-file',
      nbd.url,
      '--working-set',
      wsFile,
    ])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/stale working set: it was recorded on a snapshot with a fingerprint of other content/)
  })
})

describe.skipIf(missing('nginx'))('serve --mem-file https://', () => {
  it('serves a guest from an HTTPS object, with a bearer token and a cache directory', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const { dir, memFile } = snapshotFile(2 << 20)
    const web = await startNginx(dir, {
      https: true,
      extra: 'location / { if ($http_authorization != "Bearer t0k") { return 401; } }',
    })
    const socket = path.join(dir, 'h.sock')
    const cacheDir = path.join(dir, 'cache')
    const s = await startServe([
      '--socket',
      socket,
      '--mem-file',
      `${web.url}/snap.mem`,
      '--header',
      'Authorization: Bearer t0k',
      '--ca',
      web.cert!,
      '--cache-dir',
      cacheDir,
      '--cache-size',
      '64M',
    ])
    const g = await runGuest({ socket, memFile }, 30_000)
    expect(g.result).toMatchObject({ mismatches: 0 })
    s.child.kill('SIGTERM')
    expect((await s.done).code).toBe(0)
    expect(fs.readdirSync(cacheDir).length).toBe(1) // one snapshot version cached
  })
})

describe('serve usage checks for remote snapshots', () => {
  it.each([
    ['an unsupported URL', ['--mem-file', 'ftp://h/x'], /--mem-file: unsupported snapshot URL ftp:\/\/h\/x/],
    ['a bad header', ['--mem-file', '/etc/hostname', '--header', 'nocolon'], /--header must be 'Name: value'/],
    ['a bad cache size', ['--mem-file', '/etc/hostname', '--cache-size', 'lots'], /--cache-size must be a size/],
  ])('%s: exit 2 naming the flag', async (_what, args, message) => {
    const r = await runNode([cli, 'serve', '--socket', path.join(tempDir(), 'x.sock'), ...args])
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(message)
  })
})
