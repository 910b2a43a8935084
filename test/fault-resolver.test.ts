// FaultResolver: EEXIST is done, partial progress continues, EAGAIN while an event is pending is
// deferred and retried after the events are read: under a storm of REMOVE and REMAP events,
// every fault is still resolved exactly as asked.
import { describe, expect, it } from 'vitest'
import { whenReadable } from '../src/ipc/fd-passing'
import { Feature, FaultResolver, Mapping, PAGE_SIZE, Userfaultfd, type UffdEvent } from '../src/index'
import { madviseOnThread, mmapRaw, mremapOnThread, munmapOnThread, pages, touch } from '../src/testing'
import { stampedPage } from './helpers/events'
import { timeScale } from './helpers/children'

describe('FaultResolver', () => {
  it('treats EEXIST as done and continues partial progress', () => {
    const uffd = Userfaultfd.open()
    const m = Mapping.anonymous(4 * PAGE_SIZE)
    try {
      uffd.register(m)
      const resolver = new FaultResolver(uffd)
      uffd.zeropage(m.range(2 * PAGE_SIZE, PAGE_SIZE)) // a populated page in the middle
      const src = new Uint8Array(4 * PAGE_SIZE).fill(9)
      // Pages 0-1 are copied, page 2 exists (EAGAIN, bytes = 2 pages), the rest is retried: EEXIST.
      expect(resolver.copy(m.address, src)).toBe('exists')
      expect(resolver.copy(m.address, src.subarray(0, PAGE_SIZE))).toBe('exists')
      expect(resolver.zeropage(m.range(3 * PAGE_SIZE, PAGE_SIZE))).toBe('done')
      // Only now is every page present: reading them on this thread cannot fault.
      const out = new Uint8Array(4 * PAGE_SIZE)
      m.read(0, out)
      expect(out[0]).toBe(9)
      expect(out[PAGE_SIZE]).toBe(9)
      expect(out[2 * PAGE_SIZE]).toBe(0)
      expect(out[3 * PAGE_SIZE]).toBe(0)
      expect(resolver.pending).toBe(0)
      resolver.close()
    } finally {
      uffd.close()
      m.unmap()
    }
  })

  it('defers on EAGAIN while an event is unread, and retries after reading it', async () => {
    const uffd = Userfaultfd.open({ features: Feature.EVENT_REMOVE })
    const m = Mapping.anonymous(4 * PAGE_SIZE)
    try {
      m.write(3 * PAGE_SIZE, new Uint8Array(8).fill(1)) // populate page 3 before registering
      uffd.register(m)
      const resolver = new FaultResolver(uffd)
      const advised = madviseOnThread(m.range(3 * PAGE_SIZE, PAGE_SIZE), 'dontneed')
      // Wait until the REMOVE event is pending, unread (the uffd turns readable), however slowly
      // the native thread gets to run on a loaded machine.
      await new Promise<void>((resolve, reject) => {
        whenReadable(uffd.fd, (e) => (e ? reject(e) : resolve()))
      })
      expect(resolver.copy(m.address, stampedPage(42n))).toBe('deferred')
      expect(resolver.pending).toBe(1)
      await new Promise((r) => setTimeout(r, 20))
      expect(resolver.pending).toBe(1) // still blocked: retries cannot pass an unread event
      const events = uffd.read()
      expect(events).toEqual([{ type: 'remove', start: m.at(3 * PAGE_SIZE), end: m.address + BigInt(4 * PAGE_SIZE) }])
      expect(await advised).toBe(0)
      for (let i = 0; i < 100 && resolver.pending > 0; i++) await new Promise((r) => setTimeout(r, 5))
      expect(resolver.pending).toBe(0)
      expect(resolver.retries).toBeGreaterThan(0)
      const out = new BigUint64Array(1)
      m.read(0, out)
      expect(out[0]).toBe(42n)
      resolver.close()
    } finally {
      uffd.close()
      m.unmap()
    }
  })

  it(
    'loses no fault under a storm of MADV_DONTNEED and mremap events',
    async () => {
      const n = 4000
      const uffd = Userfaultfd.open({ features: Feature.EVENT_REMOVE | Feature.EVENT_REMAP | Feature.EVENT_UNMAP })
      const m = Mapping.anonymous(n * PAGE_SIZE)
      const stormPages = 16
      const storm = Mapping.anonymous(stormPages * PAGE_SIZE, { populate: true })
      const rawLength = 4 * PAGE_SIZE
      let raw = mmapRaw(rawLength)
      let rawSize = rawLength
      try {
        uffd.register(m)
        uffd.register(storm)
        uffd.register({ address: raw, length: rawLength })
        const resolver = new FaultResolver(uffd)
        let stop = false
        // Storms: each call blocks its thread until our reader reads the event, then goes again.
        const dontneed = (async () => {
          let count = 0
          while (!stop) {
            expect(await madviseOnThread(storm.range(), 'dontneed')).toBe(0)
            count++
          }
          return count
        })()
        const remap = (async () => {
          let count = 0
          while (!stop) {
            // Grow (moving when it cannot grow in place) and shrink back: a REMAP event each time
            // it moves. Never MREMAP_FIXED: the hole a move leaves may be reused by any allocation
            // of this process (a thread's stack, ASan's), and a fixed move back would unmap it.
            const grown = await mremapOnThread(raw, rawSize, rawSize === rawLength ? 2 * rawLength : rawLength)
            expect(grown.errno).toBe(0)
            raw = grown.address
            rawSize = rawSize === rawLength ? 2 * rawLength : rawLength
            count++
          }
          return count
        })()
        const order = pages(m)
        for (let i = order.length - 1; i > 0; i--) {
          const j = Math.floor(Math.random() * (i + 1))
          ;[order[i], order[j]] = [order[j], order[i]]
        }
        const toucher = touch(order, { threads: 2 })
        const served = new Map<bigint, number>()
        const kinds = new Map<string, number>()
        const page = new BigUint64Array(PAGE_SIZE / 8)
        let faults = 0
        const done = toucher.then((r) => {
          stop = true
          return r
        })
        const stream = uffd.events({ batch: true })
        // The storms end once the toucher is done; each needs its last event read to return, so
        // the stream runs until all three settled (or a safety timeout closes the uffd).
        const finished = Promise.all([done, dontneed, remap]).finally(() => stream.close())
        const timeout = setTimeout(() => uffd.close(), 15_000 * timeScale)
        for await (const batch of stream) {
          for (const e of batch as UffdEvent[]) {
            kinds.set(e.type, (kinds.get(e.type) ?? 0) + 1)
            if (e.type !== 'pagefault') continue
            if (e.address < m.address || e.address >= m.address + BigInt(m.length)) {
              // a storm page: serve zeros
              resolver.zeropage({ address: e.address & ~BigInt(PAGE_SIZE - 1), length: PAGE_SIZE })
              continue
            }
            served.set(e.address, (served.get(e.address) ?? 0) + 1)
            page[0] = e.address ^ 0x5555n
            resolver.copy(e.address, page) // `page` is reused at once: deferred copies keep their own
            faults++
          }
        }
        const [{ values }] = await finished
        expect(uffd.closed).toBe(false) // ended by the storms finishing, not by the safety timeout
        clearTimeout(timeout)
        const deferred = resolver.retries
        console.log(`events: ${[...kinds].map(([k, v]) => `${k}=${v}`).join(' ')}; deferred retries: ${deferred}`)
        expect(faults).toBe(n)
        expect([...served.values()].every((c) => c === 1)).toBe(true)
        // Every page holds its own stamp, deferred or not.
        for (let i = 0; i < n; i++)
          if (values[i] !== (order[i] ^ 0x5555n)) throw new Error(`page ${order[i]} read ${values[i]}`)
        expect(kinds.get('remove')).toBeGreaterThan(10)
        expect(kinds.get('remap')).toBeGreaterThan(0)
        // The point of the storm: some fills met a pending event and were retried, none lost.
        expect(deferred).toBeGreaterThan(0)
        resolver.close()
      } finally {
        uffd.close()
        m.unmap()
        storm.unmap()
        await munmapOnThread(raw, rawSize)
      }
    },
    60_000 * timeScale,
  )
})
