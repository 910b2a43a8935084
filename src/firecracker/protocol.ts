// The Firecracker page-fault handler handshake: on connect, Firecracker sends ONE message, a
// JSON array of guest memory regions, with the uffd attached:
//   [{ "base_host_virt_addr": 140..., "size": 134217728, "offset": 0,
//      "page_size": 4096, "page_size_kib": 4 }]
// base_host_virt_addr: where the region is mapped in Firecracker's address space; size and
// page_size in BYTES; offset: the region's offset in the memory snapshot file. page_size_kib is
// what older senders send instead of page_size, and despite its name Firecracker puts BYTES in
// it (4096, not 4): a value that is a known page size is taken as bytes; a sender that took the
// name literally (4, 2048) is understood too (the two readings can never collide).
//
// Everything here is untrusted input from another process: each check has a message that says
// which region and which field was wrong.

import { describe } from '../util/validate'

/** One region of guest memory a peer declared, checked. */
export interface GuestRegion {
  /** index in the message */
  index: number
  /** start address in the peer's address space */
  base: bigint
  /** one past the last byte */
  end: bigint
  /** Length in bytes. */
  size: number
  /** offset of the region in the snapshot file */
  offset: number
  /** The region's page size (4 KiB, or a huge page size). */
  pageSize: number
}

/** A peer broke Firecracker's handshake protocol (it ends that connection only). */
export class ProtocolError extends Error {
  /** Always 'EPROTO'. */
  readonly code = 'EPROTO'
  constructor(message: string) {
    super(message)
    this.name = 'ProtocolError'
  }
}

/** Options of parseRegions(). */
export interface ParseOptions {
  /** snapshot file size: every region must lie inside it */
  fileSize: number
  /** default 1024 */
  maxRegions?: number
  /** page sizes accepted (default: 4 KiB and the huge page sizes 64 KiB..1 GiB, powers of two) */
  pageSizes?: readonly number[]
}

const DEFAULT_PAGE_SIZES = [
  4096,
  16384,
  65536,
  2 * 1024 * 1024,
  32 * 1024 * 1024,
  512 * 1024 * 1024,
  1024 * 1024 * 1024,
]

/**
 * A handshake wire format: how to tell from its bytes alone that a message is complete (a stream
 * socket may deliver it in any number of pieces, split anywhere, even inside a multibyte
 * character), and how to parse the complete message. The Firecracker handler speaks
 * `firecrackerHandshake`; another format (a later Firecracker version, another VMM) plugs in as
 * another WireFormat, and the property tests (test/protocol-properties.test.ts) run on every
 * entry of `wireFormats`.
 */
export interface WireFormat<T, O> {
  readonly name: string
  /** A framer for one message. */
  framer(): Framer
  /** Parses a complete message (every byte received, decoded once); throws ProtocolError. */
  parse(bytes: Uint8Array, options: O): T
}

export interface Framer {
  /**
   * Feeds the next bytes. True once the message is complete: the bytes seen form a whole message
   * (bytes after its end belong to the message too; parse() judges them). Throws ProtocolError
   * as soon as the bytes can no longer begin a valid message, so garbage fails at once instead
   * of waiting for the handshake timeout.
   */
  push(chunk: Uint8Array): boolean
}

enum Mode {
  Value, // a value must come (after '[' also ']': #emptyOk)
  Key, // an object key must come (after '{' also '}': #emptyOk)
  Colon,
  After, // after a value: ',' or the closer of the innermost container
  String,
  Escape,
  Unicode,
  Number,
  Literal,
  Done,
}

// Number states: after '-', a leading 0, integer digits, '.', fraction digits, e/E, exponent
// sign, exponent digits. Those marked * may end the number.
enum Num {
  Minus,
  Zero, // *
  Int, // *
  Dot,
  Frac, // *
  E,
  ESign,
  Exp, // *
}

const MAX_DEPTH = 64

function isWhitespace(b: number): boolean {
  return b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d
}
function isDigit(b: number): boolean {
  return b >= 0x30 && b <= 0x39
}
function isHex(b: number): boolean {
  return isDigit(b) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66)
}
function showByte(b: number): string {
  return b >= 0x21 && b <= 0x7e ? `'${String.fromCharCode(b)}'` : `byte 0x${b.toString(16).padStart(2, '0')}`
}

