// A set of disjoint [start, end) address intervals: which ranges a uffd has registered, so its
// event reader keeps the process alive only while something can fault.
export class IntervalSet {
  #items: Array<[bigint, bigint]> = []

  get empty(): boolean {
    return this.#items.length === 0
  }

  add(start: bigint, end: bigint): void {
    const kept: Array<[bigint, bigint]> = []
    for (const [s, e] of this.#items) {
      if (e < start || s > end) kept.push([s, e])
      else {
        start = s < start ? s : start
        end = e > end ? e : end
      }
    }
    kept.push([start, end])
    this.#items = kept.sort((a, b) => (a[0] < b[0] ? -1 : 1))
  }

  remove(start: bigint, end: bigint): void {
    const kept: Array<[bigint, bigint]> = []
    for (const [s, e] of this.#items) {
      if (e <= start || s >= end) {
        kept.push([s, e])
        continue
      }
      if (s < start) kept.push([s, start])
      if (e > end) kept.push([end, e])
    }
    this.#items = kept
  }

  /** Moves [from, from + length) to start at `to` (after mremap). */
  move(from: bigint, to: bigint, length: bigint): void {
    const moved: Array<[bigint, bigint]> = []
    for (const [s, e] of this.#items) {
      // bigints: Math.min/max do not take them
      const end = from + length
      const a = s > from ? s : from
      // biome-ignore lint/complexity/useMathMinMax: bigint operands
      const b = e < end ? e : end
      if (a < b) moved.push([a - from + to, b - from + to])
    }
    this.remove(from, from + length)
    for (const [s, e] of moved) this.add(s, e)
  }

  /** Whether `address` lies in one of the intervals. */
  contains(address: bigint): boolean {
    for (const [s, e] of this.#items) if (address >= s && address < e) return true
    return false
  }

  clear(): void {
    this.#items = []
  }
}
