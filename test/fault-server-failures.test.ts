// Fail closed: a source that cannot give a page (a file truncated, a handler that keeps failing)
// meets the range's onSourceError. Each policy is tested with a child process (a guest, whose
// uffd this process serves) that touches such a page: it gets SIGBUS ('poison'), zeros ('zero'),
// or its page once the source recovers ('retry'); past retryDeadlineMs, afterDeadline. Never a
// hang; an 'error' event every time, with the address, the cause and the action.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import {
  FaultServer,
  type FaultServerError,
  type FaultSource,
  IoctlBit,
  Mapping,
  PAGE_SIZE,
  UnsupportedError,
  type UffdError,
  Userfaultfd,
} from '../src/index'
import { killChildren } from './helpers/children'
import { closeAll, onCleanup, randomContent, track, until } from './helpers/fault-server'
import { type Guest, guestValues, startGuest } from './helpers/guest'
import { missing, startNbdkit } from './helpers/servers'

afterEach((ctx) => {
  killChildren()
  closeAll(ctx)
})

const PAGES = 8
// UFFDIO_POISON (Linux 6.6): a registered range's ioctls say whether this kernel has it.
const poisonSupported = ((): boolean => {
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(PAGE_SIZE)
  try {
    return (uffd.register(m) & IoctlBit.POISON) !== 0n
  } finally {
    uffd.close()
    m.unmap()
  }
})()

/** A snapshot file of PAGES pages that shrinks to nothing once served: every read of it fails. */
function vanishingFile(): { file: string; content: Uint8Array; restore: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-fail-'))
  onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'snapshot.bin')
  const content = randomContent(PAGES * PAGE_SIZE)
  fs.writeFileSync(file, content)
  return { file, content, restore: () => fs.writeFileSync(file, content) }
}

/** A guest served by a new FaultServer from `source` with `options`; its errors collected. */
async function served(
  source: FaultSource,
  options: Parameters<FaultServer['serve']>[2],
  serverOptions: ConstructorParameters<typeof FaultServer>[1] = {},
): Promise<{ guest: Guest; server: FaultServer; errors: FaultServerError[] }> {
  const guest = await startGuest({ length: PAGES * PAGE_SIZE })
  track(guest.uffd)
  const server = track(new FaultServer(guest.uffd, { faultAround: PAGE_SIZE, ...serverOptions }))
  const errors: FaultServerError[] = []
  server.on('error', (e) => errors.push(e))
  server.serve({ address: guest.address, length: guest.length }, source, options)
  return { guest, server, errors }
}

