// FaultServer in MINOR mode: shared memory (memfd, shared anonymous memory, hugetlbfs) whose
// pages go into the page cache once (through the server's own mapping of the file) and are
// mapped with UFFDIO_CONTINUE; pages already cached need only the CONTINUE. Every source kind,
// pushed pages, two servers (two uffds) over one file, prefetch, REMOVE, MINOR + WP, and the
// refusals. Faults come from native threads.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, type FaultSource, Feature, Mapping, PAGE_SIZE, Userfaultfd, hugePageSize } from '../src/index'
import { madviseOnThread, pages, touch } from '../src/testing'
import { closeAll, onCleanup, randomContent, track, u64At, until, within } from './helpers/fault-server'
import { hugePagesMissing, settlesWithin } from './helpers/uffd'

afterEach((ctx) => closeAll(ctx))

function tmpFile(bytes: Uint8Array): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fault-server-minor-'))
  onCleanup(() => fs.rmSync(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'snapshot.bin')
  fs.writeFileSync(file, bytes)
  return file
}

function server(options: ConstructorParameters<typeof FaultServer>[1] = {}, features = 0n) {
  const uffd = track(Userfaultfd.open({ features }))
  const s = track(new FaultServer(uffd, options))
  const errors: Error[] = []
  s.on('error', (e) => errors.push(e))
  return { uffd, server: s, errors }
}

/** Touches `addresses` from 2 native threads; every u64 must be `expected`'s at the same offset from `base`. */
async function expectContent(base: bigint, expected: Uint8Array, addresses: readonly bigint[]): Promise<void> {
  const { values } = await within(touch(addresses, { threads: 2 }), 10_000, 'touch')
  for (let i = 0; i < addresses.length; i++) {
    const at = Number(addresses[i] - base)
    if (values[i] !== u64At(expected, at)) expect(`${values[i]} at ${at}`).toBe(`${u64At(expected, at)} at ${at}`)
  }
}

const N = 32

