// The restore progress `userfaultfd serve` shows: on a TTY one line rewritten in place (bytes
// present / total, rate, faults waiting), otherwise one JSON object per line per interval, for
// logs and for programs that watch a restore.

export interface ProgressSample {
  /** bytes of guest memory present (or settled) now, and in all */
  bytesPresent: number
  bytesTotal: number
  /** faults waiting for their bytes now (remote sources) */
  faultsWaiting: number
  /** VMs connected */
  connections: number
}

export interface ProgressOptions {
  /** ms between lines (default 1000) */
  interval?: number
  /** force the format (default: 'line' on a TTY, else 'json') */
  format?: 'line' | 'json'
  now?: () => number
}

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1)
}

/** Formats one progress report; `rate` in bytes/s. */
export function formatProgress(s: ProgressSample, rate: number, format: 'line' | 'json', time: Date): string {
  const percent = s.bytesTotal > 0 ? (100 * s.bytesPresent) / s.bytesTotal : 100
  if (format === 'json') {
    return `${JSON.stringify({
      time: time.toISOString(),
      event: 'progress',
      bytesPresent: s.bytesPresent,
      bytesTotal: s.bytesTotal,
      percent: Math.round(percent * 10) / 10,
      bytesPerSecond: Math.round(rate),
      faultsWaiting: s.faultsWaiting,
      connections: s.connections,
    })}\n`
  }
  return `\r${mib(s.bytesPresent)} / ${mib(s.bytesTotal)} MiB present (${percent.toFixed(1)}%), ${mib(rate)} MiB/s, ${s.faultsWaiting} fault${s.faultsWaiting === 1 ? '' : 's'} waiting, ${s.connections} VM${s.connections === 1 ? '' : 's'}   `
}

/** Writes progress to `out` every interval until stop(). */
export class ProgressReporter {
  readonly #sample: () => ProgressSample
  readonly #out: NodeJS.WritableStream & { isTTY?: boolean }
  readonly #format: 'line' | 'json'
  readonly #now: () => number
  #timer: NodeJS.Timeout | null = null
  #last: { t: number; bytes: number } | null = null
  #wrote = false

  constructor(
    sample: () => ProgressSample,
    out: NodeJS.WritableStream & { isTTY?: boolean },
    options: ProgressOptions = {},
  ) {
    this.#sample = sample
    this.#out = out
    this.#format = options.format ?? (out.isTTY ? 'line' : 'json')
    this.#now = options.now ?? Date.now
    const interval = options.interval ?? 1000
    if (!Number.isSafeInteger(interval) || interval < 1) throw new RangeError('interval must be >= 1 ms')
    this.#timer = setInterval(() => this.tick(), interval)
    this.#timer.unref()
  }

  get format(): 'line' | 'json' {
    return this.#format
  }

  /** Writes one report now. */
  tick(): void {
    const s = this.#sample()
    const t = this.#now()
    const last = this.#last ?? { t, bytes: s.bytesPresent }
    const seconds = (t - last.t) / 1000
    const rate = seconds > 0 ? Math.max(0, s.bytesPresent - last.bytes) / seconds : 0
    this.#last = { t, bytes: s.bytesPresent }
    this.#out.write(formatProgress(s, rate, this.#format, new Date(t)))
    this.#wrote = true
  }

  /** Stops; on a TTY ends the line it kept rewriting. */
  stop(): void {
    if (this.#timer) clearInterval(this.#timer)
    this.#timer = null
    if (this.#wrote && this.#format === 'line') this.#out.write('\n')
    this.#wrote = false
  }
}
