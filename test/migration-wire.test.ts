// The wire protocol's TypeScript side (handshake frames, the frame parser, the JSON payloads),
// with fast-check properties: whatever bytes arrive, in whatever chunks, the parser returns the
// frames that were sent or throws a ProtocolError, and never waits for (or buffers) an oversize
// payload. The native parser is attacked through a live target in migration-hostile.test.ts.
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import {
  checkHeader,
  decodeChallenge,
  decodeHello,
  decodeReject,
  decodeSetup,
  encodeChallenge,
  encodeFrame,
  encodeHeader,
  encodeHello,
  encodeJson,
  encodeRuns,
  FrameParser,
  FrameType,
  HEADER_SIZE,
  MAX_PAYLOAD,
  ProtocolError,
} from '../src/migration/wire'
import { proof, resolveSecret } from '../src/migration/auth'

const TYPES = Object.values(FrameType)
const EXACT: Record<number, number> = {
  [FrameType.HELLO]: 16,
  [FrameType.CHALLENGE]: 48,
  [FrameType.AUTH]: 64,
  [FrameType.AUTH_OK]: 32,
  [FrameType.ZERO]: 8,
  [FrameType.REQUEST]: 8,
  [FrameType.PING]: 8,
  [FrameType.PONG]: 8,
}

const validFrame = fc
  .record({
    type: fc.constantFrom(...TYPES),
    range: fc.integer({ min: 0, max: 65535 }),
    page: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    size: fc.integer({ min: 0, max: 3000 }),
    fill: fc.integer({ min: 0, max: 255 }),
  })
  .map(({ type, range, page, size, fill }) => {
    const n = EXACT[type] ?? Math.min(size, MAX_PAYLOAD[type])
    return { type, range, page, payload: Buffer.alloc(n, fill) }
  })

/** Splits bytes at arbitrary points. */
function chunks(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b)
  const out: Buffer[] = []
  let at = 0
  for (const p of points) {
    out.push(bytes.subarray(at, p))
    at = p
  }
  out.push(bytes.subarray(at))
  return out
}

describe('FrameParser (fast-check)', () => {
  it('returns exactly the frames sent, however the stream is cut', () => {
    fc.assert(
      fc.property(fc.array(validFrame, { maxLength: 20 }), fc.array(fc.nat(), { maxLength: 30 }), (frames, cuts) => {
        const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.type, f.payload, f.range, f.page)))
        const parser = new FrameParser()
        const got = []
        for (const c of chunks(bytes, cuts)) {
          parser.push(c)
          for (let f = parser.next(); f !== undefined; f = parser.next()) got.push(f)
        }
        expect(got.length).toBe(frames.length)
        got.forEach((g, i) => {
          expect(g.type).toBe(frames[i].type)
          expect(g.range).toBe(frames[i].range)
          expect(g.page).toBe(frames[i].page)
          expect(g.payload.equals(frames[i].payload)).toBe(true)
        })
        expect(parser.buffered).toBe(0)
      }),
      { numRuns: 300 },
    )
  })

  it('on arbitrary bytes: frames that obey every rule, or a ProtocolError; nothing else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 4096 }), fc.array(fc.nat(), { maxLength: 10 }), (raw, cuts) => {
        const parser = new FrameParser()
        try {
          for (const c of chunks(Buffer.from(raw), cuts)) {
            parser.push(c)
            for (let f = parser.next(); f !== undefined; f = parser.next()) {
              expect(f.flags).toBe(0)
              expect(f.payload.length).toBe(f.length)
              expect(f.length).toBeLessThanOrEqual(MAX_PAYLOAD[f.type])
            }
          }
        } catch (err) {
          expect(err).toBeInstanceOf(ProtocolError)
          expect((err as ProtocolError).code).toBe('EPROTO')
        }
      }),
      { numRuns: 1000 },
    )
  })

  it('refuses an oversize, unknown or flagged header as soon as the header is complete', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...TYPES),
        fc.integer({ min: 1, max: 0xffffffff }),
        fc.integer({ min: 0, max: 255 }),
        (type, length, flags) => {
          const header = encodeHeader({ type, range: 0, length, page: 0n, flags })
          const parser = new FrameParser()
          parser.push(header)
          const bad = flags !== 0 || length > MAX_PAYLOAD[type] || (EXACT[type] !== undefined && length !== EXACT[type])
          if (bad) expect(() => parser.next()).toThrow(ProtocolError)
          else expect(parser.next()).toBeUndefined() // waits for the payload
        },
      ),
      { numRuns: 500 },
    )
    const parser = new FrameParser()
    parser.push(encodeHeader({ type: 0x7f, range: 0, length: 0, page: 0n }))
    expect(() => parser.next()).toThrow(/unknown frame type 0x7f/)
  })

  it('rest() gives back the bytes after the last frame taken', () => {
    const parser = new FrameParser()
    const a = encodeFrame(FrameType.PING, Buffer.alloc(8, 1))
    const b = encodeFrame(FrameType.PING, Buffer.alloc(8, 2))
    parser.push(Buffer.concat([a, b.subarray(0, 20)]))
    expect(parser.next()?.payload[0]).toBe(1)
    expect(parser.next()).toBeUndefined()
    expect(parser.rest().equals(b.subarray(0, 20))).toBe(true)
    expect(HEADER_SIZE).toBe(16)
  })
})

