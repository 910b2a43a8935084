// Per-page hashes of memory, the way a migration checks itself (native/engine/page_hash.h).
import { native } from '../addon/native'
import { Mapping } from '../core/mapping'
import { toRange, type RangeLike } from '../core/range'
import { describe, optionalInt } from '../util/validate'

const hashes = native.pageHashes

/**
 * One 64-bit hash per page of `range` (not cryptographic: it tells pages apart, it does not
 * resist forgery). `mask` leaves bytes [maskOffset, maskOffset + maskLength) of every page out.
 * Reads every page: do not call it on memory whose faults this thread must resolve.
 */
export function pageHashes(
  range: Mapping | RangeLike,
  options: { pageSize?: number; maskOffset?: number; maskLength?: number } = {},
): BigUint64Array {
  if (options === null || typeof options !== 'object')
    throw new TypeError(`options must be an object (got ${describe(options)})`)
  const r = toRange(range)
  const pageSize =
    range instanceof Mapping ? range.pageSize : optionalInt(options.pageSize, 'pageSize', 4096, 4096, 2 ** 30)
  const maskOffset = optionalInt(options.maskOffset, 'maskOffset', 0, 0, pageSize)
  const maskLength = optionalInt(options.maskLength, 'maskLength', 0, 0, pageSize)
  return hashes(r.address, r.length, pageSize, maskOffset, maskLength)
}
