// The migration wire protocol, version 1 (docs/migration.md is the reference).
//
// Every frame: a 16-byte little-endian header, then `length` payload bytes.
//   u8 type | u8 flags (0) | u16 range | u32 length | u64 page
// The handshake frames (HELLO .. ACCEPT) are parsed here, in TypeScript; after the handshake the
// sockets belong to the native sessions, whose C++ parser (native/engine/migration_wire.h) checks
// the same rules. Everything a peer sends is untrusted: a frame that breaks a rule is a
// ProtocolError and the connection is dropped.
import type { MemoryKind } from '../engines/dirty-tracker'
import { ProtocolError } from '../firecracker/protocol'

export { ProtocolError }

export const PROTOCOL_VERSION = 1
export const MAGIC = Buffer.from('uffd-mig', 'latin1')
export const HEADER_SIZE = 16
export const NONCE_SIZE = 32
export const MAC_SIZE = 32

export const FrameType = Object.freeze({
  HELLO: 0x01,
  CHALLENGE: 0x02,
  AUTH: 0x03,
  AUTH_OK: 0x04,
  REJECT: 0x05,
  SETUP: 0x06,
  ACCEPT: 0x07,
  PAGES: 0x10,
  ZERO: 0x11,
  REQUEST: 0x12,
  DISCARD: 0x13,
  HAVE: 0x14,
  HASHES: 0x15,
  CONTROL: 0x20,
  PING: 0x21,
  PONG: 0x22,
} as const)
export type FrameTypeName = keyof typeof FrameType

const NAMES = new Map<number, string>(Object.entries(FrameType).map(([k, v]) => [v, k]))

export function frameName(type: number): string {
  return NAMES.get(type) ?? `0x${type.toString(16).padStart(2, '0')}`
}

/** Largest payload of each frame type (bytes); anything larger is a ProtocolError. */
export const MAX_PAYLOAD: Readonly<Record<number, number>> = Object.freeze({
  [FrameType.HELLO]: 16,
  [FrameType.CHALLENGE]: 48,
  [FrameType.AUTH]: 64,
  [FrameType.AUTH_OK]: 32,
  [FrameType.REJECT]: 4096,
  [FrameType.SETUP]: 65536,
  [FrameType.ACCEPT]: 65536,
  [FrameType.PAGES]: 4 << 20,
  [FrameType.ZERO]: 8,
  [FrameType.REQUEST]: 8,
  [FrameType.DISCARD]: 1 << 20,
  [FrameType.HAVE]: 1 << 20,
  [FrameType.HASHES]: 1 << 20,
  [FrameType.CONTROL]: 65536,
  [FrameType.PING]: 8,
  [FrameType.PONG]: 8,
})

/** Exact payload sizes of the fixed-size frames. */
const EXACT: Readonly<Record<number, number>> = Object.freeze({
  [FrameType.HELLO]: 16,
  [FrameType.CHALLENGE]: 48,
  [FrameType.AUTH]: 64,
  [FrameType.AUTH_OK]: 32,
  [FrameType.ZERO]: 8,
  [FrameType.REQUEST]: 8,
  [FrameType.PING]: 8,
  [FrameType.PONG]: 8,
})

export interface FrameHeader {
  type: number
  flags: number
  range: number
  length: number
  page: bigint
}

export interface Frame extends FrameHeader {
  payload: Buffer
}

export function encodeHeader(h: Omit<FrameHeader, 'flags'> & { flags?: number }): Buffer {
  const b = Buffer.alloc(HEADER_SIZE)
  b.writeUInt8(h.type, 0)
  b.writeUInt8(h.flags ?? 0, 1)
  b.writeUInt16LE(h.range, 2)
  b.writeUInt32LE(h.length, 4)
  b.writeBigUInt64LE(h.page, 8)
  return b
}

export function decodeHeader(b: Uint8Array, offset = 0): FrameHeader {
  const v = Buffer.from(b.buffer, b.byteOffset + offset, HEADER_SIZE)
  return {
    type: v.readUInt8(0),
    flags: v.readUInt8(1),
    range: v.readUInt16LE(2),
    length: v.readUInt32LE(4),
    page: v.readBigUInt64LE(8),
  }
}

export function encodeFrame(type: number, payload: Uint8Array = Buffer.alloc(0), range = 0, page = 0n): Buffer {
  return Buffer.concat([encodeHeader({ type, range, length: payload.byteLength, page }), payload])
}

/** Rules every header obeys whatever the phase: known type, flags 0, payload within bounds. */
export function checkHeader(h: FrameHeader): void {
  if (h.flags !== 0) throw new ProtocolError(`${frameName(h.type)} frame with flags 0x${h.flags.toString(16)}`)
  const max = MAX_PAYLOAD[h.type]
  if (max === undefined) throw new ProtocolError(`unknown frame type ${frameName(h.type)}`)
  if (h.length > max) throw new ProtocolError(`${frameName(h.type)} payload of ${h.length} bytes exceeds ${max}`)
  const exact = EXACT[h.type]
  if (exact !== undefined && h.length !== exact)
    throw new ProtocolError(`${frameName(h.type)} payload must be ${exact} bytes (got ${h.length})`)
}

