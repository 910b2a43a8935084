// Log lines of long-running commands (serve): on stderr, each with an ISO timestamp, as text
// or as one JSON object per line (--log-format json) for log collectors.

export type LogFormat = 'text' | 'json'
export type LogLevel = 'info' | 'warn' | 'error'

export interface Logger {
  /** `message` for people; `fields` (event name, numbers) for machines. */
  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void
}

function plain(value: unknown): unknown {
  return typeof value === 'bigint' ? `0x${value.toString(16)}` : value
}

export function createLogger(
  format: LogFormat,
  scope: string,
  out: NodeJS.WritableStream = process.stderr,
  now: () => Date = () => new Date(),
): Logger {
  return {
    log(level, message, fields = {}) {
      const time = now().toISOString()
      if (format === 'json') {
        out.write(`${JSON.stringify({ time, level, scope, msg: message, ...fields }, (_k, v) => plain(v))}\n`)
      } else {
        out.write(`${time} ${scope}${level === 'info' ? '' : ` ${level.toUpperCase()}`}: ${message}\n`)
      }
    },
  }
}
