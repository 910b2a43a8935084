// The latency histogram of JS-side serving paths (the Firecracker handler's), with the same
// buckets as the native engine's (native/engine/latency_histogram.h: log-linear, 8 per power of
// two, ~9% resolution) and the same summary, so every latency the package reports reads alike.
import type { LatencySummary } from '../addon/binding'

export type { LatencySummary } from '../addon/binding'

const SUB = 8
const BUCKETS = 64 * SUB

function index(ns: number): number {
  if (ns < SUB) return Math.max(0, Math.floor(ns))
  const log = Math.floor(Math.log2(ns)) // >= 3
  const sub = Math.floor(ns / 2 ** (log - 3)) & (SUB - 1)
  return Math.min((log - 2) * SUB + sub, BUCKETS - 1)
}

function upperBound(i: number): number {
  if (i < SUB) return i
  const log = Math.floor(i / SUB) + 2
  return (SUB + (i % SUB) + 1) * 2 ** (log - 3) - 1
}

export class LatencyHistogram {
  readonly #buckets = new Float64Array(BUCKETS)
  #count = 0

  /** Records one latency, in nanoseconds. */
  record(ns: number): void {
    this.#buckets[index(ns)]++
    this.#count++
  }

  get count(): number {
    return this.#count
  }

  /** Upper bound (ns) of the bucket holding quantile q (0..1); 0 when empty. */
  quantile(q: number): number {
    if (this.#count === 0) return 0
    const want = Math.floor(q * (this.#count - 1)) + 1
    let seen = 0
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.#buckets[i]
      if (seen >= want) return upperBound(i)
    }
    return upperBound(BUCKETS - 1)
  }

  /** count, p50, p90, p99 and max, in µs. */
  summary(): LatencySummary {
    const us = (q: number): number => this.quantile(q) / 1000
    return { count: this.#count, p50: us(0.5), p90: us(0.9), p99: us(0.99), max: us(1) }
  }
}
