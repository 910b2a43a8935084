// Malformed and hostile frames against the native parsers, through live connections (fast-check
// generates the attacks): a fake source attacks a real MigrationTarget whose memory sits between
// two PROT_NONE guard pages, and a fake target attacks a real MigrationSource. Every attack must
// end in a ProtocolError and a dropped connection: never a write outside the agreed ranges (it
// would hit a guard page: EFAULT, or kill the process), never a crash, never a hang. Valid frames
// sent before the attack must have landed exactly where they said.
import * as net from 'node:net'
import fc from 'fast-check'
import { afterEach, describe, expect, it } from 'vitest'
import { Mapping } from '../src/core/mapping'
import { MigrationSource } from '../src/migration/source'
import { MigrationTarget } from '../src/migration/target'
import { encodeFrame, encodeHeader, encodeJson, FrameType, ProtocolError } from '../src/migration/wire'
import { killChildren } from './helpers/children'
import { control, fakeSource, fakeTarget, SECRET, until, unmapAll, canPrecopy } from './helpers/migration'
import { timeScale } from './helpers/children'

afterEach(() => killChildren())

const PAGE = 4096
const PAGES = 16

type Valid =
  | { kind: 'pages'; page: number; n: number; fill: number }
  | { kind: 'zero'; page: number; n: number }
  | { kind: 'ping' }

const valid: fc.Arbitrary<Valid> = fc.oneof(
  fc
    .record({
      page: fc.integer({ min: 0, max: PAGES - 1 }),
      n: fc.integer({ min: 1, max: 4 }),
      fill: fc.integer({ min: 1, max: 255 }),
    })
    .map((r) => ({ kind: 'pages' as const, page: r.page, n: Math.min(r.n, PAGES - r.page), fill: r.fill })),
  fc
    .record({ page: fc.integer({ min: 0, max: PAGES - 1 }), n: fc.integer({ min: 1, max: 4 }) })
    .map((r) => ({ kind: 'zero' as const, page: r.page, n: Math.min(r.n, PAGES - r.page) })),
  fc.constant({ kind: 'ping' as const }),
)

function u64(n: bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64LE(n)
  return b
}

function raw(type: number, length: number, range: number, page: bigint, payload: Buffer, flags = 0): Buffer {
  return Buffer.concat([encodeHeader({ type, range, length, page, flags }), payload])
}