describe('handshake payloads', () => {
  it('HELLO and CHALLENGE round-trip; a wrong magic, versions or reserved bits are ProtocolErrors', () => {
    const h = { versionMin: 1, versionMax: 3, channel: 'demand' as const, auth: true }
    expect(decodeHello(encodeHello(h))).toEqual(h)
    const c = { version: 1, auth: false, nonce: Buffer.alloc(32, 7) }
    expect(decodeChallenge(encodeChallenge(c))).toEqual(c)
    const bad = encodeHello(h)
    bad[0] ^= 1
    expect(() => decodeHello(bad)).toThrow(/magic/)
    const v = encodeHello(h)
    v.writeUInt16LE(5, 8)
    expect(() => decodeHello(v)).toThrow(/versions/)
    const r = encodeHello(h)
    r[14] = 1
    expect(() => decodeHello(r)).toThrow(/reserved/)
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 16, maxLength: 16 }), (raw) => {
        try {
          decodeHello(Buffer.from(raw))
        } catch (err) {
          expect(err).toBeInstanceOf(ProtocolError)
        }
      }),
    )
  })

  it('SETUP: checked field by field; anything else is a ProtocolError', () => {
    const good = {
      session: 'ab'.repeat(16),
      channel: 'main',
      mode: 'hybrid',
      ranges: [
        { length: 8192, pageSize: 4096, kind: 'anonymous' },
        { length: 4 << 20, pageSize: 2 << 20, kind: 'hugetlb' },
      ],
      verify: true,
      metadata: { x: 1 },
    }
    expect(decodeSetup(encodeJson(good))).toMatchObject({ mode: 'hybrid', resume: false, verify: true })
    const broken: Array<[string, unknown]> = [
      ['session', 'xyz'],
      ['channel', 'side'],
      ['mode', 'fast'],
      ['ranges', []],
      ['ranges', [{ length: 4095, pageSize: 4096, kind: 'anonymous' }]],
      ['ranges', [{ length: 4096, pageSize: 8192, kind: 'anonymous' }]],
      ['ranges', [{ length: 4 << 20, pageSize: 2 << 20, kind: 'anonymous' }]],
      ['ranges', [{ length: 4096, pageSize: 4096, kind: 'gpu' }]],
      ['ranges', [{ length: 2 ** 60, pageSize: 4096, kind: 'anonymous' }]],
      ['verify', 'yes'],
      ['resume', 1],
    ]
    for (const [key, value] of broken)
      expect(() => decodeSetup(encodeJson({ ...good, [key]: value })), key).toThrow(ProtocolError)
    expect(() => decodeSetup(Buffer.from('not json'))).toThrow(ProtocolError)
    expect(() => decodeSetup(Buffer.from('[1,2]'))).toThrow(ProtocolError)
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        try {
          decodeSetup(encodeJson(v))
        } catch (err) {
          expect(err).toBeInstanceOf(ProtocolError)
        }
      }),
      { numRuns: 500 },
    )
    expect(decodeReject(encodeJson({ code: 'EAUTH', message: 'no' }))).toEqual({ code: 'EAUTH', message: 'no' })
  })

  it('DISCARD payloads: 16 bytes per run, split at 1 MiB', () => {
    const runs = Array.from({ length: 70000 }, (_, i) => ({ range: i % 3, page: i * 2, count: 1 }))
    const parts = encodeRuns(runs)
    expect(parts.length).toBe(2)
    expect(parts[0].length).toBe(1 << 20)
    expect(parts[1].readBigUInt64LE(8)).toBe(BigInt(65536 * 2))
    for (const p of parts)
      expect(() =>
        checkHeader({ type: FrameType.DISCARD, flags: 0, range: 0, length: p.length, page: 0n }),
      ).not.toThrow()
  })

  it('proofs differ by role, channel, nonce order and TLS binding; secrets are checked', () => {
    const s = Buffer.from('0123456789abcdef0123')
    const a = Buffer.alloc(32, 1)
    const b = Buffer.alloc(32, 2)
    const p = proof(s, 'source', 1, 'main', a, b)
    expect(p.length).toBe(32)
    expect(proof(s, 'target', 1, 'main', a, b).equals(p)).toBe(false)
    expect(proof(s, 'source', 1, 'demand', a, b).equals(p)).toBe(false)
    expect(proof(s, 'source', 1, 'main', b, a).equals(p)).toBe(false)
    expect(proof(s, 'source', 1, 'main', a, b, Buffer.alloc(32)).equals(p)).toBe(false)
    expect(proof(s, 'source', 1, 'main', a, b).equals(p)).toBe(true)
    expect(() => resolveSecret({ secret: 'short' })).toThrow(RangeError)
    expect(() => resolveSecret({ secret: 5 as never })).toThrow(TypeError)
    expect(resolveSecret({ insecure: true, secret: undefined })).toBe(
      process.env.USERFAULTFD_MIGRATE_SECRET ? resolveSecret({}) : null,
    )
  })
})
