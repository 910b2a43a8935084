// The FaultServer on huge pages: MAP_HUGETLB anonymous memory and MFD_HUGETLB memfds (hugetlbfs),
// every source kind, served in whole 2 MiB pages (UFFDIO_COPY; no ZEROPAGE there, so zeros are
// copied). Faults come from native threads. Each test stays within 16 huge pages (32 MiB): CI
// reserves 64 (.ci/run). Only where none are reserved do these tests skip, saying why.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { FaultServer, Feature, Mapping, PAGE_SIZE, Userfaultfd, hugePageSize } from '../src/index'
import { madviseOnThread, touch } from '../src/testing'
import { closeAll, onCleanup, randomContent, track, u64At, until, within } from './helpers/fault-server'
import { hugePagesMissing } from './helpers/uffd'

const H = hugePageSize()
const HB = BigInt(H)

beforeEach((ctx) => {
  const why = hugePagesMissing()
  if (why !== undefined) {
    console.warn(`FaultServer hugetlb test skipped: ${why}`)
    ctx.skip(why)
  }
})
afterEach((ctx) => closeAll(ctx))

type Kind = 'MAP_HUGETLB' | 'MFD_HUGETLB'

function hugeSetup(
  kind: Kind,
  hugePages: number,
  options: ConstructorParameters<typeof FaultServer>[1] = {},
  features = 0n,
): { uffd: Userfaultfd; m: Mapping; server: FaultServer; errors: Error[] } {
  const m = track(
    kind === 'MAP_HUGETLB'
      ? Mapping.anonymous(hugePages * H, { hugetlb: true })
      : Mapping.memfd(hugePages * H, { hugetlb: true, name: 'fault-server-huge' }),
  )
  const uffd = track(Userfaultfd.open({ features: features | Feature.MISSING_HUGETLBFS }))
  const server = track(new FaultServer(uffd, options))
  const errors: Error[] = []
  server.on('error', (e) => errors.push(e))
  return { uffd, m, server, errors }
}

/** Addresses spread over every huge page: `perPage` offsets in each, in a shuffled order. */
function hugeAddresses(m: Mapping, perPage: number): bigint[] {
  const out: bigint[] = []
  for (let p = 0; p < m.length / H; p++)
    for (let k = 0; k < perPage; k++) out.push(m.address + BigInt(p) * HB + BigInt(((k * 997 + p * 131) % (H / 8)) * 8))
  for (let i = out.length - 1; i > 0; i--) {
    const j = (i * 7919) % (i + 1)
    ;[out[i], out[j]] = [out[j], out[i]]
  }
  return out
}

/** Touches `addresses` from 2 native threads and checks every u64 against `expected`. */
async function touchAndCheck(m: Mapping, expected: Uint8Array, addresses: bigint[]): Promise<void> {
  const { values } = await within(touch(addresses, { threads: 2 }), 10_000, 'touch')
  for (let i = 0; i < addresses.length; i++) {
    const at = Number(addresses[i] - m.address)
    if (values[i] !== u64At(expected, at)) expect(`${values[i]} at ${at}`).toBe(`${u64At(expected, at)} at ${at}`)
  }
}

function tmpFile(bytes: Uint8Array): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-huge-'))
  onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'snapshot.bin')
  fs.writeFileSync(file, bytes)
  return file
}

for (const kind of ['MAP_HUGETLB', 'MFD_HUGETLB'] as const) {
  describe(`FaultServer on ${kind} memory (2 MiB pages)`, () => {
    it('{ buffer }: one UFFDIO_COPY per huge page, stats in huge pages', async () => {
      const n = 4
      const { m, server, errors } = hugeSetup(kind, n, { faultAround: PAGE_SIZE })
      expect(m.pageSize).toBe(H)
      const content = randomContent(n * H)
      server.serve(m, { buffer: content })
      await touchAndCheck(m, content, hugeAddresses(m, 16))
      await within(server.drained(), 5000, 'drained')
      const s = server.stats()
      expect(s.demandPages).toBe(n)
      expect(s.bytes).toBe(n * H)
      expect(s.pagesTotal).toBe(n)
      expect(s.pagesPresent).toBe(n)
      expect(s.bytesTotal).toBe(n * H)
      expect(s.bytesPresent).toBe(n * H)
      expect(errors).toEqual([])
    })

    for (const readMethod of ['mmap', 'pread'] as const) {
      it(`{ file } (${readMethod}) from an offset; a file shorter than the range: zeros past its end`, async () => {
        const n = 4
        const { m, server, errors } = hugeSetup(kind, n, { faultAround: 2 * H })
        const skip = 3 * PAGE_SIZE // a file offset need not be huge-page aligned
        const content = randomContent(skip + 2 * H + H / 2 + 100) // ends inside the 3rd huge page
        const file = tmpFile(content)
        server.serve(m, { file, offset: skip, readMethod })
        const expected = new Uint8Array(n * H)
        expected.set(content.subarray(skip))
        await touchAndCheck(m, expected, hugeAddresses(m, 8))
        await until(() => server.stats().aroundPages > 0) // 4 MiB windows: 2 huge pages per fault
        expect(errors).toEqual([])
      })
    }

    it('{ zero: true }: zeros are copied (hugetlb has no ZEROPAGE)', async () => {
      const n = 2
      const { m, server, errors } = hugeSetup(kind, n)
      server.serve(m, { zero: true })
      const { values } = await within(touch(hugeAddresses(m, 4), { threads: 2 }), 5000, 'touch')
      expect(values.every((v) => v === 0n)).toBe(true)
      await until(() => server.stats().zeroPages === n)
      expect(errors).toEqual([])
    })

    it('{ handler }: asked for whole huge pages, aligned', async () => {
      const n = 3
      const { m, server, errors } = hugeSetup(kind, n, { faultAround: PAGE_SIZE })
      const content = randomContent(n * H)
      const asked: Array<{ address: bigint; offset: number; length: number }> = []
      server.serve(m, {
        handler: ({ address, offset, length }) => {
          asked.push({ address, offset, length })
          return content.subarray(offset, offset + length)
        },
      })
      await touchAndCheck(m, content, hugeAddresses(m, 8))
      expect(asked.length).toBe(n)
      for (const q of asked) {
        expect(q.length).toBe(H)
        expect((q.address - m.address) % HB).toBe(0n)
        expect(q.offset).toBe(Number(q.address - m.address))
      }
      expect(errors).toEqual([])
    })

    it('prefetch fills every huge page in the background; drained() resolves', async () => {
      const n = 8
      const { m, server, errors } = hugeSetup(kind, n, { prefetch: true, prefetchChunk: 256 * 1024 })
      const content = randomContent(n * H)
      server.serve(m, { buffer: content })
      await within(server.drained(), 10_000, 'drained')
      const s = server.stats()
      expect(s.prefetchPages).toBe(n) // a chunk smaller than a huge page is one huge page
      expect(s.pagesPresent).toBe(n)
      await touchAndCheck(m, content, hugeAddresses(m, 4)) // all present: no fault left
      expect(server.stats().faults).toBe(0)
      expect(errors).toEqual([])
    })
  })
}

