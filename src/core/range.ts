// Turning user input (Mapping, { address, length }, bigint) into checked address ranges.
// Every check here exists so that bad input gets a TypeError/RangeError that says what was
// wrong, instead of a kernel EINVAL or worse.
import { types } from 'node:util'
import { PAGE_SIZE } from './constants'
import { uffdError } from './errors'

const U64_MAX = (1n << 64n) - 1n
const PAGE = BigInt(PAGE_SIZE)

/** Anything with a start address and a length: a Mapping, or a plain object. */
export interface RangeLike {
  /** Start address. */
  address: bigint
  /** Length in bytes. */
  length: number | bigint
}

/** A checked range: page-aligned, non-empty, inside the 64-bit address space. */
export interface Range {
  /** Start address (page-aligned). */
  address: bigint
  /** Length in bytes (a multiple of the page size). */
  length: number
}

export function toAddress(value: unknown, what: string): bigint {
  if (typeof value === 'bigint') {
    if (value < 0n || value > U64_MAX) throw new RangeError(`${what} must fit in 64 bits (got ${value})`)
    return value
  }
  if (value !== null && typeof value === 'object' && typeof (value as RangeLike).address === 'bigint') {
    checkMapped(value, what)
    return toAddress((value as RangeLike).address, what)
  }
  if (typeof value === 'number') {
    throw new TypeError(`${what} must be a bigint (got the number ${value}; write ${what} as BigInt(x) or 0x...n)`)
  }
  throw new TypeError(`${what} must be a bigint address or a Mapping (got ${describe(value)})`)
}

export function toLength(value: unknown, what: string): number {
  if (typeof value === 'bigint') {
    if (value <= 0n) throw new RangeError(`${what} must be > 0 (got ${value})`)
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`${what} is too large (got ${value})`)
    return Number(value)
  }
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) throw new RangeError(`${what} must be an integer (got ${value})`)
    if (value <= 0) throw new RangeError(`${what} must be > 0 (got ${value})`)
    return value
  }
  throw new TypeError(`${what} must be a number or a bigint (got ${describe(value)})`)
}

// An unmapped Mapping still knows its address, which another mapping may own by now.
function checkMapped(value: object, what: string): void {
  if ((value as { unmapped?: unknown }).unmapped === true) throw uffdError('EBADF', what, 'the mapping was unmapped')
}

export function checkAligned(address: bigint, length: number, what: string, page = PAGE_SIZE): void {
  const p = BigInt(page)
  if (address % p !== 0n) {
    throw new RangeError(`${what}: address 0x${address.toString(16)} is not aligned to the page size (${page})`)
  }
  if (length % page !== 0) {
    throw new RangeError(`${what}: length ${length} is not a multiple of the page size (${page})`)
  }
  if (address + BigInt(length) - 1n > U64_MAX) throw new RangeError(`${what}: range wraps past 2^64`)
}

/** Normalizes a Mapping or { address, length } into a checked, page-aligned range. */
export function toRange(value: unknown, what = 'range'): Range {
  if (value === null || typeof value !== 'object') {
    throw new TypeError(`${what} must be a Mapping or { address: bigint, length } (got ${describe(value)})`)
  }
  checkMapped(value, what)
  const r = value as RangeLike
  const address = toAddress(r.address, `${what}.address`)
  const length = toLength(r.length, `${what}.length`)
  checkAligned(address, length, what, pageSizeOf(value))
  return { address, length }
}

/** Bytes the addon can read or write. */
export type Bytes = ArrayBuffer | SharedArrayBuffer | ArrayBufferView

/**
 * Caller memory in a form the addon takes: any ArrayBuffer or ArrayBufferView (also from another
 * realm); a SharedArrayBuffer, which Node-API cannot read directly, as a Uint8Array over it.
 * Undefined for anything else.
 */
export function asBytes(value: unknown): ArrayBuffer | ArrayBufferView | undefined {
  if (ArrayBuffer.isView(value)) return value
  if (types.isSharedArrayBuffer(value)) return new Uint8Array(value)
  if (types.isArrayBuffer(value)) return value
  return undefined
}

/** The page size of a Mapping (huge for hugetlb ones); the base page size for anything else. */
export function pageSizeOf(value: unknown): number {
  const size = (value as { pageSize?: unknown } | null)?.pageSize
  return typeof size === 'number' && Number.isSafeInteger(size) && size > PAGE_SIZE ? size : PAGE_SIZE
}

/** An options argument: undefined (no options) or a plain object. */
export function checkOptions(options: unknown, what: string): Record<string, unknown> {
  if (options === undefined) return {}
  if (options === null || typeof options !== 'object' || Array.isArray(options))
    throw new TypeError(`${what} options must be an object (got ${describe(options)})`)
  return options as Record<string, unknown>
}

/** A boolean option, `fallback` when absent. */
export function flag(options: Record<string, unknown>, name: string, fallback: boolean): boolean {
  const v = options[name]
  if (v === undefined) return fallback
  if (typeof v !== 'boolean') throw new TypeError(`option '${name}' must be a boolean (got ${describe(v)})`)
  return v
}

export function describe(value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'object') return `an object (${Object.prototype.toString.call(value)})`
  return `${typeof value} ${String(value).slice(0, 40)}`
}

export { PAGE }