/**
 * Splits a byte stream into frames. push() bytes as they arrive; next() returns a whole frame or
 * undefined (more bytes needed). A header that breaks a rule throws ProtocolError at once, before
 * its payload is waited for (an oversize length cannot make it buffer gigabytes).
 */
export class FrameParser {
  #chunks: Buffer[] = []
  #buffered = 0
  #header: FrameHeader | undefined

  get buffered(): number {
    return this.#buffered
  }

  push(bytes: Uint8Array): void {
    if (bytes.byteLength === 0) return
    this.#chunks.push(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength))
    this.#buffered += bytes.byteLength
  }

  next(): Frame | undefined {
    if (this.#header === undefined) {
      if (this.#buffered < HEADER_SIZE) return undefined
      const h = decodeHeader(this.#take(HEADER_SIZE))
      checkHeader(h)
      this.#header = h
    }
    const h = this.#header
    if (this.#buffered < h.length) return undefined
    this.#header = undefined
    return { ...h, payload: this.#take(h.length) }
  }

  /** Bytes received beyond the last frame taken (and the header waiting for its payload). */
  rest(): Buffer {
    const out = Buffer.concat(this.#chunks)
    this.#chunks = []
    this.#buffered = 0
    return this.#header === undefined ? out : Buffer.concat([encodeHeader(this.#header), out])
  }

  #take(n: number): Buffer {
    const all = this.#chunks.length === 1 ? this.#chunks[0] : Buffer.concat(this.#chunks)
    const out = Buffer.from(all.subarray(0, n))
    const rest = all.subarray(n)
    this.#chunks = rest.byteLength > 0 ? [rest] : []
    this.#buffered -= n
    return out
  }
}

// ---- handshake payloads -------------------------------------------------------------------

export type ChannelKind = 'main' | 'demand'

export interface Hello {
  versionMin: number
  versionMax: number
  channel: ChannelKind
  /** the sender holds a secret (and will prove it) */
  auth: boolean
}

export function encodeHello(h: Hello): Buffer {
  const b = Buffer.alloc(16)
  MAGIC.copy(b, 0)
  b.writeUInt16LE(h.versionMin, 8)
  b.writeUInt16LE(h.versionMax, 10)
  b.writeUInt8(h.channel === 'main' ? 0 : 1, 12)
  b.writeUInt8(h.auth ? 1 : 0, 13)
  return b
}

export function decodeHello(p: Buffer): Hello {
  if (!p.subarray(0, 8).equals(MAGIC)) throw new ProtocolError('HELLO without the protocol magic: not a migration peer')
  const versionMin = p.readUInt16LE(8)
  const versionMax = p.readUInt16LE(10)
  const channel = p.readUInt8(12)
  const auth = p.readUInt8(13)
  if (versionMin > versionMax || versionMin === 0)
    throw new ProtocolError(`HELLO with bad versions ${versionMin}..${versionMax}`)
  if (channel > 1) throw new ProtocolError(`HELLO with unknown channel ${channel}`)
  if (auth > 1 || p.readUInt16LE(14) !== 0) throw new ProtocolError('HELLO with reserved bits set')
  return { versionMin, versionMax, channel: channel === 0 ? 'main' : 'demand', auth: auth === 1 }
}

export interface Challenge {
  version: number
  /** the target requires the peer to authenticate */
  auth: boolean
  nonce: Buffer
}

export function encodeChallenge(c: Challenge): Buffer {
  const b = Buffer.alloc(48)
  MAGIC.copy(b, 0)
  b.writeUInt16LE(c.version, 8)
  b.writeUInt8(c.auth ? 1 : 0, 10)
  c.nonce.copy(b, 16)
  return b
}

export function decodeChallenge(p: Buffer): Challenge {
  if (!p.subarray(0, 8).equals(MAGIC))
    throw new ProtocolError('CHALLENGE without the protocol magic: not a migration peer')
  const version = p.readUInt16LE(8)
  const auth = p.readUInt8(10)
  if (auth > 1 || p.readUInt8(11) !== 0 || p.readUInt32LE(12) !== 0)
    throw new ProtocolError('CHALLENGE with reserved bits set')
  return { version, auth: auth === 1, nonce: Buffer.from(p.subarray(16, 48)) }
}

// ---- JSON payloads (SETUP, ACCEPT, REJECT, CONTROL) ----------------------------------------

export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8')
}

/** A JSON object payload; anything else (not JSON, an array, a primitive) is a ProtocolError. */
export function decodeJson(p: Buffer, what: string): Record<string, unknown> {
  let v: unknown
  try {
    v = JSON.parse(p.toString('utf8'))
  } catch (err) {
    throw new ProtocolError(`${what}: not JSON (${(err as Error).message})`)
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new ProtocolError(`${what}: not a JSON object`)
  return v as Record<string, unknown>
}

export type { MemoryKind }

export interface MigrationRangeInfo {
  length: number
  pageSize: number
  kind: MemoryKind
}

export type MigrationMode = 'precopy' | 'postcopy' | 'hybrid'

export interface Setup {
  session: string
  channel: ChannelKind
  /** a reconnect of a session in post-copy */
  resume: boolean
  mode: MigrationMode
  ranges: MigrationRangeInfo[]
  verify: boolean
  metadata: unknown
}

const KINDS: readonly MemoryKind[] = ['anonymous', 'shmem', 'hugetlb']
const MODES: readonly MigrationMode[] = ['precopy', 'postcopy', 'hybrid']
/** Page sizes a range may have: 4 KiB and the 2 MiB huge page. */
export const PAGE_SIZES: readonly number[] = [4096, 2 * 1024 * 1024]
const MAX_RANGES = 4096
const MAX_TOTAL = 2 ** 50

export function decodeSetup(p: Buffer): Setup {
  const o = decodeJson(p, 'SETUP')
  const session = o.session
  if (typeof session !== 'string' || !/^[0-9a-f]{32}$/.test(session))
    throw new ProtocolError('SETUP: session must be 32 hex digits')
  const channel = o.channel
  if (channel !== 'main' && channel !== 'demand') throw new ProtocolError('SETUP: channel must be main or demand')
  const resume = o.resume === true
  if (o.resume !== undefined && typeof o.resume !== 'boolean')
    throw new ProtocolError('SETUP: resume must be a boolean')
  const mode = o.mode
  if (!MODES.includes(mode as MigrationMode)) throw new ProtocolError(`SETUP: unknown mode ${String(mode)}`)
  if (!Array.isArray(o.ranges) || o.ranges.length === 0 || o.ranges.length > MAX_RANGES)
    throw new ProtocolError(`SETUP: ranges must be an array of 1..${MAX_RANGES}`)
  let total = 0
  const ranges = o.ranges.map((r: unknown, i: number): MigrationRangeInfo => {
    if (r === null || typeof r !== 'object') throw new ProtocolError(`SETUP: range ${i} is not an object`)
    const { length, pageSize, kind } = r as Record<string, unknown>
    if (typeof pageSize !== 'number' || !PAGE_SIZES.includes(pageSize))
      throw new ProtocolError(`SETUP: range ${i} has page size ${String(pageSize)}`)
    if (typeof length !== 'number' || !Number.isSafeInteger(length) || length <= 0 || length % pageSize !== 0)
      throw new ProtocolError(`SETUP: range ${i} length must be a positive multiple of its page size`)
    if (!KINDS.includes(kind as MemoryKind)) throw new ProtocolError(`SETUP: range ${i} has kind ${String(kind)}`)
    if ((kind === 'hugetlb') !== (pageSize !== 4096))
      throw new ProtocolError(`SETUP: range ${i}: hugetlb ranges (only) have huge pages`)
    total += length
    return { length, pageSize, kind: kind as MemoryKind }
  })
  if (total > MAX_TOTAL) throw new ProtocolError('SETUP: ranges too large')
  if (o.verify !== undefined && typeof o.verify !== 'boolean')
    throw new ProtocolError('SETUP: verify must be a boolean')
  return {
    session,
    channel,
    resume,
    mode: mode as MigrationMode,
    ranges,
    verify: o.verify === true,
    metadata: o.metadata,
  }
}

export interface Reject {
  code: string
  message: string
}

export function decodeReject(p: Buffer): Reject {
  const o = decodeJson(p, 'REJECT')
  return {
    code: typeof o.code === 'string' ? o.code.slice(0, 64) : 'EPROTO',
    message: typeof o.message === 'string' ? o.message.slice(0, 1024) : 'rejected',
  }
}

/** A page run: `count` pages from `page` of range `range`. */
export interface PageRun {
  range: number
  page: number
  count: number
}

/** DISCARD payload: 16 bytes per run (u16 range, u16 0, u32 count, u64 page). */
export function encodeRuns(runs: readonly PageRun[]): Buffer[] {
  const out: Buffer[] = []
  const per = (MAX_PAYLOAD[FrameType.DISCARD] ?? 16) / 16
  for (let i = 0; i < runs.length; i += per) {
    const slice = runs.slice(i, i + per)
    // Typed-array stores, no method calls and no BigInt: this runs once, cold (not compiled
    // yet), in the downtime. x86_64 and arm64 Linux are little-endian, as the protocol is.
    const b = Buffer.alloc(slice.length * 16)
    const w = new Uint32Array(b.buffer, b.byteOffset, slice.length * 4)
    for (let k = 0; k < slice.length; k++) {
      const r = slice[k]
      w[k * 4] = r.range // u16 range, u16 0
      w[k * 4 + 1] = r.count
      w[k * 4 + 2] = r.page % 0x100000000
      w[k * 4 + 3] = Math.floor(r.page / 0x100000000)
    }
    out.push(b)
  }
  return out
}

/** Runs as the native sessions take them: a Float64Array of [range, page, count] triples. */
export function runsArray(runs: readonly PageRun[]): Float64Array {
  const a = new Float64Array(runs.length * 3)
  for (let i = 0; i < runs.length; i++) {
    a[i * 3] = runs[i].range
    a[i * 3 + 1] = runs[i].page
    a[i * 3 + 2] = runs[i].count
  }
  return a
}
