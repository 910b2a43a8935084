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

/** True while `text` could still become valid JSON with more bytes (a stream split it). */
export function isIncompleteJson(text: string): boolean {
  try {
    JSON.parse(text)
    return false
  } catch (err) {
    return /Unexpected end of JSON input|Unterminated string/.test((err as Error).message) || text.trim() === ''
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

/** Parses and validates the handshake; regions come back sorted by address. */
export function parseRegions(text: string, options: ParseOptions): GuestRegion[] {
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
