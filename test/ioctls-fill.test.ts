// UFFDIO_COPY and UFFDIO_ZEROPAGE: resolving faults raised by native threads, every source kind,
// EEXIST, ENOENT, partial progress (EAGAIN with bytes > 0), EAGAIN with bytes: 0 while an event
// is unread (all five fill ioctls), DONTWAKE, and ESRCH once the process owning the memory exited.
import { describe, expect, it } from 'vitest'
import { Feature, Mapping, PAGE_SIZE, Userfaultfd, receiveUffd, sendFds, socketPair } from '../src/index'
import { madviseOnThread, touch } from '../src/testing'
import { native } from '../src/addon/native'
import { stampedPage } from './helpers/events'
import { expectUffdError, lastJson, settlesWithin, spawnScript, useCleanup, waitEvents } from './helpers/uffd'
import { expectUnsupported, hasFeature } from './helpers/kernel'
import { timeScale } from './helpers/children'

const track = useCleanup()
const P = BigInt(PAGE_SIZE)

function setup(pages: number, features = 0n): { uffd: Userfaultfd; m: Mapping } {
  const uffd = track(Userfaultfd.open({ features }))
  const m = track(Mapping.anonymous(pages * PAGE_SIZE))
  uffd.register(m)
  return { uffd, m }
}