/** Frames a source must never send to a target. */
const attackOnTarget: fc.Arbitrary<{ name: string; bytes: Buffer }> = fc.oneof(
  fc
    .integer({ min: 1, max: 65535 })
    .map((r) => ({ name: `PAGES range ${r}`, bytes: encodeFrame(FrameType.PAGES, Buffer.alloc(PAGE), r, 0n) })),
  fc
    .bigInt({ min: BigInt(PAGES), max: (1n << 64n) - 1n })
    .map((p) => ({ name: `PAGES page ${p}`, bytes: encodeFrame(FrameType.PAGES, Buffer.alloc(PAGE), 0, p) })),
  fc.integer({ min: 1, max: 4 }).map((n) => ({
    name: `PAGES running past the end by ${n}`,
    bytes: encodeFrame(FrameType.PAGES, Buffer.alloc(PAGE * (n + 1)), 0, BigInt(PAGES - 1)),
  })),
  fc
    .integer({ min: 1, max: PAGE * 4 })
    .filter((n) => n % PAGE !== 0)
    .map((n) => ({ name: `PAGES of ${n} bytes`, bytes: encodeFrame(FrameType.PAGES, Buffer.alloc(n), 0, 0n) })),
  fc
    .integer({ min: (4 << 20) + 1, max: 0xffffffff })
    .map((n) => ({ name: `PAGES claiming ${n} bytes`, bytes: raw(FrameType.PAGES, n, 0, 0n, Buffer.alloc(64)) })),
  fc
    .record({
      page: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      count: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    })
    .filter(({ page, count }) => count === 0n || page >= BigInt(PAGES) || page + count > BigInt(PAGES))
    .map(({ page, count }) => ({
      name: `ZERO ${page}+${count}`,
      bytes: encodeFrame(FrameType.ZERO, u64(count), 0, page),
    })),
  fc.constant({ name: 'REQUEST to the target', bytes: encodeFrame(FrameType.REQUEST, u64(1n), 0, 0n) }),
  fc.constant({ name: 'HAVE to the target', bytes: encodeFrame(FrameType.HAVE, Buffer.alloc(2), 0, 0n) }),
  fc
    .bigInt({ min: BigInt(PAGES), max: 1n << 63n })
    .map((p) => ({ name: `HASHES at ${p}`, bytes: encodeFrame(FrameType.HASHES, Buffer.alloc(16), 0, p) })),
  fc
    .record({
      page: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      count: fc.integer({ min: 0, max: 0xffffffff }),
      range: fc.integer({ min: 0, max: 65535 }),
    })
    .filter(
      ({ page, count, range }) =>
        range > 0 || count === 0 || page >= BigInt(PAGES) || page + BigInt(count) > BigInt(PAGES),
    )
    .map(({ page, count, range }) => {
      const b = Buffer.alloc(16)
      b.writeUInt16LE(range, 0)
      b.writeUInt32LE(count, 4)
      b.writeBigUInt64LE(page, 8)
      return { name: `DISCARD ${range}:${page}+${count}`, bytes: encodeFrame(FrameType.DISCARD, b) }
    }),
  fc
    .integer({ min: 1, max: 15 })
    .map((n) => ({ name: `DISCARD of ${n} bytes`, bytes: encodeFrame(FrameType.DISCARD, Buffer.alloc(n)) })),
  fc
    .integer({ min: 0, max: 255 })
    .filter((t) => !Object.values(FrameType).includes(t as never) || t < 0x10)
    .map((t) => ({ name: `type 0x${t.toString(16)}`, bytes: encodeFrame(t, Buffer.alloc(8)) })),
  fc
    .integer({ min: 1, max: 255 })
    .map((f) => ({ name: `flags ${f}`, bytes: raw(FrameType.PING, 8, 0, 0n, Buffer.alloc(8), f) })),
  fc
    .integer({ min: 0, max: 64 })
    .filter((n) => n !== 8)
    .map((n) => ({ name: `PING of ${n} bytes`, bytes: encodeFrame(FrameType.PING, Buffer.alloc(n)) })),
  fc.uint8Array({ minLength: 1, maxLength: 64 }).map((b) => ({
    name: 'CONTROL garbage',
    bytes: encodeFrame(FrameType.CONTROL, Buffer.concat([Buffer.from('{'), Buffer.from(b)])),
  })),
)

function expectedContent(frames: Valid[], switched: boolean): Map<number, number> {
  // page -> fill (0: zeros). Before the switchover the last copy wins; after, the first.
  const model = new Map<number, number>()
  for (const f of frames) {
    if (f.kind === 'ping') continue
    for (let p = f.page; p < f.page + f.n; p++) {
      if (switched && model.has(p)) continue
      model.set(p, f.kind === 'pages' ? f.fill : 0)
    }
  }
  return model
}

function framesOf(frames: Valid[]): Buffer {
  return Buffer.concat(
    frames.map((f) => {
      if (f.kind === 'pages') return encodeFrame(FrameType.PAGES, Buffer.alloc(f.n * PAGE, f.fill), 0, BigInt(f.page))
      if (f.kind === 'zero') return encodeFrame(FrameType.ZERO, u64(BigInt(f.n)), 0, BigInt(f.page))
      return encodeFrame(FrameType.PING, Buffer.alloc(8))
    }),
  )
}

