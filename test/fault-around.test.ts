// Adaptive fault-around (the default): windows that grow for sequential readers (one or several
// streams per range) and stay at one page for random access; a byte count still fixes it.
import { afterEach, describe, expect, it } from 'vitest'
import { PAGE_SIZE } from '../src/index'
import { pages, touch } from '../src/testing'
import { closeAll, randomContent, setup, u64At, until, within } from './helpers/fault-server'

afterEach((ctx) => closeAll(ctx))

const MiB = 1024 * 1024

function check(values: BigUint64Array, addrs: BigUint64Array, base: bigint, src: Uint8Array): void {
  for (let i = 0; i < addrs.length; i++) expect(values[i]).toBe(u64At(src, Number(addrs[i] - base)))
}

describe('adaptive fault-around', () => {
  it('grows the window for a sequential reader: few faults', async () => {
    const n = (32 * MiB) / PAGE_SIZE
    const { m, server, errors } = setup(n)
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    const addrs = pages(m)
    const { values } = await within(touch(addrs, { threads: 1 }), 15_000, 'touch')
    check(values, addrs, m.address, src)
    const s = server.stats()
    // 1, 2, 4 ... 512 pages (2 MiB), then 2 MiB windows: about 10 + 16 faults for 32 MiB
    expect(s.faults).toBeLessThan(64)
    expect(s.demandPages).toBe(n)
    expect(errors).toEqual([])
  })

  it('follows several sequential streams in one range (one per thread)', async () => {
    const n = (32 * MiB) / PAGE_SIZE
    const threads = 4
    const { m, server } = setup(n)
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    // thread t reads quarter t in order (touch() deals addresses round-robin)
    const per = n / threads
    const addrs = new BigUint64Array(n)
    for (let k = 0; k < per; k++)
      for (let t = 0; t < threads; t++) addrs[k * threads + t] = m.address + BigInt((t * per + k) * PAGE_SIZE)
    const { values } = await within(touch(addrs, { threads }), 15_000, 'touch')
    check(values, addrs, m.address, src)
    expect(server.stats().faults).toBeLessThan(threads * 64)
  })

  it('installs only what random access touches', async () => {
    const n = (64 * MiB) / PAGE_SIZE
    const { m, server } = setup(n)
    const src = randomContent(n * PAGE_SIZE)
    server.serve(m, { buffer: src })
    // a random 10% of the pages, in random order
    const picked = new Set<number>()
    while (picked.size < n / 10) picked.add(Math.floor(Math.random() * n))
    const addrs = BigUint64Array.from([...picked].map((p) => m.address + BigInt(p * PAGE_SIZE)))
    const { values } = await within(touch(addrs, { threads: 2 }), 15_000, 'touch')
    check(values, addrs, m.address, src)
    const s = server.stats()
    expect(s.demandPages).toBeLessThanOrEqual(2 * picked.size)
    expect(s.faults).toBeGreaterThanOrEqual(picked.size * 0.9)
  })

  it('a byte count still fixes an aligned window', async () => {
    const { m, server } = setup(256)
    const src = randomContent(256 * PAGE_SIZE)
    server.serve(m, { buffer: src }, { faultAround: 16 * PAGE_SIZE })
    await touch([m.address + BigInt(20 * PAGE_SIZE)])
    await until(() => server.stats().demandPages >= 16, 5000, 'window')
    expect(server.stats().demandPages).toBe(16) // pages 16..31
  })

  it('refuses bad fault-around options', () => {
    const { m, server } = setup(16)
    expect(() => server.serve(m, { zero: true }, { faultAround: 'big' as never })).toThrow(TypeError)
    expect(() => server.serve(m, { zero: true }, { faultAround: 3 * PAGE_SIZE })).toThrow(RangeError)
    server.serve(m, { zero: true }, { faultAround: 'adaptive' })
  })
})
