// Shared by the FaultServer tests: servers, uffds and mappings closed after each test, and
// page contents that tell every page (and every offset) apart.
import * as crypto from 'node:crypto'
import type { EventEmitter } from 'node:events'
import {
  FaultServer,
  type FaultServerEvents,
  type FaultServerOptions,
  Mapping,
  PAGE_SIZE,
  Userfaultfd,
} from '../../src/index'

const cleanup: Array<{ run: () => void; unmap: boolean }> = []

/**
 * Runs (in reverse order) everything registered by the helpers below; call from afterEach.
 * After a failed test, mappings are left mapped: a toucher thread still blocked in a fault there
 * is woken when its uffd closes, and must not find its memory gone (SIGSEGV).
 */
export function closeAll(ctx?: { task: { result?: { state?: string } } }): void {
  const failed = ctx?.task.result?.state === 'fail'
  for (const { run, unmap } of cleanup.splice(0).reverse()) {
    if (failed && unmap) continue
    try {
      run()
    } catch {
      /* already closed */
    }
  }
}

export function track<T extends { close?: () => void; unmap?: () => void }>(x: T): T {
  cleanup.push({ run: () => (x.close ?? x.unmap)!.call(x), unmap: x.close === undefined })
  return x
}

export function onCleanup(f: () => void, unmap = false): void {
  cleanup.push({ run: f, unmap })
}

/** A uffd, a mapping of `pages` pages and a server over it (errors collected, not thrown). */
export function setup(
  pages: number,
  options: FaultServerOptions = {},
  features = 0n,
): {
  uffd: Userfaultfd
  m: Mapping
  server: FaultServer
  errors: Error[]
} {
  const m = track(Mapping.anonymous(pages * PAGE_SIZE))
  const uffd = track(Userfaultfd.open({ features }))
  const server = track(new FaultServer(uffd, options))
  const errors: Error[] = []
  server.on('error', (e: Error) => errors.push(e))
  return { uffd, m, server, errors }
}

/** Random bytes, with each page's first u64 set to its page index + 1 (never 0). */
export function randomContent(length: number): Uint8Array {
  const bytes = crypto.randomBytes(length)
  const out = new Uint8Array(bytes.buffer, bytes.byteOffset, length)
  const view = new DataView(out.buffer, out.byteOffset, length)
  for (let p = 0; p * PAGE_SIZE < length; p++) view.setBigUint64(p * PAGE_SIZE, BigInt(p + 1), true)
  return out
}

/** The u64 at byte `at` of `bytes` (little-endian), 0 past its end. */
export function u64At(bytes: Uint8Array, at: number): bigint {
  if (at + 8 > bytes.length) return 0n
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.length).getBigUint64(at, true)
}

/** Whole-mapping copy read by THIS (the main JS) thread: faults are served by the engine. */
export function readAll(m: Mapping, offset = 0, length = m.length - offset): Uint8Array {
  const out = new Uint8Array(length)
  m.read(offset, out)
  return out
}

/** Resolves with the first argument of `event` when `server` emits it (or rejects after ms). */
export function once<K extends keyof FaultServerEvents>(
  server: FaultServer,
  event: K,
  ms = 5000,
): Promise<FaultServerEvents[K][0]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${event}' within ${ms} ms`)), ms)
    const emitter: EventEmitter = server // untyped, for a listener of any of its events
    emitter.once(event, (value: FaultServerEvents[K][0]) => {
      clearTimeout(timer)
      resolve(value)
    })
  })
}

/** Rejects when `p` is not settled within ms. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms)
    }),
  ])
}

/** Polls `pred` until true (engine counters trail the wake-up of the faulting thread). */
export async function until(pred: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms
  while (!pred()) {
    if (Date.now() > end) throw new Error(`${what}: not true within ${ms} ms`)
    await new Promise((r) => setTimeout(r, 2))
  }
}

/** The FaultServer's defaults, as the native FaultEngine takes them (tests that build one directly). */
export const ENGINE_DEFAULTS = {
  faultAround: 65536,
  faultAroundMax: 2 << 20,
  prefetchChunk: 262144,
  spinUs: 0,
  readSize: 64,
  progressIntervalMs: 100,
  onRemove: 'zero',
  onFork: 'close',
  backgroundPriority: 'idle',
  handlerConcurrency: 4,
  prefetchYieldUs: 1000,
  watchdogMs: 0,
  startPaused: false,
} as const