describe('FaultServer hugetlb ranges and events', () => {
  it("REMOVE under onRemove 'zero': a removed huge page reads as zeros after", async () => {
    const n = 2
    const { m, server, errors } = hugeSetup('MAP_HUGETLB', n, { faultAround: PAGE_SIZE }, Feature.EVENT_REMOVE)
    const content = randomContent(n * H)
    server.serve(m, { buffer: content })
    await touchAndCheck(m, content, hugeAddresses(m, 2))
    expect(await within(madviseOnThread(m.range(H, H), 'dontneed'), 5000, 'madvise')).toBe(0)
    await until(() => server.stats().removes === 1)
    const { values } = await within(touch([m.address + 8n, m.address + HB + 8n]), 5000, 'touch')
    expect(values[0]).toBe(u64At(content, 8))
    expect(values[1]).toBe(0n)
    await until(() => server.stats().zeroPages === 1) // the counters trail the wake-up
    expect(errors).toEqual([])
  })

  it("REMOVE under onRemove 'source': the removed huge page is served again", async () => {
    const n = 2
    const { m, server, errors } = hugeSetup('MAP_HUGETLB', n, { onRemove: 'source' }, Feature.EVENT_REMOVE)
    const content = randomContent(n * H)
    server.serve(m, { buffer: content })
    await touchAndCheck(m, content, hugeAddresses(m, 2))
    expect(await within(madviseOnThread(m.range(0, H), 'dontneed'), 5000, 'madvise')).toBe(0)
    await until(() => server.stats().removes === 1)
    await touchAndCheck(m, content, hugeAddresses(m, 2))
    expect(errors).toEqual([])
  })

  it('a plain { address, length } range: { pageSize } says it is huge; checked against the kernel', () => {
    const { m, server } = hugeSetup('MAP_HUGETLB', 2)
    const plain = { address: m.address, length: m.length }
    expect(() => server.serve(plain, { zero: true })).toThrow(/hugetlb memory; give its huge page size/)
    expect(() =>
      server.serve({ address: m.address + BigInt(PAGE_SIZE), length: H }, { zero: true }, { pageSize: H }),
    ).toThrow(/not aligned to the page size \(2097152\)/)
    expect(() => server.serve(m, { zero: true }, { pageSize: PAGE_SIZE })).toThrow(/whose pages are 2097152 bytes/)
    expect(() => server.serve(plain, { zero: true }, { pageSize: 3 * H })).toThrow(/power of two/)
    server.serve(plain, { zero: true }, { pageSize: H }) // the failed attempts registered nothing
    // Plain memory at a huge-page-aligned address (anonymous mappings are not aligned themselves).
    const base = track(Mapping.anonymous(2 * H))
    const aligned = (base.address + BigInt(H - 1)) & ~BigInt(H - 1)
    expect(() => server.serve({ address: aligned, length: H }, { zero: true }, { pageSize: H })).toThrow(
      /not hugetlb memory/,
    )
  })

  it('a fault in registered hugetlb memory outside every served range gets zeros, not a hang', async () => {
    const { uffd, m, server, errors } = hugeSetup('MAP_HUGETLB', 2)
    uffd.register(m) // both huge pages registered, only the first served
    server.serve(m.range(0, H), { buffer: randomContent(H) }, { register: false })
    const { values } = await within(touch([m.address + HB + 16n]), 5000, 'touch')
    expect(values[0]).toBe(0n)
    await until(() => server.stats().unhandled === 1)
    expect(errors.map((e) => e.message)).toEqual([expect.stringMatching(/outside every served range/)])
  })
})