describe('copy()', () => {
  it('resolves a missing fault raised by a native thread and wakes it', { timeout: 10_000 * timeScale }, async () => {
    const { uffd, m } = setup(2)
    const reader = touch([m.at(PAGE_SIZE) + 8n])
    const [e] = await waitEvents(uffd)
    expect(e).toMatchObject({ type: 'pagefault', write: false, wp: false, minor: false })
    const page = new BigUint64Array(PAGE_SIZE / 8)
    page[1] = 0xfeedn
    expect(uffd.copy(m.at(PAGE_SIZE), page)).toBe(PAGE_SIZE)
    expect((await reader).values[0]).toBe(0xfeedn)
  })

  const sources: Array<[string, () => ArrayBuffer | SharedArrayBuffer | ArrayBufferView]> = [
    ['ArrayBuffer', () => new ArrayBuffer(PAGE_SIZE)],
    ['SharedArrayBuffer', () => new SharedArrayBuffer(PAGE_SIZE)],
    ['Uint8Array over a SharedArrayBuffer', () => new Uint8Array(new SharedArrayBuffer(PAGE_SIZE))],
    ['Float64Array', () => new Float64Array(PAGE_SIZE / 8)],
    ['BigInt64Array', () => new BigInt64Array(PAGE_SIZE / 8)],
    ['DataView', () => new DataView(new ArrayBuffer(PAGE_SIZE))],
    ['Buffer', () => Buffer.alloc(PAGE_SIZE)],
  ]
  for (const [name, make] of sources) {
    it(`copies from a ${name} (length defaults to its size)`, () => {
      const { uffd, m } = setup(1)
      const src = make()
      const bytes = ArrayBuffer.isView(src)
        ? new Uint8Array(src.buffer, src.byteOffset, src.byteLength)
        : new Uint8Array(src)
      bytes[0] = 0xab
      bytes[PAGE_SIZE - 1] = 0xcd
      expect(uffd.copy(m, src)).toBe(PAGE_SIZE)
      const out = new Uint8Array(m.buffer)
      expect([out[0], out[PAGE_SIZE - 1]]).toEqual([0xab, 0xcd])
    })
  }

  it("copies from a view's own bytes (byteOffset honoured), and length limits it", () => {
    const { uffd, m } = setup(2)
    const backing = new Uint8Array(3 * PAGE_SIZE)
    backing[PAGE_SIZE] = 1
    backing[2 * PAGE_SIZE] = 2
    expect(uffd.copy(m, backing.subarray(PAGE_SIZE), PAGE_SIZE)).toBe(PAGE_SIZE)
    expect(new Uint8Array(m.buffer)[0]).toBe(1)
    expect(() => uffd.copy(m.at(PAGE_SIZE), backing.subarray(PAGE_SIZE), 3 * PAGE_SIZE)).toThrow(
      /length 12288 exceeds src/,
    )
  })

  it('copies from another address or Mapping (length from the Mapping, or given)', () => {
    const { uffd, m } = setup(4)
    const src = track(Mapping.anonymous(2 * PAGE_SIZE))
    src.write(0, Buffer.from('page zero'))
    src.write(PAGE_SIZE, Buffer.from('page one'))
    expect(uffd.copy(m, src)).toBe(2 * PAGE_SIZE)
    expect(uffd.copy(m.at(2 * PAGE_SIZE), src.at(PAGE_SIZE), PAGE_SIZE)).toBe(PAGE_SIZE)
    expect(Buffer.from(m.buffer, 0, 9).toString()).toBe('page zero')
    expect(Buffer.from(m.buffer, 2 * PAGE_SIZE, 8).toString()).toBe('page one')
    expect(() => uffd.copy(m.at(3 * PAGE_SIZE), src.address)).toThrow(/length is required when src is an address/)
  })

  it('then EEXIST: the page is already there (bytes not set, errno 17)', () => {
    const { uffd, m } = setup(1)
    uffd.copy(m, new Uint8Array(PAGE_SIZE))
    const err = expectUffdError(() => uffd.copy(m, new Uint8Array(PAGE_SIZE)), 'EEXIST', {
      errno: 17,
      syscall: 'ioctl(UFFDIO_COPY)',
    })
    expect(err.bytes).toBeUndefined()
  })

  it('ENOENT outside a registered range', () => {
    const { uffd } = setup(1)
    const other = track(Mapping.anonymous(PAGE_SIZE))
    expectUffdError(() => uffd.copy(other, new Uint8Array(PAGE_SIZE)), 'ENOENT', {
      errno: 2,
      syscall: 'ioctl(UFFDIO_COPY)',
    })
    expectUffdError(() => uffd.zeropage(other), 'ENOENT', { syscall: 'ioctl(UFFDIO_ZEROPAGE)' })
  })

  it('ENOENT after unregister()', () => {
    const { uffd, m } = setup(2)
    uffd.unregister(m.range(PAGE_SIZE, PAGE_SIZE))
    expect(uffd.copy(m, new Uint8Array(PAGE_SIZE))).toBe(PAGE_SIZE)
    expectUffdError(() => uffd.copy(m.at(PAGE_SIZE), new Uint8Array(PAGE_SIZE)), 'ENOENT')
  })

  it('partial progress: EAGAIN with bytes > 0 when a later page exists; the caller continues', () => {
    const { uffd, m } = setup(4)
    uffd.copy(m.at(PAGE_SIZE), stampedPage(1n)) // page 1 already there
    const src = new BigUint64Array((4 * PAGE_SIZE) / 8)
    for (let i = 0; i < 4; i++) src[(i * PAGE_SIZE) / 8] = 100n + BigInt(i)
    const err = expectUffdError(() => uffd.copy(m, src), 'EAGAIN', {
      errno: 11,
      syscall: 'ioctl(UFFDIO_COPY)',
      bytes: PAGE_SIZE,
    })
    expect(err.bytes).toBe(PAGE_SIZE)
    // Continue after the bytes done: the next page is the existing one (EEXIST), then the rest.
    expectUffdError(() => uffd.copy(m.at(err.bytes!), new Uint8Array(src.buffer, err.bytes!), 3 * PAGE_SIZE), 'EEXIST')
    expect(uffd.copy(m.at(2 * PAGE_SIZE), new Uint8Array(src.buffer, 2 * PAGE_SIZE))).toBe(2 * PAGE_SIZE)
    const out = new BigUint64Array(m.buffer)
    expect([0, 1, 2, 3].map((i) => out[(i * PAGE_SIZE) / 8])).toEqual([100n, 1n, 102n, 103n])
  })

  it('wake: false (DONTWAKE) maps the page but leaves the faulter asleep until wake()', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const { uffd, m } = setup(1)
    const reader = touch([m.address])
    await waitEvents(uffd)
    uffd.copy(m, stampedPage(5n), undefined, { wake: false })
    expect(await settlesWithin(reader, 150)).toBe(false)
    uffd.wake(m)
    expect((await reader).values[0]).toBe(5n)
  })
})