describe('hostile frames against the target (native parser)', () => {
  it('every attack: ProtocolError, connection dropped, nothing written outside the range, valid frames landed', {
    timeout: 120_000 * timeScale,
  }, async () => {
    // The range sits between PROT_NONE guard pages: a write past either end cannot go unnoticed.
    const guarded = Mapping.anonymous((PAGES + 2) * PAGE)
    guarded.protect('none', 0, PAGE)
    guarded.protect('none', (PAGES + 1) * PAGE, PAGE)
    const range = { address: guarded.address + BigInt(PAGE), length: PAGES * PAGE }
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.array(valid, { maxLength: 8 }),
          fc.boolean(),
          attackOnTarget,
          async (before, switched, attack) => {
            guarded.write(PAGE, Buffer.alloc(PAGES * PAGE, 0xee))
            const target = await MigrationTarget.listen({
              secret: SECRET,
              memory: () => [range],
              heartbeatTimeoutMs: 5000,
            })
            const errors: Error[] = []
            target.on('error', (e) => errors.push(e))
            let resumed = false
            target.on('resume', () => {
              resumed = true
            })
            const fake = await fakeSource(target.address, {
              mode: switched ? 'postcopy' : 'hybrid',
              ranges: [{ length: PAGES * PAGE, pageSize: PAGE, kind: 'anonymous' }],
            })
            try {
              if (switched) {
                control(fake.main, { t: 'switchover', toCome: PAGES })
                await until(() => resumed, 5000, 'resume')
              }
              fake.main.socket.write(framesOf(before))
              fake.main.socket.write(attack.bytes)
              await until(() => errors.length > 0, 5000, `an error for ${attack.name}`)
              expect(errors[0], attack.name).toBeInstanceOf(ProtocolError)
              expect(
                errors.every(
                  (e) => e instanceof ProtocolError || /source is gone|lost before the switchover/.test(e.message),
                ),
                errors.map((e) => e.message).join('; '),
              ).toBe(true)
              // The connection is dropped: the fake source sees it closed.
              await until(
                () => fake.main.socket.destroyed || fake.main.socket.readableEnded,
                5000,
                'the connection to close',
              )
              const model = expectedContent(before, switched)
              const page = Buffer.alloc(PAGE)
              for (let p = 0; p < PAGES; p++) {
                const want = model.get(p)
                if (switched && want === undefined) continue // not installed: reading would fault
                guarded.read(PAGE + p * PAGE, page)
                // Memory handed to the target keeps its old contents until a page arrives (pre-copy
                // overwrites every page); in post-copy it is dropped first.
                const fill = want ?? (switched ? 0 : 0xee)
                expect(
                  page.every((b) => b === fill),
                  `page ${p} after ${attack.name}`,
                ).toBe(true)
              }
            } finally {
              fake.close()
              target.close()
            }
          },
        ),
        { numRuns: 150 },
      )
    } finally {
      guarded.unmap()
    }
  })

  it('garbage instead of a handshake is rejected, and the target still takes a good source after it', {
    timeout: 60_000 * timeScale,
  }, async () => {
    const target = await MigrationTarget.listen({ secret: SECRET, handshakeTimeoutMs: 300 })
    const rejected: Error[] = []
    target.on('rejected', (e) => rejected.push(e))
    try {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 200 }), async (bytes) => {
          const before = rejected.length
          const s = net.connect(target.address.port, target.address.host)
          s.on('error', () => {})
          await new Promise((r) => s.once('connect', r))
          s.write(bytes)
          await until(() => rejected.length > before, 5000, 'the garbage to be rejected')
          s.destroy()
        }),
        { numRuns: 25 },
      )
      expect(target.phase).toBe('listening')
      const fake = await fakeSource(target.address, {
        mode: 'postcopy',
        ranges: [{ length: PAGE, pageSize: PAGE, kind: 'anonymous' }],
      })
      expect(target.phase).toBe('precopy')
      fake.close()
    } finally {
      target.close()
      unmapAll(target)
    }
  })
})

