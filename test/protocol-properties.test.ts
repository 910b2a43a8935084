// Property-based tests of the handshake wire formats (src/firecracker/protocol.ts): every format
// in `wireFormats` must frame a valid message split anywhere, parse it the same as whole, and
// meet arbitrary and mutated bytes with a ProtocolError, never another exception or a wrong
// result. A new format plugs in with an entry in `generators` (the first test insists).
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import {
  JsonFramer,
  ProtocolError,
  type GuestRegion,
  type ParseOptions,
  type WireFormat,
  firecrackerHandshake,
  parseRegions,
  wireFormats,
} from '../src/firecracker/protocol'
import { check } from './helpers/properties'

const encoder = new TextEncoder()

interface Sample {
  bytes: Uint8Array
  options: ParseOptions
}

// --- Firecracker: region arrays that must be accepted -------------------------------------
const PAGE_SIZES = [4096, 65536, 2 * 1024 * 1024]

const validFirecracker: fc.Arbitrary<Sample> = fc
  .record({
    pageSize: fc.constantFrom(...PAGE_SIZES),
    sizes: fc.array(fc.integer({ min: 1, max: 8 }), { minLength: 1, maxLength: 6 }),
    gaps: fc.array(fc.integer({ min: 0, max: 4 }), { minLength: 6, maxLength: 6 }),
    baseUnits: fc.integer({ min: 1, max: 2 ** 20 }),
    order: fc.array(fc.nat(), { minLength: 6, maxLength: 6 }),
    legacy: fc.constantFrom('bytes', 'kib-bytes', 'kib-literal', 'both'),
    extra: fc.option(fc.string({ unit: 'binary' }), { nil: undefined }), // unknown fields: ignored
    pretty: fc.boolean(),
  })
  .map(({ pageSize, sizes, gaps, baseUnits, order, legacy, extra, pretty }) => {
    let address = baseUnits * pageSize
    let offset = 0
    const regions = sizes.map((pages, i) => {
      const size = pages * pageSize
      const region: Record<string, unknown> = { base_host_virt_addr: address, size, offset }
      if (legacy === 'bytes' || legacy === 'both') region.page_size = pageSize
      if (legacy === 'kib-bytes' || legacy === 'both') region.page_size_kib = pageSize
      if (legacy === 'kib-literal') region.page_size_kib = pageSize / 1024
      if (extra !== undefined) region.note = extra
      address += size + gaps[i] * pageSize
      offset += size
      return region
    })
    // Any order on the wire: the parser sorts by address.
    const shuffled = regions.map((r, i) => [order[i], i, r] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1])
    const text = JSON.stringify(
      shuffled.map(([, , r]) => r),
      null,
      pretty ? 2 : undefined,
    )
    return { bytes: encoder.encode(text), options: { fileSize: offset } }
  })

/** Valid messages of each wire format. A format without generators fails the first test. */
const generators: Record<string, fc.Arbitrary<Sample>> = { firecracker: validFirecracker }

/** A message cut into pieces at arbitrary byte positions (possibly inside a character). */
function splits(sample: fc.Arbitrary<Sample>): fc.Arbitrary<{ sample: Sample; pieces: Uint8Array[] }> {
  return sample.chain((s) =>
    fc.uniqueArray(fc.integer({ min: 1, max: Math.max(1, s.bytes.length - 1) }), { maxLength: 12 }).map((cuts) => {
      const at = [0, ...cuts.filter((c) => c < s.bytes.length).sort((a, b) => a - b), s.bytes.length]
      const pieces = at.slice(1).map((end, i) => s.bytes.subarray(at[i], end))
      return { sample: s, pieces }
    }),
  )
}

/** Frames pieces and parses: the result, or the ProtocolError (anything else is thrown). */
function receive<T>(
  format: WireFormat<T, ParseOptions>,
  pieces: Uint8Array[],
  options: ParseOptions,
): { complete: boolean; after?: number; value?: T; error?: ProtocolError } {
  const framer = format.framer()
  try {
    for (let i = 0; i < pieces.length; i++) {
      if (framer.push(pieces[i])) {
        const all = Buffer.concat(pieces.slice(0, i + 1))
        return { complete: true, after: i, value: format.parse(all, options) }
      }
    }
    return { complete: false }
  } catch (err) {
    if (!(err instanceof ProtocolError)) throw err
    return { complete: true, error: err }
  }
}