describe('zeropage()', () => {
  it('resolves a fault with zeros, then EEXIST', { timeout: 10_000 * timeScale }, async () => {
    const { uffd, m } = setup(2)
    const reader = touch([m.at(PAGE_SIZE) + 16n])
    await waitEvents(uffd)
    expect(uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE))).toBe(PAGE_SIZE)
    expect((await reader).values[0]).toBe(0n)
    expectUffdError(() => uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE)), 'EEXIST', { syscall: 'ioctl(UFFDIO_ZEROPAGE)' })
    expectUffdError(() => uffd.copy(m.at(PAGE_SIZE), new Uint8Array(PAGE_SIZE)), 'EEXIST')
  })

  it('partial progress: EAGAIN with bytes > 0', () => {
    const { uffd, m } = setup(3)
    uffd.copy(m.at(2 * PAGE_SIZE), new Uint8Array(PAGE_SIZE))
    expectUffdError(() => uffd.zeropage(m), 'EAGAIN', { bytes: 2 * PAGE_SIZE })
  })

  it('wake: false leaves the faulter asleep until wake()', { timeout: 10_000 * timeScale }, async () => {
    const { uffd, m } = setup(1)
    const reader = touch([m.address])
    await waitEvents(uffd)
    expect(uffd.zeropage(m, { wake: false })).toBe(PAGE_SIZE)
    expect(await settlesWithin(reader, 150)).toBe(false)
    uffd.wake(m)
    expect((await reader).values[0]).toBe(0n)
  })
})

describe('EAGAIN with bytes: 0 while an event is unread (mmap_changing)', () => {
  it('all five fill ioctls refuse until the REMOVE event is read, then work', {
    timeout: 15_000 * timeScale,
  }, async () => {
    // POISON (6.6) and MOVE (6.8) where the kernel has them; before, they are refused by name.
    const poison = hasFeature('POISON')
    const move = hasFeature('MOVE')
    const features =
      Feature.EVENT_REMOVE | Feature.MINOR_SHMEM | (poison ? Feature.POISON : 0n) | (move ? Feature.MOVE : 0n)
    const uffd = track(Userfaultfd.open({ features }))
    const m = track(Mapping.anonymous(8 * PAGE_SIZE, { populate: true }))
    const shm = track(Mapping.memfd(PAGE_SIZE))
    shm.write(0, stampedPage(3n))
    const view = track(shm.alias())
    const src = track(Mapping.anonymous(PAGE_SIZE))
    src.write(0, stampedPage(4n))
    uffd.register(m)
    uffd.register(view, { minor: true })
    // MADV_DONTNEED from a native thread: the REMOVE event blocks it until read.
    const advised = madviseOnThread(m.range(0, 4 * PAGE_SIZE), 'dontneed')
    expect(await settlesWithin(advised, 100)).toBe(false)

    const calls: Array<[string, () => unknown]> = [
      ['COPY', () => uffd.copy(m, new Uint8Array(PAGE_SIZE))],
      ['ZEROPAGE', () => uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE))],
      ['CONTINUE', () => uffd.continue(view)],
      ['POISON', () => uffd.poison(m.range(2 * PAGE_SIZE, PAGE_SIZE))],
      ['MOVE', () => uffd.move(m.at(3 * PAGE_SIZE), src, PAGE_SIZE)],
    ]
    for (const [name, call] of calls) {
      if ((name === 'POISON' && !poison) || (name === 'MOVE' && !move)) {
        expectUnsupported(call, name)
        continue
      }
      const err = expectUffdError(call, 'EAGAIN', { syscall: `ioctl(UFFDIO_${name})`, bytes: 0 })
      expect(err.bytes).toBe(0)
    }
    const events = await waitEvents(uffd)
    expect(events).toEqual([{ type: 'remove', start: m.address, end: m.at(4 * PAGE_SIZE) }])
    expect(await advised).toBe(0)
    // The event is read: the same calls now succeed.
    expect(uffd.copy(m, new Uint8Array(PAGE_SIZE))).toBe(PAGE_SIZE)
    expect(uffd.zeropage(m.range(PAGE_SIZE, PAGE_SIZE))).toBe(PAGE_SIZE)
    expect(uffd.continue(view)).toBe(PAGE_SIZE)
    if (poison) expect(uffd.poison(m.range(2 * PAGE_SIZE, PAGE_SIZE))).toBe(PAGE_SIZE)
    if (move) {
      expect(uffd.move(m.at(3 * PAGE_SIZE), src, PAGE_SIZE)).toBe(PAGE_SIZE)
      expect(new BigUint64Array(m.buffer, 3 * PAGE_SIZE, 1)[0]).toBe(4n)
    }
    expect(new BigUint64Array(view.buffer, 0, 1)[0]).toBe(3n)
  })
})

