// Progress for people: percentage, rate and ETA of a job with a known total. On a terminal one
// line rewritten in place; elsewhere (a pipe, a log) a line at most every few seconds, and the
// final one.

/** Rate and estimated time left of a job from `done0` at `t0` to `done` of `total` at `t` (ms). */
export function rateAndEta(
  done0: number,
  t0: number,
  done: number,
  t: number,
  total: number,
): { perSecond: number; etaSeconds: number | undefined } {
  const seconds = (t - t0) / 1000
  const perSecond = seconds > 0 ? (done - done0) / seconds : 0
  const left = Math.max(0, total - done)
  return { perSecond, etaSeconds: left === 0 ? 0 : perSecond > 0 ? left / perSecond : undefined }
}

/** 0.4 s, 12 s, 3 min 20 s, 1 h 5 min; '?' when unknown. */
export function formatDuration(seconds: number | undefined): string {
  if (seconds === undefined || !Number.isFinite(seconds)) return '?'
  if (seconds < 10) return `${seconds.toFixed(1)} s`
  if (seconds < 60) return `${Math.round(seconds)} s`
  const m = Math.floor(seconds / 60)
  if (m < 60) return `${m} min ${Math.round(seconds - m * 60)} s`
  return `${Math.floor(m / 60)} h ${m % 60} min`
}

export function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1)
}

export interface ProgressOptions {
  /** rewrite one line in place (default: whether the stream is a terminal) */
  tty?: boolean
  /** without a terminal, the least time between two lines (default 2000 ms) */
  intervalMs?: number
  /** 'bytes' shows MiB; 'count' shows the numbers with `noun` */
  unit?: 'bytes' | 'count'
  noun?: string
}

/** One phase's progress line ("touching pages: 45.2% 59392/131072 pages, 8123 pages/s, ETA 9.1 s"). */
export class Progress {
  readonly #out: NodeJS.WritableStream
  readonly #label: string
  readonly #total: number
  readonly #tty: boolean
  readonly #intervalMs: number
  readonly #unit: 'bytes' | 'count'
  readonly #noun: string
  readonly #t0 = Date.now()
  #lastLine = 0
  #ended = false

  constructor(
    out: NodeJS.WritableStream & { isTTY?: boolean },
    label: string,
    total: number,
    options: ProgressOptions = {},
  ) {
    this.#out = out
    this.#label = label
    this.#total = total
    this.#tty = options.tty ?? out.isTTY === true
    this.#intervalMs = options.intervalMs ?? 2000
    this.#unit = options.unit ?? 'count'
    this.#noun = options.noun ?? ''
  }

  /** The line for `done` now (also what update() prints). */
  format(done: number, now = Date.now()): string {
    const { perSecond, etaSeconds } = rateAndEta(0, this.#t0, done, now, this.#total)
    const pct = this.#total === 0 ? 100 : (done / this.#total) * 100
    const amount =
      this.#unit === 'bytes'
        ? `${mib(done)}/${mib(this.#total)} MiB, ${mib(perSecond)} MiB/s`
        : `${done}/${this.#total}${this.#noun ? ` ${this.#noun}` : ''}, ${Math.round(perSecond)}${this.#noun ? ` ${this.#noun}` : ''}/s`
    const tail =
      done >= this.#total ? `in ${formatDuration((now - this.#t0) / 1000)}` : `ETA ${formatDuration(etaSeconds)}`
    return `${this.#label}: ${pct.toFixed(1)}% ${amount}, ${tail}`
  }

  update(done: number): void {
    if (this.#ended) return
    const now = Date.now()
    if (this.#tty) this.#out.write(`\r${this.format(done, now)}\x1b[K`)
    else if (now - this.#lastLine >= this.#intervalMs) {
      this.#lastLine = now
      this.#out.write(`${this.format(done, now)}\n`)
    }
  }

  /** Prints the final line (100% unless `done` says otherwise). Idempotent. */
  end(done = this.#total): void {
    if (this.#ended) return
    this.#ended = true
    this.#out.write(`${this.#tty ? '\r' : ''}${this.format(done)}${this.#tty ? '\x1b[K' : ''}\n`)
  }
}
