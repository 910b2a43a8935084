// `userfaultfd doctor`, run as the real binary: access, the labelled ioctl lists, the package's
// features tried on this machine, and the fixes (as root, and as nobody via setpriv).
import { afterEach, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { DirtyTracker, Feature, type KernelFeature, Userfaultfd, missingFeatures } from '../src/index'
import { dist, killChildren, runCommand, runNode } from './helpers/children'
import { env } from './helpers/env'
import { hasFeature, kernelRelease } from './helpers/kernel'
import { timeScale } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')
afterEach(() => killChildren())

const offered = Userfaultfd.probe().features
const has = (f: bigint): boolean => (offered & f) !== 0n
const hugePagesFree = Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)

describe('userfaultfd doctor', () => {
  it('--json: usable here, with kernel, features, both ioctl lists, the feature checks; exit 0', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const r = await runNode([cli, 'doctor', '--json'], 25_000)
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
    // The uffd's own ioctls (UFFDIO_API) vs a registered range's (UFFDIO_REGISTER).
    expect(report.ioctls).toEqual(expect.arrayContaining(['API', 'REGISTER', 'UNREGISTER']))
    expect(report.ioctls).not.toContain('COPY')
    expect(report.rangeIoctls.anonymous.modes).toContain('missing')
    expect(report.rangeIoctls.anonymous.ioctls).toEqual(expect.arrayContaining(['COPY', 'ZEROPAGE', 'WAKE']))
    expect(report.rangeIoctls.shmem.ioctls).toContain('COPY')
    if (has(Feature.MINOR_SHMEM)) expect(report.rangeIoctls.shmem.ioctls).toContain('CONTINUE')
    expect(report.rangeIoctls.anonymous.ioctls.includes('MOVE')).toBe(has(Feature.MOVE))
    expect(report.hugePages).toHaveProperty('total')
    expect(report.container).toHaveProperty('detected')
    expect(typeof report.unprivilegedUserfaultfd).toBe('number')

    const check = (id: string) => report.checks.find((c: { id: string }) => c.id === id)
    for (const id of [
      'register-anonymous',
      'register-shmem',
      'fault-server-anonymous',
      'fault-server-file',
      'fault-server-shmem',
    ])
      expect(check(id)).toMatchObject({ ok: true })
    // Gated by the kernel: works where offered, refused with the release that brings it where not.
    // The releases are this architecture's (kernelRelease: write protection is 6.10 on arm64).
    // DirtyTracker needs write protection only: without WP_ASYNC it runs in 'sync' mode.
    const gated: Array<[string, KernelFeature, string]> = [
      ['move', 'MOVE', 'for MOVE'],
      ['poison', 'POISON', 'for POISON'],
      ['dirty-tracker', 'PAGEFAULT_FLAG_WP', 'for DirtyTracker'],
      ['minor-shmem', 'MINOR_SHMEM', 'for minor faults'],
      ['write-protect', 'PAGEFAULT_FLAG_WP', 'for write protection'],
      ['live-snapshot', 'PAGEFAULT_FLAG_WP', 'for live snapshot'],
    ]
    for (const [id, feature, what] of gated) {
      if (hasFeature(feature)) expect(check(id)).toMatchObject({ ok: true })
      else {
        const fix = `Linux ${kernelRelease(feature)}+ ${what}`
        expect(check(id)).toMatchObject({ ok: false, fix: expect.stringContaining(fix) })
        expect(report.fixes.join('\n')).toContain(fix)
      }
    }
    if (hasFeature('PAGEFAULT_FLAG_WP'))
      expect(check('dirty-tracker').detail).toContain(`mode '${DirtyTracker.support().mode}'`)
    // What is missing, with the release of each, and the paths the engines take here.
    expect(report.missing).toEqual(missingFeatures())
    expect(report.dirtyTracking).toBe(DirtyTracker.support().mode ?? null)
    expect(report.snapshotPopulates).toBe(!hasFeature('WP_UNPOPULATED'))
    if (hugePagesFree > 0) expect(check('register-hugetlb')).toMatchObject({ ok: true })
    else expect(check('register-hugetlb')).toMatchObject({ ok: null, fix: expect.stringMatching(/nr_hugepages/) })
    // Every check says something, and only fixes that exist are listed.
    for (const c of report.checks) expect(c.detail.length).toBeGreaterThan(0)
    expect(new Set(report.fixes).size).toBe(report.fixes.length)
  })

  it('a human summary that labels each list', { timeout: 30_000 * timeScale }, async () => {
    const r = await runNode([cli, 'doctor'], 25_000)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^userfaultfd doctor: USABLE/)
    expect(r.stdout).toMatch(env.syscall ? /userfaultfd\(2\) syscall: works/ : /\/dev\/userfaultfd: works/)
    expect(r.stdout).toMatch(/features offered \(UFFDIO_API, \d+\): .*EVENT_REMOVE/)
    expect(r.stdout).toMatch(/ioctls of the uffd itself \(UFFDIO_API handshake\): .*REGISTER/)
    expect(r.stdout).toMatch(/ioctls of a registered anonymous range \(UFFDIO_REGISTER missing[^)]*\): .*COPY/)
    expect(r.stdout).toMatch(/^What works here \(each tried on a small mapping\):$/m)
    expect(r.stdout).toMatch(/^✓ FaultServer: anonymous memory, \{ buffer \} source: yes/m)
  })

  it('as an unprivileged user: user-mode-only, exit 3, names the fixes; the checks run user-mode-only', {
    timeout: 30_000 * timeScale,
  }, async (ctx) => {
    if (process.getuid!() !== 0 || !fs.existsSync('/usr/bin/setpriv')) {
      ctx.skip('needs root and setpriv to run as nobody')
    }
    if (fs.readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim() !== '0') {
      ctx.skip('vm.unprivileged_userfaultfd is 1: nobody may use the syscall')
    }
    const r = await runCommand(
      '/usr/bin/setpriv',
      ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cli, 'doctor', '--json'],
      25_000,
    )
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
    if (env.syscallUserModeOnly) {
      const check = (id: string) => report.checks.find((c: { id: string }) => c.id === id)
      expect(check('fault-server-anonymous')).toMatchObject({ ok: true })
    } else expect(report.checks).toEqual([])
  })
})