describe('ESRCH: the process that owns the memory has exited', () => {
  it('a child sends its uffd, we fill its memory while it lives, then ESRCH', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const [ours, theirs] = socketPair()
    track({ close: () => native.close(ours) })
    const child = spawnScript(
      `
      (async () => {
        const u = uffd.Userfaultfd.open({ features: uffd.Feature.MINOR_SHMEM })
        const m = uffd.Mapping.anonymous(4 * uffd.PAGE_SIZE)
        u.register(m)
        const shm = uffd.Mapping.memfd(uffd.PAGE_SIZE)
        u.register(shm, { minor: true })
        await uffd.sendUffd(3, u, JSON.stringify({ address: m.address.toString(), shm: shm.address.toString() }))
        await uffd.receiveFds(3, { maxFds: 0 })          // the parent filled page 0
        const out = new BigUint64Array(1)
        m.read(0, out)                                   // resident now: no fault on this thread
        console.log(JSON.stringify({ stamp: out[0].toString() }))
      })().catch((e) => { console.error(e); process.exit(1) })`,
      theirs,
    )
    native.close(theirs)
    const { uffd: theirUffd, data } = await receiveUffd(ours)
    track(theirUffd)
    const meta = JSON.parse(data.toString()) as { address: string; shm: string }
    const address = BigInt(meta.address)
    expect(theirUffd.copy(address, stampedPage(0xc0ffeen))).toBe(PAGE_SIZE)
    await sendFds(ours, 'go', [])
    const r = await child
    expect(r.code, r.stderr).toBe(0)
    expect(lastJson(r)).toEqual({ stamp: String(0xc0ffeen) })
    // Its address space is gone: every fill ioctl reports ESRCH.
    expectUffdError(() => theirUffd.copy(address + P, stampedPage(1n)), 'ESRCH', {
      errno: 3,
      syscall: 'ioctl(UFFDIO_COPY)',
    })
    expectUffdError(() => theirUffd.zeropage({ address: address + P, length: PAGE_SIZE }), 'ESRCH', {
      syscall: 'ioctl(UFFDIO_ZEROPAGE)',
    })
    expectUffdError(() => theirUffd.continue({ address: BigInt(meta.shm), length: PAGE_SIZE }), 'ESRCH', {
      syscall: 'ioctl(UFFDIO_CONTINUE)',
    })
    const poison = (): number => theirUffd.poison({ address: address + P, length: PAGE_SIZE })
    if (hasFeature('POISON')) expectUffdError(poison, 'ESRCH', { syscall: 'ioctl(UFFDIO_POISON)' })
    else expectUnsupported(poison, 'POISON') // before 6.6
  })
})