/**
 * Frames one JSON text by the JSON grammar (RFC 8259), on bytes, as they arrive: complete when
 * the top-level array or object closes; a byte that no valid JSON text could have there is a
 * ProtocolError at once. A top-level scalar (no handshake is one) completes at its first byte,
 * for parse() to refuse. Every byte of a multibyte UTF-8 character is >= 0x80, which the grammar
 * only admits inside strings, so a piece boundary inside a character changes nothing, and
 * nothing is decoded until the message is whole.
 */
export class JsonFramer implements Framer {
  readonly #stack: number[] = [] // 0x5b '[' or 0x7b '{'
  #mode = Mode.Value
  #emptyOk = false
  #isKey = false
  #num = Num.Minus
  #pending = '' // the rest of a literal (true, false, null)
  #hex = 0
  #offset = 0

  push(chunk: Uint8Array): boolean {
    for (let i = 0; i < chunk.length && this.#mode !== Mode.Done; i++, this.#offset++) this.#byte(chunk[i])
    return this.#mode === Mode.Done
  }

  #fail(b: number, why = ''): never {
    throw new ProtocolError(`malformed JSON at byte ${this.#offset}: unexpected ${showByte(b)}${why}`)
  }

  #valueEnded(): void {
    this.#mode = this.#stack.length === 0 ? Mode.Done : Mode.After
  }

  #open(b: number): void {
    if (this.#stack.length === MAX_DEPTH) this.#fail(b, ` (nested deeper than ${MAX_DEPTH})`)
    this.#stack.push(b)
    this.#mode = b === 0x5b ? Mode.Value : Mode.Key
    this.#emptyOk = true
  }

  #close(): void {
    this.#stack.pop()
    this.#valueEnded()
  }

  #byte(b: number): void {
    switch (this.#mode) {
      case Mode.Value:
        if (isWhitespace(b)) return
        if (this.#stack.length === 0 && b !== 0x5b && b !== 0x7b) {
          this.#mode = Mode.Done // a top-level scalar: parse() refuses it
          return
        }
        if (b === 0x5b || b === 0x7b) {
          this.#open(b)
          return
        }
        if (b === 0x5d && this.#emptyOk) {
          this.#close()
          return
        }
        this.#emptyOk = false
        if (b === 0x22) {
          this.#mode = Mode.String
          this.#isKey = false
        } else if (b === 0x2d || isDigit(b)) {
          this.#mode = Mode.Number
          this.#num = b === 0x2d ? Num.Minus : b === 0x30 ? Num.Zero : Num.Int
        } else if (b === 0x74 || b === 0x66 || b === 0x6e) {
          this.#mode = Mode.Literal
          this.#pending = b === 0x74 ? 'rue' : b === 0x66 ? 'alse' : 'ull'
        } else {
          this.#fail(b, ' (a value was expected)')
        }
        return
      case Mode.Key:
        if (isWhitespace(b)) return
        if (b === 0x7d && this.#emptyOk) {
          this.#close()
          return
        }
        if (b !== 0x22) this.#fail(b, ' (a quoted key was expected)')
        this.#mode = Mode.String
        this.#isKey = true
        return
      case Mode.Colon:
        if (isWhitespace(b)) return
        if (b !== 0x3a) this.#fail(b, " (':' was expected)")
        this.#mode = Mode.Value
        this.#emptyOk = false
        return
      case Mode.After: {
        if (isWhitespace(b)) return
        const top = this.#stack[this.#stack.length - 1]
        if (b === 0x2c) {
          this.#mode = top === 0x5b ? Mode.Value : Mode.Key
          this.#emptyOk = false
        } else if ((b === 0x5d && top === 0x5b) || (b === 0x7d && top === 0x7b)) {
          this.#close()
        } else {
          this.#fail(b, ` (',' or '${top === 0x5b ? ']' : '}'}' was expected)`)
        }
        return
      }
      case Mode.String:
        if (b === 0x22) {
          if (this.#isKey) this.#mode = Mode.Colon
          else this.#valueEnded()
        } else if (b === 0x5c) {
          this.#mode = Mode.Escape
        } else if (b < 0x20) {
          this.#fail(b, ' (control characters must be escaped in strings)')
        }
        return
      case Mode.Escape:
        if (b === 0x75) {
          this.#mode = Mode.Unicode
          this.#hex = 4
        } else if ('"\\/bfnrt'.includes(String.fromCharCode(b))) {
          this.#mode = Mode.String
        } else {
          this.#fail(b, ' (not a string escape)')
        }
        return
      case Mode.Unicode:
        if (!isHex(b)) this.#fail(b, ' (\\u needs 4 hex digits)')
        if (--this.#hex === 0) this.#mode = Mode.String
        return
      case Mode.Number:
        this.#number(b)
        return
      case Mode.Literal:
        if (b !== this.#pending.charCodeAt(0)) this.#fail(b, ' (true, false or null was expected)')
        this.#pending = this.#pending.slice(1)
        if (this.#pending === '') this.#valueEnded()
        return
      case Mode.Done:
        return
    }
  }

  #number(b: number): void {
    const digit = isDigit(b)
    switch (this.#num) {
      case Num.Minus:
        if (!digit) this.#fail(b, ' (a digit was expected)')
        this.#num = b === 0x30 ? Num.Zero : Num.Int
        return
      case Num.Zero:
        if (digit) this.#fail(b, ' (no leading zeros)')
        break
      case Num.Int:
        if (digit) return
        break
      case Num.Dot:
        if (!digit) this.#fail(b, ' (a digit was expected)')
        this.#num = Num.Frac
        return
      case Num.Frac:
        if (digit) return
        break
      case Num.E:
        if (b === 0x2b || b === 0x2d) this.#num = Num.ESign
        else if (digit) this.#num = Num.Exp
        else this.#fail(b, ' (an exponent was expected)')
        return
      case Num.ESign:
        if (!digit) this.#fail(b, ' (a digit was expected)')
        this.#num = Num.Exp
        return
      case Num.Exp:
        if (digit) return
        break
    }
    // Zero, Int, Frac or Exp, and b does not continue the number.
    if (b === 0x2e && (this.#num === Num.Zero || this.#num === Num.Int)) {
      this.#num = Num.Dot
    } else if ((b === 0x65 || b === 0x45) && this.#num !== Num.Exp) {
      this.#num = Num.E
    } else {
      this.#valueEnded()
      this.#byte(b) // the byte after the number: ',', ']', '}' or whitespace
    }
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true })

/** Decodes a complete message once; invalid UTF-8 is a ProtocolError, not U+FFFD. */
export function decodeUtf8(bytes: Uint8Array): string {
  try {
    return utf8.decode(bytes)
  } catch {
    throw new ProtocolError('the message is not valid UTF-8')
  }
}

function field(obj: Record<string, unknown>, name: string, where: string, required: boolean): number | undefined {
  const v = obj[name]
  if (v === undefined || v === null) {
    if (required) throw new ProtocolError(`${where}: missing "${name}"`)
    return undefined
  }
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
    throw new ProtocolError(`${where}: "${name}" must be a non-negative integer (got ${JSON.stringify(v)})`)
  }
  if (!Number.isSafeInteger(v)) throw new ProtocolError(`${where}: "${name}" is too large to be exact (${v})`)
  return v
}

/** The caller's options (not the peer's bytes): a TypeError/RangeError when wrong. */
function checkParseOptions(options: ParseOptions): void {
  if (options === null || typeof options !== 'object')
    throw new TypeError(`parse options must be an object (got ${describe(options)})`)
  const { fileSize, maxRegions, pageSizes } = options
  if (typeof fileSize !== 'number' || !Number.isSafeInteger(fileSize) || fileSize < 0)
    throw new RangeError(`fileSize must be a non-negative integer (got ${describe(fileSize)})`)
  if (
    maxRegions !== undefined &&
    (typeof maxRegions !== 'number' || !Number.isSafeInteger(maxRegions) || maxRegions < 1)
  )
    throw new RangeError(`maxRegions must be a positive integer (got ${describe(maxRegions)})`)
  if (
    pageSizes !== undefined &&
    (!Array.isArray(pageSizes) || !pageSizes.every((p) => typeof p === 'number' && Number.isSafeInteger(p) && p > 0))
  )
    throw new TypeError(`pageSizes must be an array of positive integers (got ${describe(pageSizes)})`)
}

/** Parses and validates the handshake; regions come back sorted by address. */
export function parseRegions(text: string, options: ParseOptions): GuestRegion[] {
  if (typeof text !== 'string') throw new TypeError(`the handshake text must be a string (got ${describe(text)})`)
  checkParseOptions(options)
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (err) {
    throw new ProtocolError(`malformed JSON: ${(err as Error).message}`)
  }
  if (!Array.isArray(value)) throw new ProtocolError('the message must be a JSON array of memory regions')
  const maxRegions = options.maxRegions ?? 1024
  if (value.length === 0) throw new ProtocolError('the message has no memory regions')
  if (value.length > maxRegions) throw new ProtocolError(`too many memory regions (${value.length} > ${maxRegions})`)
  const pageSizes = options.pageSizes ?? DEFAULT_PAGE_SIZES
  const regions: GuestRegion[] = value.map((item, index) => {
    const where = `region ${index}`
    if (item === null || typeof item !== 'object' || Array.isArray(item))
      throw new ProtocolError(`${where}: must be an object`)
    const obj = item as Record<string, unknown>
    const base = field(obj, 'base_host_virt_addr', where, true)!
    const size = field(obj, 'size', where, true)!
    const offset = field(obj, 'offset', where, true)!
    const pageSizeBytes = field(obj, 'page_size', where, false)
    const pageSizeKib = field(obj, 'page_size_kib', where, false)
    if (pageSizeBytes === undefined && pageSizeKib === undefined)
      throw new ProtocolError(`${where}: missing "page_size" (or "page_size_kib")`)
    const legacy =
      pageSizeKib === undefined ? undefined : pageSizes.includes(pageSizeKib) ? pageSizeKib : pageSizeKib * 1024
    if (pageSizeBytes !== undefined && legacy !== undefined && pageSizeBytes !== legacy) {
      throw new ProtocolError(
        `${where}: "page_size" (${pageSizeBytes}) disagrees with "page_size_kib" (${pageSizeKib})`,
      )
    }
    const pageSize = pageSizeBytes ?? legacy!
    if (!pageSizes.includes(pageSize))
      throw new ProtocolError(`${where}: unsupported page size ${pageSize} (accepted: ${pageSizes.join(', ')})`)
    if (size === 0) throw new ProtocolError(`${where}: zero-sized`)
    if (base === 0) throw new ProtocolError(`${where}: base_host_virt_addr is 0`)
    if (base % pageSize !== 0)
      throw new ProtocolError(
        `${where}: base_host_virt_addr 0x${base.toString(16)} is not aligned to its page size ${pageSize}`,
      )
    if (size % pageSize !== 0)
      throw new ProtocolError(`${where}: size ${size} is not a multiple of its page size ${pageSize}`)
    if (offset % pageSize !== 0)
      throw new ProtocolError(`${where}: offset ${offset} is not aligned to its page size ${pageSize}`)
    if (offset + size > options.fileSize) {
      throw new ProtocolError(
        `${where}: [offset ${offset}, +${size}) lies beyond the memory file (${options.fileSize} bytes)`,
      )
    }
    const b = BigInt(base)
    return { index, base: b, end: b + BigInt(size), size, offset, pageSize }
  })
  regions.sort((a, b) => (a.base < b.base ? -1 : a.base > b.base ? 1 : 0))
  for (let i = 1; i < regions.length; i++) {
    if (regions[i].base < regions[i - 1].end) {
      throw new ProtocolError(
        `region ${regions[i].index} overlaps region ${regions[i - 1].index} in the guest address space`,
      )
    }
  }
  return regions
}

/** The region holding `address` (regions sorted by base), or undefined. */
export function findRegion(regions: readonly GuestRegion[], address: bigint): GuestRegion | undefined {
  let lo = 0
  let hi = regions.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >> 1
    const r = regions[mid]
    if (address < r.base) hi = mid - 1
    else if (address >= r.end) lo = mid + 1
    else return r
  }
  return undefined
}

/** Firecracker's handshake: one JSON array of guest memory regions (see the top of this file). */
export const firecrackerHandshake: WireFormat<GuestRegion[], ParseOptions> = {
  name: 'firecracker',
  framer: () => new JsonFramer(),
  parse: (bytes, options) => parseRegions(decodeUtf8(bytes), options),
}

/** Every handshake format the package speaks (the property tests cover each). */
export const wireFormats: ReadonlyArray<WireFormat<unknown, ParseOptions>> = [firecrackerHandshake]
