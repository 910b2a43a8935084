// Opening a uffd on both paths (syscall, /dev/userfaultfd), the UFFDIO_API handshake, what
// `features` reports, the 'auto' fallback (as root without CAP_SYS_PTRACE, and as nobody), and
// Userfaultfd.probe(): cached, a throwaway fd, never throws for lack of permission.
import { describe, expect, it } from 'vitest'
import * as os from 'node:os'
import {
  type FeatureName,
  Feature,
  IoctlBit,
  Mapping,
  PAGE_SIZE,
  UffdError,
  Userfaultfd,
  fdFlags,
  featureNames,
  isUserfaultfd,
  missingFeatures,
} from '../src/index'
import { native } from '../src/addon/native'
import * as path from 'node:path'
import { dist, runCommand } from './helpers/children'
import { countFds, expectUffdError, lastJson, useCleanup } from './helpers/uffd'
import { env, needs } from './helpers/env'
import { expectUnsupported, featuresExpectedHere, hasFeature, withFeature } from './helpers/kernel'

const track = useCleanup()
const BASE_IOCTLS = IoctlBit.REGISTER | IoctlBit.UNREGISTER | IoctlBit.API

describe('open: the handshake on both paths', () => {
  // In a container one path may be closed: Docker's seccomp blocks the syscall unless
  // unconfined; the device exists only with --device /dev/userfaultfd.
  const closed = {
    syscall:
      'the userfaultfd(2) syscall is refused here (in Docker: --cap-add SYS_PTRACE --security-opt seccomp=unconfined)',
    device: '/dev/userfaultfd cannot be opened here (in Docker: --device /dev/userfaultfd)',
  }
  for (const via of ['syscall', 'device'] as const) {
    it(`via '${via}': a close-on-exec, non-blocking userfaultfd with the API done`, (ctx) => {
      needs(ctx, env[via], closed[via])
      const uffd = track(Userfaultfd.open({ via }))
      expect(uffd.via).toBe(via)
      expect(uffd.closed).toBe(false)
      expect(uffd.fd).toBeGreaterThan(2)
      expect(isUserfaultfd(uffd.fd)).toBe(true)
      expect(fdFlags(uffd.fd)).toEqual({ cloexec: true, nonblock: true })
      expect(uffd.features).toBe(0n)
      expect(uffd.ioctls & BASE_IOCTLS).toBe(BASE_IOCTLS)
      // The handshake really happened: REGISTER works (it is EINVAL before UFFDIO_API).
      const m = track(Mapping.anonymous(PAGE_SIZE))
      expect(uffd.register(m) & IoctlBit.COPY).toBe(IoctlBit.COPY)
    })

    it(`via '${via}': a second UFFDIO_API on the same fd is rejected with EINVAL`, (ctx) => {
      needs(ctx, env[via], closed[via])
      const uffd = track(Userfaultfd.open({ via, features: Feature.THREAD_ID }))
      expectUffdError(() => native.api(uffd.fd, 0n), 'EINVAL', { syscall: 'ioctl(UFFDIO_API)', errno: 22 })
      // ...and the fd keeps what the first handshake set up.
      const m = track(Mapping.anonymous(PAGE_SIZE))
      expect(() => uffd.register(m)).not.toThrow()
    })
  }

  it('before UFFDIO_API every other ioctl is EINVAL (so open() always does the handshake)', () => {
    const flags = native.constants.OpenFlag.O_CLOEXEC | native.constants.OpenFlag.O_NONBLOCK
    const fd = env.syscall ? native.openSyscall(flags) : native.openDevice(flags)
    try {
      const m = track(Mapping.anonymous(PAGE_SIZE))
      expectUffdError(() => native.register(fd, m.address, PAGE_SIZE, 1n), 'EINVAL', {
        syscall: 'ioctl(UFFDIO_REGISTER)',
      })
      const [features, ioctls] = native.api(fd, 0n)
      expect(features).toBe(Userfaultfd.probe().features)
      expect(ioctls).toBe(Userfaultfd.probe().ioctls)
    } finally {
      native.close(fd)
    }
  })

  it('userModeOnly opens too', (ctx) => {
    needs(
      ctx,
      env.syscallUserModeOnly,
      'a seccomp filter blocks the userfaultfd(2) syscall, even with UFFD_USER_MODE_ONLY (Docker without seccomp=unconfined)',
    )
    const uffd = track(Userfaultfd.open({ userModeOnly: true, via: 'syscall' }))
    expect(isUserfaultfd(uffd.fd)).toBe(true)
  })
})

