// Shared helpers for the kernel-facing tests of Userfaultfd and Mapping: cleanup of whatever a
// test opened, UffdError assertions, huge-page availability, and child processes / workers
// that run a script against the built package (dist/).
import { afterEach, expect } from 'vitest'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { UffdError, type UffdEvent, type Userfaultfd } from '../../src/index'
import { dist, killChildren, runNode, type ChildResult } from './children'

export { countFds } from './events'

type Closable = { close: () => void } | { unmap: () => void }

/**
 * Call once at the top of a test file. Returns track(x): x is closed (or unmapped) after the
 * test, in reverse order, pass or fail; child processes started by runScript are killed too.
 */
export function useCleanup(): <T extends Closable>(x: T) => T {
  const cleanup: Array<() => void> = []
  afterEach(() => {
    killChildren()
    for (const f of cleanup.splice(0).reverse()) {
      try {
        f()
      } catch {
        /* already closed */
      }
    }
  })
  return (x) => {
    cleanup.push(() => ('close' in x ? x.close() : x.unmap()))
    return x
  }
}

/** Runs fn, expects a UffdError with `code` (and the given fields); returns it. */
export function expectUffdError(fn: () => unknown, code: string, fields: Partial<UffdError> = {}): UffdError {
  let thrown: unknown
  try {
    fn()
  } catch (err) {
    thrown = err
  }
  expect(thrown, `expected UffdError ${code}`).toBeInstanceOf(UffdError)
  const err = thrown as UffdError
  expect(err).toMatchObject({ code, name: 'UffdError', ...fields })
  expect(typeof err.errno).toBe('number')
  expect(err.message).toContain(code)
  return err
}

/** HugePages_Free from /proc/meminfo. */
export function freeHugePages(): number {
  const m = /HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))
  return m ? Number(m[1]) : 0
}

/** Why huge-page tests cannot run here, or undefined when they can (and must). */
export function hugePagesMissing(): string | undefined {
  const total = Number(fs.readFileSync('/proc/sys/vm/nr_hugepages', 'utf8').trim())
  if (total > 0) return undefined
  return 'no huge pages are reserved (/proc/sys/vm/nr_hugepages is 0): run `echo 64 > /proc/sys/vm/nr_hugepages` as root (.ci/run does)'
}

const PRELUDE =
  `const uffd = require(${JSON.stringify(path.join(dist, 'index.js'))});` +
  `const internal = require(${JSON.stringify(path.join(dist, 'testing', 'index.js'))});`

/**
 * Runs `source` as a CommonJS script in a new node process, with `uffd` bound to the built
 * package (dist/index.js) and `internal` to dist/testing/index.js. Killed after timeoutMs.
 */
export function runScript(
  source: string,
  options: { execArgv?: string[]; args?: string[]; timeoutMs?: number } = {},
): Promise<ChildResult> {
  return runNode(
    [...(options.execArgv ?? []), '-e', PRELUDE + source, '--', ...(options.args ?? [])],
    options.timeoutMs ?? 15_000,
  )
}

/** Like runScript, but the child gets `fd` as its fd 3 (e.g. one end of a socketPair()). */
export function spawnScript(source: string, fd: number, timeoutMs = 15_000): Promise<ChildResult> {
  return runNode(['-e', PRELUDE + source], timeoutMs, undefined, [fd])
}

/** The last line of a child's stdout, parsed as JSON (children report with console.log(JSON.stringify(...))). */
export function lastJson<T = Record<string, unknown>>(r: ChildResult): T {
  const lines = r.stdout.trim().split('\n')
  try {
    return JSON.parse(lines[lines.length - 1]) as T
  } catch {
    throw new Error(
      `child printed no JSON (code ${r.code}, signal ${r.signal})\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
    )
  }
}

/** Resolves after ms. */
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** Polls uffd.read() until `n` events arrived; fails after ms. */
export async function waitEvents(uffd: Userfaultfd, n = 1, ms = 5000): Promise<UffdEvent[]> {
  const out: UffdEvent[] = []
  const deadline = Date.now() + ms
  while (out.length < n) {
    out.push(...uffd.read())
    if (out.length >= n) break
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms with ${out.length}/${n} events`)
    await sleep(2)
  }
  return out
}

/** Resolves true if `promise` settled within ms (it is not awaited otherwise). */
export async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false
  void promise.then(
    () => {
      settled = true
    },
    () => {
      settled = true
    },
  )
  await sleep(ms)
  return settled
}