describe('onSourceError', () => {
  it("'poison': the guest touching a page its source cannot give gets SIGBUS", async (ctx) => {
    if (!poisonSupported) ctx.skip('no UFFDIO_POISON here (its refusal is tested below)')
    const { file } = vanishingFile()
    const { guest, server, errors } = await served({ file }, { onSourceError: 'poison' })
    fs.truncateSync(file, 0) // the source vanishes: its mapping reads as SIGBUS, a copy from it EFAULT
    await guest.go([3])
    const r = await guest.result
    expect(r.signal, r.stderr).toBe('SIGBUS')
    expect(errors).toHaveLength(1)
    expect(errors[0]).toMatchObject({
      name: 'UffdError',
      code: 'EFAULT',
      syscall: 'ioctl(UFFDIO_COPY)',
      action: 'poison',
      address: guest.address + BigInt(3 * PAGE_SIZE),
    })
    expect(errors[0].cause).toMatchObject({ code: 'EFAULT' })
    await until(() => server.stats().poisonedPages === 1, 5000, 'poison counted')
    expect(server.stats().ranges[0].pages.poisoned).toBe(1)
  })

  it("'zero': the guest reads zeros", async () => {
    const { file } = vanishingFile()
    const { guest, errors } = await served({ file, readMethod: 'pread' }, { onSourceError: 'zero' })
    fs.truncateSync(file, 0) // pread finds nothing where bytes were: EIO (a short read)
    await guest.go([1, 2])
    const r = await guest.result
    expect(r.code, r.stderr).toBe(0)
    expect(guestValues(r)).toEqual([0n, 0n])
    expect(errors.map((e) => [(e as UffdError).code, (e as UffdError).syscall, e.action])).toEqual([
      ['EIO', 'pread', 'zero'],
      ['EIO', 'pread', 'zero'],
    ])
  })

  it("'retry' (the default): the guest waits, errors keep coming, and it gets its page once the source recovers", async () => {
    const { file, content, restore } = vanishingFile()
    const { guest, errors } = await served({ file, readMethod: 'pread' }, {})
    fs.truncateSync(file, 0)
    await guest.go([5])
    await until(() => errors.length >= 3, 10_000, 'three failed attempts')
    expect(errors.every((e) => e.action === 'retry' && e.address === guest.address + BigInt(5 * PAGE_SIZE))).toBe(true)
    expect(errors.slice(0, 3).map((e) => e.retryInMs)).toEqual([10, 20, 40]) // backing off
    restore()
    const r = await guest.result
    expect(r.code, r.stderr).toBe(0)
    expect(guestValues(r)).toEqual([new DataView(content.buffer).getBigUint64(5 * PAGE_SIZE, true)])
  })

  it("'retry' with retryDeadlineMs: past the deadline, afterDeadline ('poison' by default, or 'zero')", async (ctx) => {
    const { file } = vanishingFile()
    if (poisonSupported) {
      const { guest, errors } = await served({ file, readMethod: 'pread' }, { retryDeadlineMs: 150 })
      fs.truncateSync(file, 0)
      const t0 = Date.now()
      await guest.go([0])
      const r = await guest.result
      expect(r.signal, r.stderr).toBe('SIGBUS')
      expect(Date.now() - t0).toBeGreaterThanOrEqual(150)
      expect(errors.length).toBeGreaterThanOrEqual(2)
      expect(errors.slice(0, -1).every((e) => e.action === 'retry')).toBe(true)
      expect(errors[errors.length - 1].action).toBe('poison')
    } else {
      // Without UFFDIO_POISON the default afterDeadline cannot be honoured: refused up front.
      await expect(served({ file }, { retryDeadlineMs: 150 })).rejects.toBeInstanceOf(UnsupportedError)
    }
    const other = vanishingFile()
    const { guest, errors } = await served(
      { file: other.file, readMethod: 'pread' },
      { retryDeadlineMs: 100, afterDeadline: 'zero' },
    )
    fs.truncateSync(other.file, 0)
    await guest.go([2])
    const r = await guest.result
    expect(r.code, r.stderr).toBe(0)
    expect(guestValues(r)).toEqual([0n])
    expect(errors[errors.length - 1].action).toBe('zero')
    if (!poisonSupported) ctx.skip('afterDeadline poison: refusal asserted (no UFFDIO_POISON here)')
  })

  it('a { handler } that keeps failing: poison, zero, and retry until it answers', async (ctx) => {
    const failing: FaultSource = {
      handler: () => {
        throw new Error('remote is gone')
      },
    }
    const zero = await served(failing, { onSourceError: 'zero' }, { faultAround: 4 * PAGE_SIZE })
    await zero.guest.go([4, 5])
    const rz = await zero.guest.result
    expect(rz.code, rz.stderr).toBe(0)
    expect(guestValues(rz)).toEqual([0n, 0n])
    expect(zero.errors[0]).toMatchObject({ action: 'zero', address: zero.guest.address + BigInt(4 * PAGE_SIZE) })
    expect((zero.errors[0].cause as Error).message).toBe('remote is gone')

    let calls = 0
    const content = randomContent(PAGES * PAGE_SIZE)
    const flaky: FaultSource = {
      handler: ({ offset, length }) => {
        if (++calls <= 2) return Promise.reject(new Error('timed out'))
        return content.slice(offset, offset + length)
      },
    }
    const retry = await served(flaky, {})
    await retry.guest.go([6])
    const rr = await retry.guest.result
    expect(rr.code, rr.stderr).toBe(0)
    expect(guestValues(rr)).toEqual([7n])
    expect(retry.errors.map((e) => e.action)).toEqual(['retry', 'retry'])

    if (!poisonSupported) {
      await expect(served(failing, { onSourceError: 'poison' })).rejects.toMatchObject({
        name: 'UnsupportedError',
        feature: 'POISON',
        message: expect.stringMatching(/Linux 6\.6/),
      })
      ctx.skip('handler poison: refusal asserted (no UFFDIO_POISON here)')
    }
    const poison = await served(failing, { onSourceError: 'poison' })
    await poison.guest.go([7])
    const rp = await poison.guest.result
    expect(rp.signal, rp.stderr).toBe('SIGBUS')
    expect(poison.errors[0]).toMatchObject({ action: 'poison' })
  })

  it.skipIf(missing('nbdkit'))(
    'a remote (NBD) source whose reads fail (EIO): zero, retry until a deadline, poison',
    async (ctx) => {
      const content = randomContent(PAGES * PAGE_SIZE)
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-nbd-'))
      onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
      const file = path.join(dir, 'snapshot.bin')
      fs.writeFileSync(file, content)
      const srv = await startNbdkit(file, { filters: ['error'], params: ['error=EIO', 'error-pread-rate=100%'] })
      onCleanup(() => srv.stop())
      const nbd = { nbd: srv.url, attempts: 1 } // the store's own retries off: the policy's turn at once

      const zero = await served(nbd, { onSourceError: 'zero' })
      await zero.guest.go([2])
      const rz = await zero.guest.result
      expect(rz.code, rz.stderr).toBe(0)
      expect(guestValues(rz)).toEqual([0n])
      const ez = zero.errors.find((e) => e.action === 'zero')
      // the source's own error (a SourceError), with the address and the action
      expect(ez).toMatchObject({
        name: 'SourceError',
        code: 'EIO',
        syscall: 'NBD_CMD_READ',
        location: expect.stringMatching(/^nbd\+unix:/),
        address: zero.guest.address + BigInt(2 * PAGE_SIZE),
      })

      const late = await served(nbd, { retryDeadlineMs: 300, afterDeadline: 'zero' })
      await late.guest.go([3])
      const rl = await late.guest.result
      expect(rl.code, rl.stderr).toBe(0)
      expect(guestValues(rl)).toEqual([0n])
      const actions = late.errors.map((e) => e.action)
      expect(actions[0]).toBe('retry')
      expect(actions.at(-1)).toBe('zero')

      if (!poisonSupported) ctx.skip('remote poison: no UFFDIO_POISON here (its refusal is tested below)')
      const poison = await served(nbd, { onSourceError: 'poison' })
      await poison.guest.go([4])
      const rp = await poison.guest.result
      expect(rp.signal, rp.stderr).toBe('SIGBUS')
      expect(poison.errors.find((e) => e.action === 'poison')).toMatchObject({ code: 'EIO' })
      expect(poison.server.stats().poisonedPages).toBeGreaterThanOrEqual(1)
    },
    30_000,
  )

  it('prefetch failures are reported (no thread waits there: action none); a fault there meets the policy', async () => {
    // A handler that fails everything: deterministic, where a file truncated under a running
    // prefetch raced with it (the prefetch could finish first).
    const source: FaultSource = {
      handler: ({ prefetch }) => {
        throw new Error(prefetch ? 'prefetch failed' : 'demand failed')
      },
    }
    const { guest, errors } = await served(source, { onSourceError: 'zero', prefetch: true })
    await until(() => errors.length > 0, 5000, 'the prefetch failure')
    expect(errors[0]).toMatchObject({ action: 'none' })
    expect((errors[0].cause as Error).message).toBe('prefetch failed')
    await guest.go([0])
    const r = await guest.result
    expect(r.code, r.stderr).toBe(0)
    expect(guestValues(r)).toEqual([0n]) // the demand fault met the policy
    const demand = errors.find((e) => (e.cause as Error).message === 'demand failed')
    expect(demand).toMatchObject({ action: 'zero', address: guest.address })
  })

  it('bad policies are TypeErrors; without UFFDIO_POISON, poison is an UnsupportedError naming it', async () => {
    const uffd = track(Userfaultfd.open())
    const server = track(new FaultServer(uffd))
    const m = track(Mapping.anonymous(PAGE_SIZE))
    expect(() => server.serve(m, { zero: true }, { onSourceError: 'ignore' as 'zero' })).toThrow(TypeError)
    expect(() => server.serve(m, { zero: true }, { afterDeadline: 'retry' as 'zero' })).toThrow(TypeError)
    expect(() => server.serve(m, { zero: true }, { retryDeadlineMs: -1 })).toThrow(RangeError)
    expect(() => new FaultServer(track(Userfaultfd.open()), { onSourceError: 'skip' as 'zero' })).toThrow(TypeError)
    if (poisonSupported) {
      server.serve(m, { zero: true }, { onSourceError: 'poison' })
    } else {
      expect(() => server.serve(m, { zero: true }, { onSourceError: 'poison' })).toThrow(
        expect.objectContaining({ name: 'UnsupportedError', code: 'ENOTSUP', message: expect.stringMatching(/6\.6/) }),
      )
    }
  })
})