describe('open: features', () => {
  it('reports the features requested and granted, not every feature the kernel offers', () => {
    const want = Feature.THREAD_ID | Feature.MISSING_SHMEM | Feature.EVENT_REMOVE
    const uffd = track(Userfaultfd.open({ features: want }))
    expect(uffd.features).toBe(want)
    expect(uffd.has(Feature.THREAD_ID)).toBe(true)
    expect(uffd.has(Feature.THREAD_ID | Feature.EVENT_REMOVE)).toBe(true)
    expect(uffd.has(Feature.EVENT_FORK)).toBe(false)
    expect(featureNames(uffd.features).sort()).toEqual(['EVENT_REMOVE', 'MISSING_SHMEM', 'THREAD_ID'])
  })

  it('WP_ASYNC also grants WP_UNPOPULATED, which the kernel turns on with it', () => {
    const open = (): Userfaultfd => track(Userfaultfd.open({ features: Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP }))
    if (!withFeature('WP_ASYNC', open)) return
    const uffd = open()
    expect(uffd.features).toBe(Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED)
  })

  it('every feature the kernel offers can be requested at once', () => {
    // all of them, but EVENT_FORK only with CAP_SYS_PTRACE (else EPERM: see below)
    const all = Userfaultfd.probe().features & (env.capSysPtrace ? ~0n : ~Feature.EVENT_FORK)
    const uffd = track(Userfaultfd.open({ features: all }))
    expect(uffd.features).toBe(all)
  })

  it('each feature alone: opens where the kernel offers it, else UnsupportedError naming it and its release; no fd leaks', () => {
    const before = countFds()
    const missing: string[] = []
    for (const [name, bit] of Object.entries(Feature)) {
      if (name === 'EVENT_FORK' && !env.capSysPtrace) continue // EPERM without CAP_SYS_PTRACE: see below
      const open = (): void => Userfaultfd.open({ features: bit }).close()
      if (hasFeature(name as FeatureName)) open()
      else {
        expectUnsupported(open, name as FeatureName)
        missing.push(name)
      }
    }
    expect(missing).toEqual(
      missingFeatures()
        .map((m) => m.feature)
        .filter((f) => f in Feature),
    )
    expect(countFds()).toBe(before)
  })

  it('an unknown feature bit is EINVAL with a hint naming it, and no fd leaks', () => {
    const before = countFds()
    const bogus = 1n << 40n
    const err = expectUffdError(() => Userfaultfd.open({ features: Feature.THREAD_ID | bogus }), 'EINVAL', {
      syscall: 'ioctl(UFFDIO_API)',
    })
    expect(err.hint).toMatch(/does not offer: 0x10000000000/)
    expect(err.message).toContain(err.hint!)
    expect(countFds()).toBe(before)
  })

  it('bad options are TypeErrors that say what was wrong', () => {
    expect(() => Userfaultfd.open({ features: 1 as never })).toThrow(/features must be a non-negative bigint/)
    expect(() => Userfaultfd.open({ features: -1n })).toThrow(TypeError)
    expect(() => Userfaultfd.open({ via: 'ioctl' as never })).toThrow(/via must be 'auto', 'device' or 'syscall'/)
    expect(() => Userfaultfd.open({ nonBlocking: false as never })).toThrow(/O_NONBLOCK/)
    expect(() => Userfaultfd.open({ closeOnExec: false as never })).toThrow(/exec/)
    expect(() => Userfaultfd.open({ userModeOnly: 'yes' as never })).toThrow(/userModeOnly' must be a boolean/)
    expect(() => Userfaultfd.open(null as never)).toThrow(TypeError)
    expect(() => Userfaultfd.open(5 as never)).toThrow(TypeError)
  })
})

describe('probe()', () => {
  it('reports what this kernel offers, and through which path', () => {
    const p = Userfaultfd.probe()
    expect(p).toMatchObject({
      supported: true,
      via: env.syscall ? 'syscall' : 'device',
      kernel: os.release(),
      userModeOnly: false,
      syscall: { ok: env.syscall },
      device: { ok: env.device },
    })
    expect(p.reason).toBeUndefined()
    expect(p.features).toBe(featuresExpectedHere()) // 6.18 has them all; see constants.test.ts
    expect(p.featureNames).toEqual(featureNames(p.features))
    expect(p.ioctls & BASE_IOCTLS).toBe(BASE_IOCTLS)
    expect(p.unprivilegedUserfaultfd === null || typeof p.unprivilegedUserfaultfd === 'number').toBe(true)
  })

  it('is cached; refresh probes again', () => {
    const a = Userfaultfd.probe()
    expect(Userfaultfd.probe()).toBe(a)
    const b = Userfaultfd.probe({ refresh: true })
    expect(b).not.toBe(a)
    expect(b).toEqual(a)
    expect(Userfaultfd.probe()).toBe(b)
  })

  it('never consumes an open uffd and leaves no fd behind', () => {
    const uffd = track(Userfaultfd.open({ features: Feature.THREAD_ID }))
    const before = countFds()
    for (let i = 0; i < 20; i++) Userfaultfd.probe({ refresh: true })
    expect(countFds()).toBe(before)
    // The uffd opened before the probes is untouched: its handshake stands, it still works.
    expect(uffd.features).toBe(Feature.THREAD_ID)
    const m = track(Mapping.anonymous(PAGE_SIZE))
    uffd.register(m)
    expect(uffd.zeropage(m)).toBe(PAGE_SIZE)
  })
})

// Children run as root without CAP_SYS_PTRACE (the syscall is then EPERM, the device still
// opens) and as nobody (both refused; only USER_MODE_ONLY is left).
const script = (body: string): string[] => [
  '-e',
  `const { Userfaultfd } = require(${JSON.stringify(path.join(dist, 'index.js'))});${body}`,
]
const report = `const out = {}
try { const u = Userfaultfd.open(); out.via = u.via; u.close() } catch (e) { out.error = { code: e.code, syscall: e.syscall, hint: e.hint, message: e.message } }
try { const u = Userfaultfd.open({ via: 'syscall' }); u.close(); out.syscall = 'ok' } catch (e) { out.syscall = e.code }
const p = Userfaultfd.probe()
out.probe = { supported: p.supported, via: p.via, userModeOnly: p.userModeOnly, syscall: p.syscall, device: p.device, reason: p.reason }
console.log(JSON.stringify(out))`

describe("via: 'auto' falls back", () => {
  const setpriv = '/usr/bin/setpriv'
  const dropPtrace = [setpriv, '--inh-caps=-sys_ptrace', '--bounding-set=-sys_ptrace']

  const noDevice = 'no /dev/userfaultfd here to fall back to (in Docker: --device /dev/userfaultfd)'

  it('to /dev/userfaultfd when the syscall is EPERM (root without CAP_SYS_PTRACE)', async (ctx) => {
    if (Userfaultfd.probe().unprivilegedUserfaultfd !== 0)
      ctx.skip('vm.unprivileged_userfaultfd is not 0: the syscall would not be refused')
    needs(ctx, env.device, noDevice)
    const r = await runCommand(dropPtrace[0], [...dropPtrace.slice(1), process.execPath, ...script(report)])
    const out = lastJson(r)
    expect(out).toMatchObject({ via: 'device', syscall: 'EPERM' })
    expect(out.probe).toMatchObject({
      supported: true,
      via: 'device',
      userModeOnly: false,
      syscall: { ok: false, code: 'EPERM' },
      device: { ok: true },
    })
  })

  it('and when both paths are refused, the error carries a hint naming the fixes; probe() still does not throw', async (ctx) => {
    if (Userfaultfd.probe().unprivilegedUserfaultfd !== 0)
      ctx.skip('vm.unprivileged_userfaultfd is not 0: the syscall would not be refused')
    needs(ctx, env.deviceExists, `${noDevice}: this checks the device's refusal`)
    const r = await runCommand(setpriv, [
      '--reuid=65534',
      '--regid=65534',
      '--clear-groups',
      process.execPath,
      ...script(report),
    ])
    const out = lastJson<{
      error: { code: string; syscall: string; hint: string; message: string }
      probe: Record<string, unknown>
    }>(r)
    expect(out.error.code).toBe('EACCES') // the last attempt: open('/dev/userfaultfd')
    expect(out.error.syscall).toBe('open')
    expect(out.error.message).toMatch(/\(and the userfaultfd\(2\) syscall: EPERM\)/) // the other path's refusal
    expect(out.error.hint).toMatch(/setfacl -m u:\$USER:rw \/dev\/userfaultfd/)
    expect(out.error.hint).toMatch(/vm\.unprivileged_userfaultfd=1/)
    expect(out.error.hint).toMatch(/CAP_SYS_PTRACE/)
    expect(out.error.hint).toMatch(/--device \/dev\/userfaultfd/)
    if (env.syscallUserModeOnly) {
      expect(out.probe).toMatchObject({
        supported: true,
        via: 'syscall',
        userModeOnly: true,
        syscall: { ok: false, code: 'EPERM' },
        device: { ok: false, code: 'EACCES' },
      })
      expect(out.probe.reason).toMatch(/USER_MODE_ONLY/)
    } else {
      // a seccomp filter (Docker's) refuses even UFFD_USER_MODE_ONLY: nothing is left
      expect(out.probe).toMatchObject({
        supported: false,
        via: null,
        userModeOnly: false,
        syscall: { ok: false, code: 'EPERM' },
        device: { ok: false, code: 'EACCES' },
      })
      expect(out.probe.reason).toMatch(/--device \/dev\/userfaultfd/)
    }
  })

  it('EVENT_FORK without CAP_SYS_PTRACE is EPERM from UFFDIO_API, with a hint saying so', async (ctx) => {
    if (Userfaultfd.probe().unprivilegedUserfaultfd !== 0)
      ctx.skip('vm.unprivileged_userfaultfd is not 0: the syscall would not be refused')
    needs(ctx, env.device, `${noDevice}: without CAP_SYS_PTRACE only the device opens`)
    const r = await runCommand(dropPtrace[0], [
      ...dropPtrace.slice(1),
      process.execPath,
      ...script(
        // Counts userfaultfd fds, not all fds: Node 24 opens one of its own now and then.
        `const fs = require('fs')
      const uffds = () => fs.readdirSync('/proc/self/fd').filter((fd) => { try { return /userfaultfd/.test(fs.readlinkSync('/proc/self/fd/' + fd)) } catch { return false } }).length
      const { Feature } = require(${JSON.stringify(path.join(dist, 'index.js'))})
      try { Userfaultfd.open({ features: Feature.EVENT_FORK }) } catch (e) {
        console.log(JSON.stringify({ code: e.code, syscall: e.syscall, hint: e.hint, leaked: uffds() }))
      }`,
      ),
    ])
    expect(lastJson(r)).toEqual({
      code: 'EPERM',
      syscall: 'ioctl(UFFDIO_API)',
      hint: 'Feature.EVENT_FORK needs CAP_SYS_PTRACE',
      leaked: 0,
    })
  })

  it("via: 'syscall' alone does not fall back: EPERM with the hint", async (ctx) => {
    if (Userfaultfd.probe().unprivilegedUserfaultfd !== 0)
      ctx.skip('vm.unprivileged_userfaultfd is not 0: the syscall would not be refused')
    const r = await runCommand(dropPtrace[0], [
      ...dropPtrace.slice(1),
      process.execPath,
      ...script(
        `try { Userfaultfd.open({ via: 'syscall' }) } catch (e) { console.log(JSON.stringify({ code: e.code, hint: e.hint, isUffdError: e.name })) }`,
      ),
    ])
    expect(lastJson(r)).toMatchObject({
      code: 'EPERM',
      isUffdError: 'UffdError',
      hint: expect.stringMatching(/setfacl/),
    })
  })
})

it('UffdError is exported and open errors are instances of it', () => {
  const err = expectUffdError(() => Userfaultfd.open({ features: 1n << 50n }), 'EINVAL')
  expect(err).toBeInstanceOf(UffdError)
  expect(err).toBeInstanceOf(Error)
})