describe("FaultServer { mode: 'minor' } on 4 KiB shmem", () => {
  const sources: Array<[string, (content: Uint8Array) => FaultSource]> = [
    ['buffer', (c) => ({ buffer: c })],
    ['file (mmap)', (c) => ({ file: tmpFile(c) })],
    ['file (pread)', (c) => ({ file: tmpFile(c), readMethod: 'pread' })],
    ['handler', (c) => ({ handler: ({ offset, length }) => c.slice(offset, offset + length) })],
  ]
  for (const [name, make] of sources) {
    it(`{ ${name} }: every page through the page cache, then CONTINUE`, async () => {
      const m = track(Mapping.memfd(N * PAGE_SIZE))
      const content = randomContent(N * PAGE_SIZE)
      const { server: s, errors } = server({ faultAround: 16 * 1024 })
      s.serve(m, make(content), { mode: 'minor' })
      await expectContent(m.address, content, [...pages(m)].reverse())
      // (The engine counts a page present just after the ioctl that woke its thread.)
      await until(() => s.stats().pagesPresent === N, 5000, 'pages counted')
      const st = s.stats()
      expect(st.cachedPages).toBe(N) // all filled by this server, once
      expect(st.ranges).toHaveLength(1)
      expect(st.ranges[0]).toMatchObject({ mode: 'minor', pagesPresent: N, pagesTotal: N, cachedPages: N })
      expect(st.ranges[0].pages.demand + st.ranges[0].pages.around).toBe(N)
      expect(errors).toEqual([])
      // The bytes are in the file: another mapping of it sees them, with no fault.
      const other = track(m.alias())
      const out = new Uint8Array(N * PAGE_SIZE)
      other.read(0, out)
      expect(Buffer.compare(out, content)).toBe(0)
    })
  }

  it('{ zero: true }: zeros (ZEROPAGE into the page cache)', async () => {
    const m = track(Mapping.memfd(4 * PAGE_SIZE))
    const { server: s } = server({ faultAround: PAGE_SIZE })
    s.serve(m, { zero: true }, { mode: 'minor' })
    const { values } = await within(touch(pages(m)), 5000, 'touch')
    expect([...values]).toEqual([0n, 0n, 0n, 0n])
    await until(() => s.stats().ranges[0].pages.zero === 4, 5000, 'pages counted')
  })

  it('pages pushed before serving need only the CONTINUE, and keep their bytes', async () => {
    const m = track(Mapping.memfd(N * PAGE_SIZE))
    const alias = track(m.alias())
    const content = randomContent(N * PAGE_SIZE)
    const pushed = randomContent(N * PAGE_SIZE).map((b) => b ^ 0x5a) // differs from the source
    const expected = content.slice()
    for (let p = 0; p < N; p += 2) {
      alias.write(p * PAGE_SIZE, pushed.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE))
      expected.set(pushed.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), p * PAGE_SIZE)
    }
    const { server: s, errors } = server({ faultAround: 16 * 1024 })
    s.serve(m, { buffer: content }, { mode: 'minor' })
    await expectContent(m.address, expected, [...pages(m)])
    // Only the odd pages came from the source; the pushed ones were never overwritten.
    expect(s.stats().cachedPages).toBe(N / 2)
    expect(errors).toEqual([])
  })

  it('pages pushed while serving: a MINOR fault maps them (never overwritten by the source)', async () => {
    const m = track(Mapping.memfd(4 * PAGE_SIZE))
    const alias = track(m.alias())
    const content = randomContent(4 * PAGE_SIZE)
    const { server: s } = server({ faultAround: PAGE_SIZE })
    s.serve(m, { buffer: content }, { mode: 'minor' })
    const page = new Uint8Array(PAGE_SIZE)
    new DataView(page.buffer).setBigUint64(0, 4242n, true)
    alias.write(2 * PAGE_SIZE, page)
    const { values } = await within(touch([m.at(2 * PAGE_SIZE), m.at(0)]), 5000, 'touch')
    expect(values[0]).toBe(4242n)
    expect(values[1]).toBe(1n)
    expect(s.stats().cachedPages).toBe(1)
  })

  it('shared anonymous memory (MAP_SHARED | MAP_ANONYMOUS): its alias is made by mremap', async () => {
    const m = track(Mapping.anonymous(N * PAGE_SIZE, { shared: true }))
    expect(m.shared).toBe(true)
    const content = randomContent(N * PAGE_SIZE)
    const { server: s } = server()
    s.serve(m, { buffer: content }, { mode: 'minor' })
    await expectContent(m.address, content, [...pages(m)])
    expect(s.stats().cachedPages).toBe(N)
  })

  it('prefetch fills the page cache and maps every page; drained() resolves', async () => {
    const m = track(Mapping.memfd(N * PAGE_SIZE))
    const content = randomContent(N * PAGE_SIZE)
    const { server: s } = server({ prefetchChunk: 8 * PAGE_SIZE })
    s.serve(m, { buffer: content }, { mode: 'minor', prefetch: true })
    await within(s.drained(), 5000, 'drained')
    const st = s.stats()
    expect(st.ranges[0].pages.prefetch).toBe(N)
    expect(st.cachedPages).toBe(N)
    const out = new Uint8Array(N * PAGE_SIZE)
    m.read(0, out) // mapped: no fault at all
    expect(Buffer.compare(out, content)).toBe(0)
    expect(s.stats().faults).toBe(0)
  })

  it('two servers (two uffds) over two mappings of one memfd: the second only CONTINUEs', async () => {
    const a = track(Mapping.memfd(N * PAGE_SIZE))
    const b = track(a.alias())
    const content = randomContent(N * PAGE_SIZE)
    const first = server()
    const second = server()
    first.server.serve(a, { buffer: content }, { mode: 'minor' })
    second.server.serve(b, { buffer: content }, { mode: 'minor' })
    await expectContent(a.address, content, [...pages(a)])
    await expectContent(b.address, content, [...pages(b)])
    expect(first.server.stats().cachedPages).toBe(N)
    await until(() => second.server.stats().pagesPresent === N, 5000, 'pages counted')
    expect(second.server.stats().cachedPages).toBe(0) // filled once, by the first
  })

  it('a plain { address, length } says its file with { backing, backingOffset }', async () => {
    const file = track(Mapping.memfd(2 * N * PAGE_SIZE))
    const view = track(file.alias())
    const content = randomContent(N * PAGE_SIZE)
    const { server: s } = server({ faultAround: PAGE_SIZE })
    const half = view.range(N * PAGE_SIZE, N * PAGE_SIZE)
    s.serve(half, { buffer: content }, { mode: 'minor', backing: file.fd, backingOffset: N * PAGE_SIZE })
    await expectContent(half.address, content, [...pages(half, 8)])
    // The second half of the file has them; the first half is untouched.
    const out = new Uint8Array(8)
    file.read(N * PAGE_SIZE, out)
    expect(new DataView(out.buffer).getBigUint64(0, true)).toBe(1n)
  })

  it("REMOVE: after MADV_REMOVE (a hole) onRemove 'zero' gives zeros; after MADV_DONTNEED the page cache still has the page", async () => {
    const m = track(Mapping.memfd(4 * PAGE_SIZE))
    const content = randomContent(4 * PAGE_SIZE)
    const { server: s } = server({ faultAround: PAGE_SIZE }, Feature.EVENT_REMOVE)
    s.serve(m, { buffer: content }, { mode: 'minor' })
    await within(touch(pages(m)), 5000, 'touch')
    expect(await madviseOnThread({ address: m.at(0), length: PAGE_SIZE }, 'remove')).toBe(0)
    expect(await madviseOnThread({ address: m.at(PAGE_SIZE), length: PAGE_SIZE }, 'dontneed')).toBe(0)
    const { values } = await within(touch([m.at(0), m.at(PAGE_SIZE)]), 5000, 'touch')
    expect(values[0]).toBe(0n) // punched: zeros
    expect(values[1]).toBe(2n) // only unmapped here: the shared page is still the file's
    expect(s.stats().ranges[0].pages.removed).toBe(2)
  })

  it('MINOR + WP: WP faults stay with their waiter (the server serves MISSING and MINOR only)', async (ctx) => {
    const features = Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP
    if ((Userfaultfd.probe().features & features) !== features) {
      // Write protection of shmem needs Linux 5.19 (arm64: 6.10): opening with it is refused.
      expect(() => Userfaultfd.open({ features })).toThrow()
      ctx.skip('no write protection of shmem on this kernel (refusal asserted)')
    }
    const m = track(Mapping.memfd(2 * PAGE_SIZE))
    const content = randomContent(2 * PAGE_SIZE)
    const { uffd, server: s, errors } = server({ faultAround: PAGE_SIZE }, features)
    uffd.register(m, { missing: true, minor: true, wp: true })
    s.serve(m, { buffer: content }, { mode: 'minor', register: false })
    await within(touch(pages(m)), 5000, 'touch') // read: MISSING faults, served
    uffd.writeProtect(m.range(0, PAGE_SIZE))
    const writer = touch([m.at(16)], { write: true, value: 7n })
    await until(() => s.stats().unhandled === 1, 5000, 'the WP fault read')
    expect(await settlesWithin(writer, 100)).toBe(false) // left to its waiter
    expect(errors[0]).toMatchObject({
      code: 'EINVAL',
      message: expect.stringMatching(/WP fault .* left to its waiter/),
    })
    uffd.writeProtect(m.range(0, PAGE_SIZE), { protect: false }) // the waiter's own resolution
    await within(writer, 5000, 'writer')
    const out = new BigUint64Array(2)
    m.read(16, out)
    expect(out[0]).toBe(7n) // value + index 0
  })

  it('refuses what has no page cache, and a backing that does not fit', () => {
    const { server: s } = server()
    const anon = track(Mapping.anonymous(PAGE_SIZE))
    expect(() => s.serve(anon, { zero: true }, { mode: 'minor' })).toThrow(
      expect.objectContaining({ name: 'TypeError', message: expect.stringMatching(/needs shared memory/) }),
    )
    const priv = track(Mapping.memfd(PAGE_SIZE, { private: true }))
    expect(() => s.serve(priv, { zero: true }, { mode: 'minor' })).toThrow(/needs shared memory/)
    const m = track(Mapping.memfd(2 * PAGE_SIZE))
    expect(() => s.serve(m.range(0, PAGE_SIZE), { zero: true }, { mode: 'minor' })).toThrow(/needs \{ backing \}/)
    expect(() => s.serve(m, { zero: true }, { mode: 'minor', backingOffset: PAGE_SIZE })).toThrow(RangeError)
    expect(() =>
      s.serve(m.range(0, PAGE_SIZE), { zero: true }, { mode: 'minor', backing: m.fd, backingOffset: 8 * PAGE_SIZE }),
    ).toThrow(/too short/)
    expect(() => s.serve(m, { zero: true }, { mode: 'major' as 'minor' })).toThrow(TypeError)
    expect(() => s.serve(m, { zero: true }, { mode: 'minor', backing: -1 })).toThrow(RangeError)
    // Nothing was left registered or served by the refusals.
    s.serve(m, { zero: true }, { mode: 'minor' })
    expect(s.stats().ranges).toHaveLength(1)
  })
})