/** Invariants of any accepted Firecracker handshake. */
function checkRegions(regions: GuestRegion[], options: ParseOptions): void {
  expect(regions.length).toBeGreaterThan(0)
  for (let i = 0; i < regions.length; i++) {
    const r = regions[i]
    expect(r.end - r.base).toBe(BigInt(r.size))
    expect(r.size).toBeGreaterThan(0)
    expect(r.base % BigInt(r.pageSize)).toBe(0n)
    expect(r.size % r.pageSize).toBe(0)
    expect(r.offset % r.pageSize).toBe(0)
    expect(r.offset + r.size).toBeLessThanOrEqual(options.fileSize)
    if (i > 0) expect(regions[i - 1].end <= r.base).toBe(true)
  }
}

// Byte-level mutations of a valid message: what a buggy or hostile peer sends.
const mutation = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), value: fc.constant(0) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(), value: fc.constant(0) }),
  fc.record({ kind: fc.constant('duplicate' as const), at: fc.nat(), value: fc.nat(64) }),
  fc.record({
    kind: fc.constant('token' as const),
    at: fc.nat(),
    value: fc.constantFrom(
      ...[
        '-1',
        '1e400',
        '0.5',
        '18446744073709551616',
        'null',
        '"4096"',
        '[]',
        '{}',
        ',',
        '\\u0000',
        '"',
        '\u00e9',
        '\ud83d',
        '9007199254740993',
      ].map((t) => encoder.encode(t)),
    ),
  }),
)

function mutate(bytes: Uint8Array, mutations: Array<{ kind: string; at: number; value: unknown }>): Uint8Array {
  let b = Uint8Array.from(bytes)
  for (const m of mutations) {
    const at = b.length === 0 ? 0 : m.at % (b.length + 1)
    if (m.kind === 'flip' && at < b.length) b[at] = m.value as number
    else if (m.kind === 'insert')
      b = Buffer.concat([b.subarray(0, at), Uint8Array.of(m.value as number), b.subarray(at)])
    else if (m.kind === 'delete') b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1)])
    else if (m.kind === 'truncate') b = b.subarray(0, at)
    else if (m.kind === 'duplicate')
      b = Buffer.concat([b.subarray(0, at), b.subarray(at, at + (m.value as number)), b.subarray(at)])
    else if (m.kind === 'token') b = Buffer.concat([b.subarray(0, at), m.value as Uint8Array, b.subarray(at)])
  }
  return b
}

describe.each(wireFormats.map((f) => [f.name, f] as const))('wire format %s', (name, format) => {
  const valid = generators[name]

  it('has generators of valid messages here (a new format must add them)', () => {
    expect(valid, `add generators['${name}'] to test/protocol-properties.test.ts`).toBeDefined()
  })

  it('frames a valid message split anywhere: incomplete before its last byte, complete at it, parsed as if whole', () => {
    check(
      `${name}: framing`,
      fc.property(splits(valid), ({ sample, pieces }) => {
        const whole = format.parse(sample.bytes, sample.options)
        const r = receive(format, pieces, sample.options)
        expect(r.error).toBeUndefined()
        expect(r.complete).toBe(true)
        expect(r.after).toBe(pieces.length - 1)
        expect(r.value).toEqual(whole)
      }),
    )
  })

  it('every proper prefix of a valid message is incomplete (never an error, never complete)', () => {
    check(
      `${name}: prefixes`,
      fc.property(valid, fc.nat(), (sample, n) => {
        const cut = n % sample.bytes.length
        const framer = format.framer()
        expect(framer.push(sample.bytes.subarray(0, cut))).toBe(false)
      }),
    )
  })

  it('arbitrary bytes, in arbitrary pieces: a ProtocolError or a result, nothing else', () => {
    check(
      `${name}: arbitrary bytes`,
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 6 }), fc.nat(2 ** 40), (pieces, fileSize) => {
        const r = receive(format, pieces, { fileSize })
        if (r.value !== undefined && name === 'firecracker') checkRegions(r.value as GuestRegion[], { fileSize })
      }),
      500,
    )
  })

  it('mutated valid messages: a ProtocolError or a result that still holds every invariant', () => {
    check(
      `${name}: mutations`,
      fc.property(valid, fc.array(mutation, { minLength: 1, maxLength: 4 }), fc.nat(8), (sample, mutations, parts) => {
        const bytes = mutate(sample.bytes, mutations)
        const step = Math.max(1, Math.ceil(bytes.length / (parts + 1)))
        const pieces: Uint8Array[] = []
        for (let i = 0; i < bytes.length; i += step) pieces.push(bytes.subarray(i, i + step))
        const r = receive(format, pieces, sample.options)
        if (r.value !== undefined && name === 'firecracker') checkRegions(r.value as GuestRegion[], sample.options)
      }),
      1000,
    )
  })
})

