// The latency histogram of JS-side code (the Firecracker handler's serving, the demo's guest),
// with the native engine's buckets (native/engine/latency_histogram.h): log-linear, 8 buckets per
// power of two (~9% resolution), of nanoseconds, and the same summary (LatencySummary), so every
// latency the package reports reads alike. Small and mergeable, so a process or thread sends its
// histogram instead of its raw samples.
import type { LatencySummary } from '../addon/binding'

export type { LatencySummary } from '../addon/binding'

const SUB = 8
const BUCKETS = 64 * SUB

function indexOf(ns: number): number {
  const v = Math.max(0, Math.floor(ns))
  if (v < SUB) return v
  const log = Math.floor(Math.log2(v)) // >= 3
  const sub = Math.floor(v / 2 ** (log - 3)) & (SUB - 1)
  return Math.min((log - 2) * SUB + sub, BUCKETS - 1)
}

function upperBound(i: number): number {
  if (i < SUB) return i
  const log = Math.floor(i / SUB) + 2
  return (SUB + (i % SUB) + 1) * 2 ** (log - 3) - 1
}

/** The upper bound (ns, inclusive) of bucket `index`: every sample in it is at most this. */
export function bucketUpperBoundNs(index: number): number {
  return upperBound(index)
}

/**
 * Cumulative counts at each of `boundsNs` (ascending): samples in buckets whose upper bound is at
 * most the bound (Prometheus' `le` buckets, to the ~9% the buckets resolve).
 */
export function cumulativeCounts(
  buckets: ReadonlyArray<readonly [number, number]>,
  boundsNs: readonly number[],
): number[] {
  const out = new Array<number>(boundsNs.length).fill(0)
  for (const [i, n] of buckets) {
    const ub = upperBound(i)
    for (let b = 0; b < boundsNs.length; b++) if (ub <= boundsNs[b]) out[b] += n
  }
  return out
}

/** The JSON form: the total and the non-empty buckets as [bucket index, count] pairs. */
export interface HistogramJSON {
  count: number
  buckets: Array<[number, number]>
}

export class LatencyHistogram {
  readonly #counts = new Float64Array(BUCKETS)
  #count = 0

  /** Records one sample, in nanoseconds. */
  record(ns: number): void {
    this.#counts[indexOf(ns)]++
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
      seen += this.#counts[i]
      if (seen >= want) return upperBound(i)
    }
    return upperBound(BUCKETS - 1)
  }

  /** count, p50, p90, p99 and max, in µs (as FaultServer's stats().latencyUs). */
  summary(): LatencySummary {
    const us = (q: number): number => this.quantile(q) / 1000
    return { count: this.#count, p50: us(0.5), p90: us(0.9), p99: us(0.99), max: us(1) }
  }

  /** Adds another histogram's samples to this one. */
  merge(other: LatencyHistogram | HistogramJSON): this {
    const json = other instanceof LatencyHistogram ? other.toJSON() : other
    for (const [i, n] of json.buckets) {
      if (!Number.isInteger(i) || i < 0 || i >= BUCKETS) throw new RangeError(`histogram bucket ${i} out of range`)
      this.#counts[i] += n
      this.#count += n
    }
    return this
  }

  toJSON(): HistogramJSON {
    const buckets: Array<[number, number]> = []
    for (let i = 0; i < BUCKETS; i++) if (this.#counts[i] > 0) buckets.push([i, this.#counts[i]])
    return { count: this.#count, buckets }
  }

  static fromJSON(json: HistogramJSON): LatencyHistogram {
    return new LatencyHistogram().merge(json)
  }

  /**
   * Counts per power of two of microseconds, for people: [['<1', n], ['1-2', n], ['2-4', n], ...]
   * (a bucket belongs to the power of two its upper bound falls in).
   */
  powersOfTwoUs(): Array<[string, number]> {
    const out = new Map<number, number>()
    for (let i = 0; i < BUCKETS; i++) {
      if (this.#counts[i] === 0) continue
      const us = upperBound(i) / 1000
      const b = us < 1 ? 0 : Math.floor(Math.log2(us)) + 1
      out.set(b, (out.get(b) ?? 0) + this.#counts[i])
    }
    return [...out.keys()].sort((a, b) => a - b).map((b) => [b === 0 ? '<1' : `${2 ** (b - 1)}-${2 ** b}`, out.get(b)!])
  }
}
