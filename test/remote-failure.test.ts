// Remote sources when things go wrong: the server dies mid-restore, returns EIO (nbdkit's error
// filter), the HTTP object changes, a chunk does not match the integrity manifest. Each time: a
// clear 'error' (with the faulting address), retries, the thread left waiting (never a wrong
// page, never a silent hang), and served right once the source recovers.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { Manifest, PAGE_SIZE, SourceError } from '../src/index'
import { parseNbdUrl } from '../src/sources/nbd'
import { touch } from '../src/testing'
import { closeAll, setup, until, within } from './helpers/fault-server'
import { missing, startNbdkit, startNginx, stopServers, tempDir } from './helpers/servers'
import { snapshot } from './helpers/snapshots'

afterEach((ctx) => closeAll(ctx))
afterAll(stopServers)

const MiB = 1024 * 1024

/** Settles to 'pending' if `p` has not settled within ms. */
async function pendingAfter<T>(p: Promise<T>, ms: number): Promise<'pending' | 'settled'> {
  let settled = false
  p.then(
    () => {
      settled = true
    },
    () => {
      settled = true
    },
  )
  await new Promise((r) => setTimeout(r, ms))
  return settled ? 'settled' : 'pending'
}

function sourceErrors(errors: Error[], code?: string): SourceError[] {
  return errors.filter((e): e is SourceError => e instanceof SourceError && (code === undefined || e.code === code))
}