describe("FaultServer { mode: 'minor' } on hugetlbfs (2 MiB pages)", () => {
  const H = hugePageSize()
  it('every source kind, in whole huge pages; a pushed huge page is only mapped', async (ctx) => {
    const why = hugePagesMissing()
    if (why !== undefined) ctx.skip(why)
    const n = 3
    const content = randomContent(n * H)
    const sources: FaultSource[] = [
      { buffer: content },
      { file: tmpFile(content) },
      { file: tmpFile(content), readMethod: 'pread' },
      { handler: ({ offset, length }) => content.slice(offset, offset + length) },
      { zero: true },
    ]
    for (const source of sources) {
      const m = track(Mapping.memfd(n * H, { hugetlb: true }))
      const alias = track(m.alias())
      const pushed = new Uint8Array(H).fill(0x77)
      alias.write(2 * H, pushed) // the third huge page is in the page cache already
      const expected = 'zero' in source ? new Uint8Array(n * H) : content.slice()
      expected.set(pushed, 2 * H)
      const { server: s, errors } = server({ faultAround: PAGE_SIZE })
      s.serve(m, source, { mode: 'minor' })
      const addresses: bigint[] = []
      for (let p = 0; p < n; p++) for (const o of [0, 4096, H - 8]) addresses.push(m.address + BigInt(p * H + o))
      await expectContent(m.address, expected, addresses)
      await until(() => s.stats().pagesPresent === n, 5000, 'pages counted')
      expect(s.stats().cachedPages).toBe(n - 1)
      expect(s.stats().ranges[0]).toMatchObject({ pageSize: H, pagesPresent: n, pagesTotal: n })
      expect(errors).toEqual([])
      s.close()
    }
  })
})
