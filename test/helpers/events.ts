// Shared helpers for the event-stream tests.
import * as fs from 'node:fs'
import type { EventStream, UffdEvent } from '../../src/index'

/** Open file descriptors of this process. */
export function countFds(): number {
  return fs.readdirSync('/proc/self/fd').length
}

/** Reads events (one by one) until `pred` matched `n` of them; fails after `ms`. */
export async function collect(
  stream: EventStream<UffdEvent>,
  n: number,
  pred: (e: UffdEvent) => boolean = () => true,
  ms = 5000,
): Promise<UffdEvent[]> {
  const out: UffdEvent[] = []
  const timer = setTimeout(() => stream.close(), ms)
  try {
    for await (const item of stream) {
      for (const e of Array.isArray(item) ? item : [item]) if (pred(e)) out.push(e)
      if (out.length >= n) break
    }
  } finally {
    clearTimeout(timer)
  }
  if (out.length < n) throw new Error(`timed out after ${ms} ms with ${out.length}/${n} events`)
  return out
}

/** A page-sized buffer whose first u64 is `stamp`. */
export function stampedPage(stamp: bigint, pageSize = 4096): BigUint64Array {
  const page = new BigUint64Array(pageSize / 8)
  page[0] = stamp
  return page
}