describe.skipIf(missing('nbdkit'))('NBD failures', () => {
  it('server killed mid-restore: errors with the address, the thread waits, then served once it is back', async () => {
    const { file, bytes } = snapshot(4 * MiB)
    const srv = await startNbdkit(file)
    const { m, server, errors } = setup(1024)
    server.serve(m, { nbd: srv.url, attempts: 2 })
    expect((await within(touch([m.address]), 10_000, 'first touch')).values[0]).toBe(1n)
    srv.kill()
    await new Promise((r) => setTimeout(r, 50))
    const page = 700
    const waiting = touch([m.address + BigInt(page * PAGE_SIZE)])
    await until(() => sourceErrors(errors).length >= 2, 10_000, 'errors')
    expect(await pendingAfter(waiting, 200)).toBe('pending')
    const e = sourceErrors(errors)[0] as SourceError & { address?: bigint }
    expect(['ECONNRESET', 'ECONNREFUSED']).toContain(e.code)
    expect(e.retryable).toBe(true)
    expect(e.address).toBe(m.address + BigInt(page * PAGE_SIZE))
    expect(server.stats().sourceWaiting).toBe(1)
    // back on the same socket
    const sock = parseNbdUrl(srv.url).socket!
    const again = await startNbdkit(file)
    fs.rmSync(sock, { force: true })
    fs.renameSync(parseNbdUrl(again.url).socket!, sock)
    const { values } = await within(waiting, 15_000, 'touch after the server came back')
    expect(values[0]).toBe(BigInt(page + 1))
    expect(bytes.readBigUInt64LE(page * PAGE_SIZE)).toBe(values[0])
    expect(server.stats().sourceWaiting).toBe(0)
  })

  it('EIO from the server: reported and retried until it reads again', async () => {
    const { file } = snapshot(2 * MiB)
    const trigger = path.join(tempDir(), 'inject')
    fs.writeFileSync(trigger, '')
    const srv = await startNbdkit(file, {
      filters: ['error'],
      params: ['error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`],
    })
    const { m, server, errors } = setup(512)
    server.serve(m, { nbd: srv.url, attempts: 2 })
    const waiting = touch([m.address + BigInt(33 * PAGE_SIZE)])
    await until(() => sourceErrors(errors, 'EIO').length >= 2, 10_000, 'EIO errors')
    expect(await pendingAfter(waiting, 100)).toBe('pending')
    expect(sourceErrors(errors, 'EIO')[0].errno).toBe(5)
    fs.unlinkSync(trigger)
    expect((await within(waiting, 15_000, 'touch after recovery')).values[0]).toBe(34n)
  })

  it('a chunk that does not match the manifest is never installed; the other chunks are served', async () => {
    const { file, bytes } = snapshot(MiB)
    const manifestFile = path.join(tempDir(), 'manifest.json')
    const manifest = await Manifest.ofFile(file, 64 * 1024)
    fs.writeFileSync(manifestFile, JSON.stringify(manifest))
    // the server's copy has one corrupted byte in chunk 3 (pages 48..63)
    const bad = Buffer.from(bytes)
    bad[3 * 64 * 1024 + 5000] ^= 0x40
    const badFile = path.join(tempDir(), 'bad.mem')
    fs.writeFileSync(badFile, bad)
    const srv = await startNbdkit(badFile)
    const { m, server, errors, uffd } = setup(256)
    server.serve(m, { nbd: srv.url, manifest: manifestFile, attempts: 1 })
    expect((await within(touch([m.address + BigInt(10 * PAGE_SIZE)]), 10_000, 'good chunk')).values[0]).toBe(11n)
    const waiting = touch([m.address + BigInt(50 * PAGE_SIZE)])
    await until(() => sourceErrors(errors, 'EBADMSG').length >= 2, 10_000, 'integrity errors')
    const e = sourceErrors(errors, 'EBADMSG')[0]
    expect(e.message).toMatch(/chunk 3 .* does not match the manifest/)
    expect(await pendingAfter(waiting, 100)).toBe('pending')
    // the corrupted page never reaches memory: closing the uffd lets the kernel give the
    // waiting thread a zero page instead
    server.close()
    uffd.close()
    expect((await within(waiting, 10_000, 'touch after close')).values[0]).toBe(0n)
  })
})

describe.skipIf(missing('nginx'))('HTTP failures', () => {
  it('the object changes mid-restore: ESTALE errors, and never a page of the new object', async () => {
    const { file, dir } = snapshot(MiB)
    const srv = await startNginx(dir)
    const { m, server, errors, uffd } = setup(256)
    server.serve(m, { url: `${srv.url}/snap.mem`, attempts: 1 })
    expect((await within(touch([m.address]), 10_000, 'first touch')).values[0]).toBe(1n)
    const next = crypto.randomBytes(MiB)
    for (let p = 0; p < 256; p++) next.writeBigUInt64LE(BigInt(1000 + p), p * PAGE_SIZE)
    fs.writeFileSync(file, next)
    fs.utimesSync(file, new Date(), new Date(Date.now() + 10_000))
    const waiting = touch([m.address + BigInt(100 * PAGE_SIZE)])
    await until(() => sourceErrors(errors, 'ESTALE').length >= 1, 10_000, 'ESTALE error')
    expect(sourceErrors(errors, 'ESTALE')[0].retryable).toBe(false)
    expect(await pendingAfter(waiting, 100)).toBe('pending')
    server.close()
    uffd.close()
    expect((await within(waiting, 10_000, 'touch after close')).values[0]).toBe(0n) // not 1100
  })

  it('the server stops and comes back on its port: served after errors', async () => {
    const { dir } = snapshot(MiB)
    const srv = await startNginx(dir)
    const { m, server, errors } = setup(256)
    server.serve(m, { url: `${srv.url}/snap.mem`, attempts: 2 })
    expect((await within(touch([m.address]), 10_000, 'first touch')).values[0]).toBe(1n)
    await srv.stop()
    const waiting = touch([m.address + BigInt(77 * PAGE_SIZE)])
    await until(() => sourceErrors(errors, 'ECONNREFUSED').length >= 1, 10_000, 'errors')
    expect(await pendingAfter(waiting, 100)).toBe('pending')
    await startNginx(dir, { port: Number(new URL(srv.url).port) })
    expect((await within(waiting, 15_000, 'touch after restart')).values[0]).toBe(78n)
  })
})
