// The memory-kind matrix of the FaultServer, measured: every kind of memory (private anonymous,
// shared anonymous = shmem, memfd, hugetlbfs, private hugetlb, and private shmem) x MISSING /
// MINOR mode. Each cell serves a buffer source and reads every page from native threads (half
// the pages pushed into the page cache first in MINOR mode, so both MINOR and MISSING faults are
// taken), or asserts the refusal. The table it prints is the one in docs/fault-server.md.
import { afterAll, afterEach, describe, expect, it } from 'vitest'
import { FaultServer, type FaultMode, Mapping, PAGE_SIZE, Userfaultfd, hugePageSize } from '../src/index'
import { pages, touch } from '../src/testing'
import { closeAll, randomContent, track, u64At, until, within } from './helpers/fault-server'
import { hugePagesMissing } from './helpers/uffd'

afterEach((ctx) => closeAll(ctx))

const H = hugePageSize()

interface Kind {
  name: string
  pageSize: number
  make(length: number): Mapping
  /** MINOR mode refused (no page cache shared with another mapping) */
  minorRefused: boolean
}

const kinds: Kind[] = [
  { name: 'anon (MAP_PRIVATE)', pageSize: PAGE_SIZE, make: (n) => Mapping.anonymous(n), minorRefused: true },
  {
    name: 'shmem (MAP_SHARED, MAP_ANONYMOUS)',
    pageSize: PAGE_SIZE,
    make: (n) => Mapping.anonymous(n, { shared: true }),
    minorRefused: false,
  },
  { name: 'memfd (MAP_SHARED)', pageSize: PAGE_SIZE, make: (n) => Mapping.memfd(n), minorRefused: false },
  {
    name: 'hugetlbfs (memfd MFD_HUGETLB, MAP_SHARED)',
    pageSize: H,
    make: (n) => Mapping.memfd(n, { hugetlb: true }),
    minorRefused: false,
  },
  {
    name: 'hugetlb private (MAP_PRIVATE, MAP_HUGETLB)',
    pageSize: H,
    make: (n) => Mapping.anonymous(n, { hugetlb: true }),
    minorRefused: true,
  },
  {
    name: 'shmem private (memfd MAP_PRIVATE)',
    pageSize: PAGE_SIZE,
    make: (n) => Mapping.memfd(n, { private: true }),
    minorRefused: true,
  },
]

const matrix = new Map<string, Partial<Record<FaultMode, string>>>()
afterAll(() => {
  if (matrix.size === 0) return
  const rows = [...matrix].map(([k, v]) => `| ${k} | ${v.missing ?? '-'} | ${v.minor ?? '-'} |`)
  console.log(['| memory | MISSING | MINOR |', '|---|---|---|', ...rows].join('\n'))
})

describe('FaultServer memory-kind matrix', () => {
  for (const kind of kinds) {
    for (const mode of ['missing', 'minor'] as const) {
      it(`${kind.name} x ${mode.toUpperCase()}`, async (ctx) => {
        if (kind.pageSize > PAGE_SIZE) {
          const why = hugePagesMissing()
          if (why !== undefined) ctx.skip(why)
        }
        const n = kind.pageSize > PAGE_SIZE ? 4 : 32
        const m = track(kind.make(n * kind.pageSize))
        const content = randomContent(n * kind.pageSize)
        const uffd = track(Userfaultfd.open())
        const server = track(new FaultServer(uffd, { faultAround: PAGE_SIZE }))
        const errors: Error[] = []
        server.on('error', (e) => errors.push(e))
        const cell = matrix.get(kind.name) ?? {}
        matrix.set(kind.name, cell)
        if (mode === 'minor' && kind.minorRefused) {
          expect(() => server.serve(m, { buffer: content }, { mode })).toThrow(
            expect.objectContaining({ name: 'TypeError', message: expect.stringMatching(/needs shared memory/) }),
          )
          // (The kernel itself refuses MINOR registration of private anonymous memory; private
          // file and hugetlb mappings it would register, but their writes never reach the page
          // cache that MINOR mode fills once for every mapping: serve them in MISSING mode.)
          if (kind.name.startsWith('anon'))
            expect(() => uffd.register(m, { minor: true })).toThrow(expect.objectContaining({ code: 'EINVAL' }))
          cell[mode] = 'refused: TypeError (private memory)'
          return
        }
        let pushed = 0
        if (mode === 'minor') {
          // Every other page in the page cache already: those faults are MINOR (CONTINUE only).
          const alias = track(m.alias())
          for (let p = 0; p < n; p += 2, pushed++)
            alias.write(p * kind.pageSize, content.subarray(p * kind.pageSize, (p + 1) * kind.pageSize))
        }
        server.serve(m, { buffer: content }, { mode })
        const addresses = [...pages(m, n, kind.pageSize)].map((a, i) => a + BigInt((i * 8 * 131) % kind.pageSize))
        const { values } = await within(touch(addresses, { threads: 2 }), 10_000, 'touch')
        for (let i = 0; i < n; i++) expect(values[i]).toBe(u64At(content, Number(addresses[i] - m.address)))
        await until(() => server.stats().pagesPresent === n, 5000, 'pages counted')
        const st = server.stats()
        expect(errors).toEqual([])
        expect(st.ranges[0]).toMatchObject({ mode, pageSize: kind.pageSize, pagesTotal: n })
        if (mode === 'minor') expect(st.cachedPages).toBe(n - pushed)
        cell[mode] =
          mode === 'minor'
            ? `served (${kind.pageSize / 1024} KiB): ${n - pushed} pages into the page cache + CONTINUE, ${pushed} pushed: CONTINUE only`
            : `served (${kind.pageSize / 1024} KiB): UFFDIO_COPY`
      })
    }
  }
})