describe('JsonFramer against JSON.parse (the grammar it follows)', () => {
  it('never rejects valid JSON, and completes an array or object exactly at its end', () => {
    check(
      'framer: valid JSON',
      fc.property(
        fc.oneof(
          fc.array(fc.jsonValue({ maxDepth: 3 }), { maxLength: 6 }),
          fc.dictionary(fc.string(), fc.jsonValue({ maxDepth: 3 }), { maxKeys: 6 }),
        ),
        fc.constantFrom(undefined, 1, '\t'),
        (value, indent) => {
          const bytes = encoder.encode(JSON.stringify(value, null, indent))
          const framer = new JsonFramer()
          for (let i = 0; i < bytes.length - 1; i++) expect(framer.push(bytes.subarray(i, i + 1))).toBe(false)
          expect(framer.push(bytes.subarray(bytes.length - 1))).toBe(true)
        },
      ),
    )
  })

  it('what it rejects, JSON.parse rejects too; what it completes without trailing bytes, JSON.parse accepts', () => {
    // Text from JSON's own alphabet, so that near-misses are common.
    const alphabet = fc.constantFrom(...'[]{}:,"\\ 0123456789-+.eEtrufalsn\u00e9x\n'.split(''))
    check(
      'framer: differential',
      fc.property(fc.array(alphabet, { maxLength: 40 }), (chars) => {
        const text = `[${chars.join('')}`
        const bytes = encoder.encode(text)
        const framer = new JsonFramer()
        let verdict: 'complete' | 'incomplete' | 'rejected'
        let end = -1
        try {
          verdict = 'incomplete'
          for (let i = 0; i < bytes.length; i++) {
            if (framer.push(bytes.subarray(i, i + 1))) {
              verdict = 'complete'
              end = i + 1
              break
            }
          }
        } catch (err) {
          expect(err).toBeInstanceOf(ProtocolError)
          verdict = 'rejected'
        }
        let parses = true
        try {
          JSON.parse(text)
        } catch {
          parses = false
        }
        if (verdict === 'rejected') expect(parses).toBe(false)
        if (verdict === 'complete' && end === bytes.length) expect(parses).toBe(true)
        if (parses) expect(verdict).toBe('complete')
      }),
      2000,
    )
  })
})

describe('parseRegions directly (the text-level entry point)', () => {
  it('arbitrary text and file sizes: a ProtocolError or regions that hold every invariant', () => {
    check(
      'parseRegions: arbitrary',
      fc.property(fc.oneof(fc.string(), fc.json()), fc.nat(2 ** 40), (text, fileSize) => {
        try {
          checkRegions(parseRegions(text, { fileSize }), { fileSize })
        } catch (err) {
          if (!(err instanceof ProtocolError)) throw err
        }
      }),
      1000,
    )
  })

  it('the handler speaks the Firecracker format', () => {
    expect(wireFormats).toContain(firecrackerHandshake)
  })
})
