// Where a served range's bytes come from: the FaultServer's sources, checked and turned into what
// the native engine takes (src/addon/binding.ts FaultEngineSource). New kinds of source (remote
// ones: NBD, HTTP) belong here.
import * as fs from 'node:fs'
import { types } from 'node:util'
import type { FaultEngineSource, ReadMethod } from '../addon/binding'
import { Mapping } from '../core/mapping'
import type { RemoteSpec } from './remote'
import { checkRenamed, choice, describe, func, optionalInt } from '../util/validate'

/** What a { handler } source is asked for: `length` bytes of the range at `address`. */
export interface FaultRequest {
  /** first byte to fill (aligned to the range's page size) */
  address: bigint
  /** the same position as an offset into the source (the range's `offset` + position) */
  offset: number
  /** whole pages of the range (huge pages on hugetlb memory) */
  length: number
  /** true for background prefetch, false for a thread waiting on a fault */
  prefetch: boolean
}

/** Bytes a FaultServer copies from, or a handler hands back: an ArrayBuffer or a view of one. */
export type PageBytes = ArrayBuffer | ArrayBufferView
/** A { handler } source: the bytes of a request, or a promise of them. */
export type FaultHandler = (request: FaultRequest) => PageBytes | Promise<PageBytes>

/**
 * Where a range's bytes come from. `offset`: where in the source the range's first byte is.
 * - `buffer`: an ArrayBuffer or view (copied when serve() is called: nothing done to it later,
 *   detaching included, reaches the engine), a SharedArrayBuffer or a view of one (used in place:
 *   it cannot be detached), or a Mapping (used in place; its unmap() waits until the range is no
 *   longer served);
 * - `file`: a path or an fd, read through a private read-only mmap ('mmap', default) or pread;
 *   `size`: the file's size as you know it (default: its size when served): pages within it
 *   that cannot be read (the file was truncated since) are errors, never zeros;
 * - `zero`: zeros;
 * - `handler`: a JS function, for content only JS can produce;
 * - `nbd`, `url`, `remote`: a remote snapshot (docs/remote-sources.md), fed from JavaScript.
 */
export type FaultSource =
  | { buffer: PageBytes | SharedArrayBuffer | Mapping; offset?: number }
  | { file: string | number; offset?: number; readMethod?: ReadMethod; size?: number }
  | { zero: true }
  | { handler: FaultHandler; offset?: number }
  | RemoteSpec

/** A source as the engine takes it, with what the server must keep or do for it. */
export interface EngineSource {
  spec: FaultEngineSource
  /** where in the source the range's first byte is (for the engine) */
  offset: number
  /** what must stay alive while the engine copies from it */
  keep: unknown
  /** called once the engine has the source (e.g. closes an fd the engine dup'ed) */
  close?: () => void
  /** called once the range is no longer served (a Mapping's unmap() waits for it) */
  release?: () => void
  /** a { handler } source's function */
  handler?: FaultHandler
}

/** Bytes a source or a handler may hand over: an ArrayBuffer or any view. */
export function isBytes(value: unknown): value is PageBytes {
  return value instanceof ArrayBuffer || ArrayBuffer.isView(value)
}

/** Checks `source` for a range of `length` bytes (id `id`) and says how the engine takes it. */
export function engineSource(source: Exclude<FaultSource, RemoteSpec>, length: number, id: number): EngineSource {
  if (source === null || typeof source !== 'object')
    throw new TypeError(`source must be { buffer }, { file }, { zero: true } or { handler } (got ${describe(source)})`)
  checkRenamed(source, { mode: 'readMethod' }, 'FaultServer.serve: the file source')
  const s: Record<string, unknown> = { ...source }
  const offset = optionalInt(s.offset, 'source offset', 0, 0)
  if ('buffer' in s) {
    const b = s.buffer
    if (b instanceof Mapping) {
      if (offset + length > b.length)
        throw new RangeError(`buffer: [${offset}, ${offset + length}) lies outside the mapping (length ${b.length})`)
      const release = b._pin()
      return { spec: { kind: 'memory', address: b.address, length: b.length }, offset, keep: b, release }
    }
    const bytes = types.isSharedArrayBuffer(b) ? new Uint8Array(b) : b
    if (!isBytes(bytes))
      throw new TypeError(
        `buffer must be an ArrayBuffer, a SharedArrayBuffer, a typed array or a Mapping (got ${describe(b)})`,
      )
    if (offset + length > bytes.byteLength)
      throw new RangeError(`buffer: ${bytes.byteLength} bytes cannot cover [${offset}, ${offset + length})`)
    const view = ArrayBuffer.isView(bytes)
      ? new Uint8Array(bytes.buffer, bytes.byteOffset + offset, length)
      : new Uint8Array(bytes, offset, length)
    // A SharedArrayBuffer cannot be detached: used in place, kept alive here. Anything else is
    // copied by the engine now (a detached buffer's memory is freed at once, whoever holds it).
    if (types.isSharedArrayBuffer(view.buffer))
      return { spec: { kind: 'buffer', bytes: view, shared: true }, offset: 0, keep: view.buffer }
    return { spec: { kind: 'buffer', bytes: view, shared: false }, offset: 0, keep: null }
  }
  if ('file' in s) {
    const readMethod = choice(s.readMethod, 'readMethod', ['mmap', 'pread'] as const, 'mmap')
    const f = s.file
    const size = s.size === undefined ? {} : { size: optionalInt(s.size, 'file size', 0, 0) }
    if (typeof f === 'string') {
      const fd = fs.openSync(f, 'r')
      return {
        spec: { kind: 'file', fd, offset, readMethod, ...size },
        offset: 0,
        keep: null,
        close: () => fs.closeSync(fd),
      }
    }
    if (typeof f === 'number' && Number.isSafeInteger(f) && f >= 0) {
      return { spec: { kind: 'file', fd: f, offset, readMethod, ...size }, offset: 0, keep: null }
    }
    throw new TypeError(`file must be a path or an fd (got ${describe(f)})`)
  }
  if ('zero' in s) {
    if (s.zero !== true) throw new TypeError(`zero must be true (got ${describe(s.zero)})`)
    return { spec: { kind: 'zero' }, offset: 0, keep: null }
  }
  if ('handler' in s) {
    const handler = func<FaultHandler>(s.handler, 'handler')
    return { spec: { kind: 'handler', id }, offset, keep: null, handler }
  }
  throw new TypeError('source must have one of: buffer, file, zero, handler, nbd, url, remote')
}
