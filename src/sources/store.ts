// What a remote snapshot store (NBD export, HTTP object) offers the page fetcher: its size, the
// version it pins, and reads of byte ranges. Transports retry nothing themselves: they report
// failures as SourceErrors that say whether a retry may help, and the fetcher (fetcher.ts)
// retries with backoff, so that both transports behave the same.

export interface ReadOptions {
  /** a thread is blocked on these bytes: use the connection kept free for demand reads */
  urgent?: boolean
}

export interface BlockStore {
  /** where the bytes come from, safe to print (no credentials, no query string) */
  readonly location: string
  /** 'nbd' | 'http' | 'file' */
  readonly kind: string
  /** bytes of content */
  readonly size: number
  /** the strong ETag every read is pinned to (HTTP), where the protocol has one */
  readonly etag?: string
  /** largest read the store takes in one request */
  readonly maxRead: number
  /** reads that may usefully be in flight at once (bulk reads; demand reads come on top) */
  readonly parallel: number
  /** requests sent and bytes received, for stats and for tests that assert nothing was fetched */
  readonly counters: { requests: number; bytes: number; reconnects: number }
  /** `length` bytes at `offset` (offset + length <= size) */
  read(offset: number, length: number, options?: ReadOptions): Promise<Buffer>
  close(): Promise<void>
}

/** A store's failure: `retryable` when the same read may succeed later (connection lost, timeout, 5xx). */
export class SourceError extends Error {
  /** errno-style name: 'EIO', 'ECONNRESET', 'ETIMEDOUT', 'ESTALE' (object changed), 'EPROTO'... */
  declare code: string
  /** errno number where there is one */
  declare errno?: number
  /** the operation, e.g. 'NBD_CMD_READ' or 'GET' */
  declare syscall: string
  declare retryable: boolean
  /** the store (printable) */
  declare location: string
  /** the byte range of the source that failed, where known */
  declare offset?: number
  declare length?: number

  constructor(
    message: string,
    fields: { code: string; syscall: string; retryable: boolean; location: string; errno?: number },
  ) {
    super(message)
    this.name = 'SourceError'
    Object.assign(this, fields)
  }
}

const ERRNO: Record<string, number> = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  EPROTO: 71,
  ENOTSUP: 95,
  ECONNRESET: 104,
  ESHUTDOWN: 108,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  ESTALE: 116,
  EBADMSG: 74,
}

export function errnoOf(code: string): number | undefined {
  return ERRNO[code]
}

export function codeOfErrno(errno: number): string {
  for (const [code, n] of Object.entries(ERRNO)) if (n === errno) return code
  return `E${errno}`
}

/** A URL as it may be printed: no user info, no query string (presigned URLs carry secrets there). */
export function printable(url: string): string {
  try {
    const u = new URL(url)
    u.username = ''
    u.password = ''
    const query = u.search !== '' && u.protocol.startsWith('http') ? '?…' : u.search
    u.search = ''
    return `${u.toString()}${query}`
  } catch {
    return '(unparsable URL)'
  }
}
