// A JS handler under load: 100 000 faults from 2 native threads, none lost, none served twice.
import { describe, expect, it } from 'vitest'
import { Mapping, PAGE_SIZE, Userfaultfd, type UffdEvent } from '../../src/index'
import { pages, touch } from '../../src/testing'
import { timeScale } from '../helpers/children'

describe('JS handler under load', () => {
  it(
    'resolves 100 000 faults from 2 threads exactly once each, in batches',
    async () => {
      const n = 100_000
      const uffd = Userfaultfd.open()
      const m = Mapping.anonymous(n * PAGE_SIZE)
      try {
        uffd.register(m)
        const addresses = pages(m)
        const toucher = touch(addresses, { threads: 2 })
        const served = new Uint8Array(n)
        const page = new BigUint64Array(PAGE_SIZE / 8)
        const batchSizes = new Map<number, number>()
        let seen = 0
        for await (const batch of uffd.events({ batch: true })) {
          const list = batch as UffdEvent[]
          batchSizes.set(list.length, (batchSizes.get(list.length) ?? 0) + 1)
          for (const e of list) {
            if (e.type !== 'pagefault') throw new Error(`unexpected ${e.type}`)
            const index = Number((e.address - m.address) / BigInt(PAGE_SIZE))
            served[index]++
            page[0] = BigInt(index) * 3n + 1n
            uffd.copy(e.address & ~BigInt(PAGE_SIZE - 1), page)
            seen++
          }
          if (seen === n) break
        }
        const { values } = await toucher
        expect(seen).toBe(n)
        expect(served.every((c) => c === 1)).toBe(true)
        for (let i = 0; i < n; i++)
          if (values[i] !== BigInt(i) * 3n + 1n) throw new Error(`page ${i} read ${values[i]}`)
        const largest = Math.max(...batchSizes.keys())
        console.log(
          `batch sizes seen: ${[...batchSizes.entries()]
            .sort((a, b) => a[0] - b[0])
            .map(([k, v]) => `${k}x${v}`)
            .join(' ')}`,
        )
        expect(largest).toBeGreaterThan(1)
      } finally {
        uffd.close()
        m.unmap()
      }
    },
    60_000 * timeScale,
  ) // ~1 s natively; minutes under arm64 emulation (USERFAULTFD_TEST_TIME_SCALE)
})
