// The `userfaultfd` command, run as the real binary (node dist/cli/index.js ...).
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { type ChildProcess, execFileSync } from 'node:child_process'
import { writeSnapshot } from '../src/cli/demo/snapshot'
import { dist, killChildren, runCommand, runGuest, runNode } from './helpers/children'
import { env } from './helpers/env'

const cli = path.join(dist, 'cli', 'index.js')
let dir: string

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cli-'))
})
afterEach(() => killChildren())
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

describe('userfaultfd CLI', () => {
  it('has a shebang and is the package bin', () => {
    expect(fs.readFileSync(cli, 'utf8').startsWith('#!/usr/bin/env node\n')).toBe(true)
    const pkg = JSON.parse(fs.readFileSync(path.join(dist, '..', 'package.json'), 'utf8'))
    expect(pkg.bin).toEqual({ userfaultfd: 'dist/cli/index.js' })
  })

  it('doctor --json: usable here, with kernel, features, ioctls, huge pages, container; exit 0', {
    timeout: 15_000,
  }, async () => {
    const r = await runNode([cli, 'doctor', '--json'])
    expect(r.code).toBe(0)
    const report = JSON.parse(r.stdout)
    // In a container given only --device /dev/userfaultfd the syscall is blocked (seccomp).
    expect(report).toMatchObject({
      usable: true,
      status: 'usable',
      kernel: os.release(),
      syscall: { ok: env.syscall },
      device: { ok: env.device },
    })
    expect(report.features).toContain('EVENT_REMOVE')
    expect(report.ioctls).toContain('REGISTER')
    expect(report.hugePages).toHaveProperty('total')
    expect(report.container).toHaveProperty('detected')
    expect(typeof report.unprivilegedUserfaultfd).toBe('number')
  })

  it('doctor: a human summary', { timeout: 15_000 }, async () => {
    const r = await runNode([cli, 'doctor'])
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/userfaultfd doctor: USABLE/)
    expect(r.stdout).toMatch(env.syscall ? /userfaultfd\(2\) syscall: works/ : /\/dev\/userfaultfd: works/)
  })

  it('doctor as an unprivileged user: user-mode-only, exit 3, names the fixes', { timeout: 15_000 }, async (ctx) => {
    if (process.getuid!() !== 0 || !fs.existsSync('/usr/bin/setpriv')) {
      ctx.skip('needs root and setpriv to run as nobody')
    }
    if (fs.readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim() !== '0') {
      ctx.skip('vm.unprivileged_userfaultfd is 1: nobody may use the syscall')
    }
    const r = await runCommand('/usr/bin/setpriv', [
      '--reuid=65534',
      '--regid=65534',
      '--clear-groups',
      process.execPath,
      cli,
      'doctor',
      '--json',
    ])
    // Under Docker's seccomp profile even UFFD_USER_MODE_ONLY is blocked: unusable (exit 1).
    expect(r.code).toBe(env.syscallUserModeOnly ? 3 : 1)
    const report = JSON.parse(r.stdout)
    expect(report).toMatchObject({
      usable: false,
      status: env.syscallUserModeOnly ? 'user-mode-only' : 'unusable',
      uid: 65534,
      syscall: { ok: false, code: 'EPERM' },
      capSysPtrace: false,
    })
    // The device can be opened to nobody: setfacl. Absent (a container without --device): the flag.
    expect(report.fixes.join('\n')).toMatch(
      env.deviceExists ? /setfacl -m u:nobody:rw \/dev\/userfaultfd/ : /--device \/dev\/userfaultfd/,
    )
  })

  it('usage errors exit 2 with a message', { timeout: 15_000 }, async () => {
    const unknown = await runNode([cli, 'frobnicate'])
    expect(unknown.code).toBe(2)
    expect(unknown.stderr).toMatch(/unknown command 'frobnicate'/)
    const missing = await runNode([cli, 'serve', '--socket', path.join(dir, 'x')])
    expect(missing.code).toBe(2)
    expect(missing.stderr).toMatch(/--mem-file/)
    const bad = await runNode([cli, 'serve', '--socket', 'x', '--mem-file', 'y', '--on-remove', 'maybe'])
    expect(bad.code).toBe(2)
    const noFile = await runNode([
      cli,
      'serve',
      '--socket',
      path.join(dir, 'nf'),
      '--mem-file',
      path.join(dir, 'absent'),
    ])
    expect(noFile.code).toBe(2)
    expect(noFile.stderr).toMatch(/--mem-file .*ENOENT/)
  })

  it('serve refuses a FIFO as --mem-file at once (it used to block forever) and a timeout no timer can wait', {
    timeout: 20_000,
  }, async () => {
    const fifo = path.join(dir, 'fifo')
    execFileSync('mkfifo', [fifo])
    const r = await runNode([cli, 'serve', '--socket', path.join(dir, 'f.sock'), '--mem-file', fifo], 10_000)
    expect({ code: r.code, signal: r.signal }).toEqual({ code: 2, signal: null })
    expect(r.stderr).toBe(
      `userfaultfd: --mem-file: memory file ${fifo} is a FIFO (named pipe): it must be a regular file or a block device\n`,
    )
    const memFile = path.join(dir, 'limits.mem')
    writeSnapshot(memFile, 1 << 20)
    const t = await runNode(
      [cli, 'serve', '--socket', path.join(dir, 't.sock'), '--mem-file', memFile, '--handshake-timeout', '5000000000'],
      10_000,
    )
    expect(t.code).toBe(2)
    expect(t.stderr).toMatch(
      /--handshake-timeout: handshakeTimeout must be an integer number of milliseconds from 1 to 2147483647 \(got number 5000000000\)/,
    )
    expect(fs.existsSync(path.join(dir, 't.sock'))).toBe(false)
  })

  it('serve: serves a Firecracker-like guest; SIGTERM shuts down cleanly with --json stats', {
    timeout: 30_000,
  }, async () => {
    const memFile = path.join(dir, 'serve.mem')
    const socket = path.join(dir, 'serve.sock')
    writeSnapshot(memFile, 4 << 20)
    let server: ChildProcess | undefined
    let stderr = ''
    let onListening: () => void = () => {}
    const listening = new Promise<void>((resolve) => {
      onListening = resolve
    })
    const serverDone = runNode([cli, 'serve', '--socket', socket, '--mem-file', memFile, '--json'], 25_000, (child) => {
      server = child
      child.stderr!.on('data', (d) => {
        stderr += d
        if (stderr.includes('listening on')) onListening()
      })
    })
    await listening
    const g = await runGuest({ socket, memFile, dontneed: 65536 })
    expect(g.code).toBe(0)
    expect(g.result).toMatchObject({ mismatches: 0, zeroMismatches: 0 })
    await new Promise((r) => setTimeout(r, 100))
    server!.kill('SIGTERM')
    const r = await serverDone
    expect(r.code).toBe(0)
    const stats = JSON.parse(r.stdout)
    expect(stats).toMatchObject({
      pagesServed: 1024,
      zeroPages: 16,
      removes: 1,
      connections: { total: 1, active: 0, failed: 0 },
    })
    expect(r.stderr).toMatch(/connection 1: pid \d+/)
    expect(fs.existsSync(socket)).toBe(false) // the socket file is removed on shutdown
  })

  it('demo --json: lazily restores a snapshot into a child and verifies every page', { timeout: 60_000 }, async () => {
    const r = await runNode([cli, 'demo', '--size', '8', '--json'], 55_000)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const s = JSON.parse(r.stdout)
    expect(s).toMatchObject({
      ok: true,
      pages: 2048,
      pagesServed: 2048,
      mismatches: 0,
      verifiedBytes: 8 << 20,
      zeroMismatches: 0,
      zeroPages: 256,
    })
    expect(s.pagesFaulted).toBe(2048 + 256)
    expect(Object.values(s.faultLatencyHistogramUs).reduce((a: number, b) => a + (b as number), 0)).toBe(2048)
  })

  it('demo: the human report', { timeout: 60_000 }, async () => {
    const r = await runNode([cli, 'demo', '--size', '4', '--threads', '2'], 55_000)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/pages faulted: 1280/)
    expect(r.stdout).toMatch(/fault latency: p50/)
    expect(r.stdout).toMatch(/OK: every page matched the snapshot/)
  })
})
