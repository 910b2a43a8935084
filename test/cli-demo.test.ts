// `userfaultfd demo`, run as the real binary: small and 512 MiB restores, worker threads,
// progress while it runs, Ctrl-C removing the temporary files, and the guest's own errors.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import type { ChildProcess } from 'node:child_process'
import { dist, killChildren, runGuest, runNode, timeScale, watchOutput } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')
let dir: string

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-demo-'))
})
afterEach(() => killChildren())
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

/** The pids of processes whose command line mentions `text`. */
function processesMentioning(text: string): number[] {
  const pids: number[] = []
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue
    try {
      if (fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(text)) pids.push(Number(entry))
    } catch {
      /* gone */
    }
  }
  return pids
}

describe('userfaultfd demo', () => {
  it('--json: lazily restores a snapshot into a child and verifies every page', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const r = await runNode([cli, 'demo', '--size', '8', '--json'], 55_000)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const s = JSON.parse(r.stdout)
    expect(s).toMatchObject({
      ok: true,
      pages: 2048,
      regions: 1,
      threads: 1,
      pagesServed: 2048,
      mismatches: 0,
      verifiedBytes: 8 << 20,
      zeroMismatches: 0,
      zeroPages: 256,
    })
    // fault-around: fewer faults than pages; each zero page after MADV_DONTNEED is one fault
    expect(s.faults).toBeGreaterThanOrEqual(256 + 1)
    expect(s.faults).toBeLessThan(2048 + 256)
    expect(s.pagesFaulted).toBe(s.faults) // the old name
    expect(Object.values(s.faultLatencyHistogramUs).reduce((a: number, b) => a + (b as number), 0)).toBe(2048)
    expect(s.faultLatencyUs.p50).toBeGreaterThan(0)
    expect(s.faultLatencyUs.p50).toBeLessThanOrEqual(s.faultLatencyUs.p99)
    expect(s.faultLatencyUs.p99).toBeLessThanOrEqual(s.faultLatencyUs.max)
  })

  it('--threads 3: worker threads touch their own regions', { timeout: 60_000 * timeScale }, async () => {
    const r = await runNode([cli, 'demo', '--size', '6', '--threads', '3', '--json'], 55_000)
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: true, pages: 1536, regions: 3, threads: 3, mismatches: 0 })
  })

  it('512 MiB: the human report, with progress on stderr while it runs', { timeout: 240_000 * timeScale }, async () => {
    const r = await runNode([cli, 'demo', '--size', '512M'], 230_000)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/faults: {8}\d+ for 131072 pages \+ 256 after MADV_DONTNEED/)
    expect(r.stdout).toMatch(/pages served: {2}131072 from the snapshot, 256 zero pages after 1 UFFD_EVENT_REMOVE/)
    expect(r.stdout).toMatch(/verified: {6}512\.0 MiB, 0 mismatching pages/)
    expect(r.stdout).toMatch(/fault latency: p50 [\d.]+ us/)
    expect(r.stdout).toMatch(/OK: every page matched the snapshot/)
    const histogram = [...r.stdout.matchAll(/^ +\S+ us \| #+ (\d+)$/gm)].reduce((n, m) => n + Number(m[1]), 0)
    expect(histogram).toBe(131072)
    // Not a terminal: a line per phase as it starts, a few while it runs, and the final one.
    expect(r.stderr).toMatch(/^writing snapshot: 100\.0% 512\.0\/512\.0 MiB, [\d.]+ MiB\/s, in /m)
    expect(r.stderr).toMatch(/^touching pages \(faults\): 0\.0% 0\/131072 pages/m)
    expect(r.stderr).toMatch(/^touching pages \(faults\): 100\.0% 131072\/131072 pages, \d+ pages\/s, in /m)
    expect(r.stderr).toMatch(/^verifying pages: 100\.0% 131072\/131072 pages/m)
  })

  it('SIGINT (Ctrl-C) stops it, kills the guest and removes the temporary files; exit 130', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const tmp = fs.mkdtempSync(path.join(dir, 'sigint-'))
    let child: ChildProcess | undefined
    let stderr: ReturnType<typeof watchOutput> | undefined
    const done = runNode(
      [cli, 'demo', '--size', '1024'],
      55_000,
      (c) => {
        child = c
        stderr = watchOutput(c.stderr!)
      },
      [],
      { ...process.env, TMPDIR: tmp },
    )
    // Interrupt it while the guest touches memory (the handler serves, the guest runs).
    await stderr!.waitFor(/touching pages \(faults\)/, 45_000)
    expect(fs.readdirSync(tmp)).toHaveLength(1)
    expect(processesMentioning(tmp).length).toBeGreaterThan(0)
    child!.kill('SIGINT')
    const r = await done
    expect(r.code).toBe(130)
    expect(r.stderr).toMatch(/userfaultfd demo: stopped by SIGINT; temporary files removed/)
    expect(fs.readdirSync(tmp)).toEqual([])
    // The guest is gone too (it was killed, not left waiting on faults).
    const deadline = Date.now() + 5000 * timeScale
    while (processesMentioning(tmp).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
    expect(processesMentioning(tmp)).toEqual([])
  })

  it('SIGTERM while the snapshot is written: exit 143, nothing left behind', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const tmp = fs.mkdtempSync(path.join(dir, 'sigterm-'))
    let child: ChildProcess | undefined
    let stderr: ReturnType<typeof watchOutput> | undefined
    const done = runNode(
      [cli, 'demo', '--size', '2048'],
      55_000,
      (c) => {
        child = c
        stderr = watchOutput(c.stderr!)
      },
      [],
      { ...process.env, TMPDIR: tmp },
    )
    await stderr!.waitFor(/writing snapshot/, 45_000)
    child!.kill('SIGTERM')
    const r = await done
    expect(r.code).toBe(143)
    expect(fs.readdirSync(tmp)).toEqual([])
  })

  it('the guest reports bad options instead of crashing, and ends by itself', {
    timeout: 15_000 * timeScale,
  }, async () => {
    const bad = await runNode([path.join(dist, 'cli', 'demo', 'guest.js'), '{not json'])
    expect(bad.code).toBe(2)
    expect(bad.stderr).toMatch(/^guest: bad options JSON \(.*\): \{not json\n$/)
    const noSocket = await runGuest({ socket: path.join(dir, 'nobody.sock'), memFile: '/etc/hostname', size: 4096 })
    expect(noSocket.code).toBe(2)
    expect(noSocket.parseError).toMatch(/Unexpected end of JSON input/)
    expect(noSocket.stderr).toMatch(/ENOENT/)
  })
})