/** Frames a target must never send to a source. */
const attackOnSource: fc.Arbitrary<{ name: string; bytes: Buffer }> = fc.oneof(
  fc.constant({ name: 'PAGES to the source', bytes: encodeFrame(FrameType.PAGES, Buffer.alloc(PAGE), 0, 0n) }),
  fc.constant({ name: 'REQUEST on the main channel', bytes: encodeFrame(FrameType.REQUEST, u64(1n), 0, 0n) }),
  fc.constant({ name: 'DISCARD to the source', bytes: encodeFrame(FrameType.DISCARD, Buffer.alloc(16)) }),
  fc
    .integer({ min: 1, max: 65535 })
    .map((r) => ({ name: `HAVE range ${r}`, bytes: encodeFrame(FrameType.HAVE, Buffer.alloc(1), r, 0n) })),
  fc
    .bigInt({ min: BigInt(PAGES), max: (1n << 64n) - 8n })
    .map((p) => ({ name: `HAVE at ${p}`, bytes: encodeFrame(FrameType.HAVE, Buffer.alloc(1), 0, (p / 8n) * 8n) })),
  fc
    .integer({ min: 1, max: 7 })
    .map((p) => ({ name: `HAVE at ${p}`, bytes: encodeFrame(FrameType.HAVE, Buffer.alloc(1), 0, BigInt(p)) })),
  fc
    .integer({ min: 3, max: 4096 })
    .map((n) => ({ name: `HAVE of ${n} bytes`, bytes: encodeFrame(FrameType.HAVE, Buffer.alloc(n), 0, 0n) })),
  fc
    .integer({ min: 0x30, max: 255 })
    .map((t) => ({ name: `type 0x${t.toString(16)}`, bytes: encodeFrame(t, Buffer.alloc(4)) })),
  fc
    .integer({ min: 65537, max: 0xffffffff })
    .map((n) => ({ name: `CONTROL claiming ${n} bytes`, bytes: raw(FrameType.CONTROL, n, 0, 0n, Buffer.alloc(16)) })),
  fc.constant({ name: 'CONTROL not JSON', bytes: encodeFrame(FrameType.CONTROL, Buffer.from('not json')) }),
  fc.constant({ name: 'CONTROL without a type', bytes: encodeFrame(FrameType.CONTROL, encodeJson({ x: 1 })) }),
)

describe('hostile frames against the source (native parser)', () => {
  it('every attack: ProtocolError, the migration fails before the switchover, the workload resumes', {
    timeout: 120_000 * timeScale,
  }, async () => {
    if (!canPrecopy('anonymous')) return
    const memory = Mapping.anonymous(PAGES * PAGE)
    try {
      await fc.assert(
        fc.asyncProperty(attackOnSource, async (attack) => {
          const fake = await fakeTarget((conn) => {
            // Swallow what the source sends; attack once the pre-copy began.
            conn.socket.resume()
            setTimeout(() => conn.socket.write(attack.bytes), 20)
          })
          const errors: Error[] = []
          let resumed = 0
          const source = new MigrationSource({
            ranges: [memory],
            to: { host: '127.0.0.1', port: fake.port },
            secret: SECRET,
            stop: () => new Promise((r) => setTimeout(r, 200)),
            resume: () => {
              resumed++
            },
            heartbeatTimeoutMs: 5000,
          })
          source.on('error', (e) => errors.push(e))
          try {
            await expect(source.start()).rejects.toThrow(/lost before the switchover/)
            expect(
              errors.some((e) => e instanceof ProtocolError),
              `${attack.name}: ${errors.map((e) => e.message).join('; ')}`,
            ).toBe(true)
            expect(resumed).toBeLessThanOrEqual(1)
          } finally {
            source.close()
            fake.close()
          }
        }),
        { numRuns: 40 },
      )
    } finally {
      memory.unmap()
    }
  })
})
