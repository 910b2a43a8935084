// HTTP(S) source: byte-range GETs with undici, over a keep-alive pool for bulk reads and a
// connection of its own for demand reads (so a blocked thread's page never queues behind
// megabytes of background transfer). The object's version is pinned at open: its ETag (sent as
// If-Match where it is strong, and compared on every response) or else its Last-Modified, and
// its size (every Content-Range must name it). A changed object is an error (ESTALE), never a
// mix of old and new pages.
//
// Presigned S3/GCS URLs work as they are: the request target is the URL's own path and query,
// byte for byte (nothing is re-encoded, which would break the signature), and the version is
// learnt with a one-byte ranged GET, since a URL signed for GET refuses HEAD.
import type { Dispatcher } from 'undici'
import { type BlockStore, printable, type ReadOptions, SourceError } from './store'

export interface HttpOptions {
  /** request headers sent with every read (e.g. { authorization: 'Bearer ...' }) */
  headers?: Record<string, string>
  /** keep-alive connections for bulk reads (default 8), besides the one for demand reads */
  connections?: number
  /** ms without response headers, or between body bytes, before a read fails (default 30000) */
  timeout?: number
  /** ms to connect (TCP + TLS) (default 10000) */
  connectTimeout?: number
  /** extra trusted CA certificates (PEM) for https, e.g. a self-signed server's */
  ca?: string | Buffer | Array<string | Buffer>
  /** false accepts any certificate (testing only). Default true. */
  rejectUnauthorized?: boolean
  /** refuse to open unless the object's ETag is this one (e.g. the ETag a working set names) */
  etag?: string
}

interface Target {
  origin: string
  /** the request target exactly as written in the URL */
  path: string
}

/** Splits an http(s) URL into origin and request target, keeping the target's bytes as written. */
export function parseHttpUrl(url: string): Target {
  let u: URL
  try {
    u = new URL(url)
  } catch {
    throw new TypeError(`not a URL: ${url}`)
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new TypeError(`not an http(s) URL: ${printable(url)}`)
  if (u.username !== '' || u.password !== '')
    throw new TypeError('credentials in the URL are not sent: pass { headers: { authorization } } instead')
  const noFragment = url.split('#')[0]
  const afterScheme = noFragment.indexOf('//') + 2
  const slash = noFragment.indexOf('/', afterScheme)
  const query = noFragment.indexOf('?', afterScheme)
  let path: string
  if (slash >= 0 && (query < 0 || slash < query)) path = noFragment.slice(slash)
  else if (query >= 0) path = `/${noFragment.slice(query)}`
  else path = '/'
  return { origin: u.origin, path }
}

function header(headers: Record<string, string | string[] | undefined>, name: string): string | undefined {
  const v = headers[name]
  return Array.isArray(v) ? v[0] : v
}

/** 'bytes 0-0/1234' -> { start: 0, end: 0, total: 1234 } */
function contentRange(value: string | undefined): { start: number; end: number; total: number } | null {
  const m = value === undefined ? null : /^bytes (\d+)-(\d+)\/(\d+)$/.exec(value.trim())
  return m === null ? null : { start: Number(m[1]), end: Number(m[2]), total: Number(m[3]) }
}

const RETRYABLE_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
])

export class HttpStore implements BlockStore {
  readonly kind = 'http'
  readonly location: string
  readonly size: number
  readonly etag?: string
  readonly lastModified?: string
  readonly maxRead = 16 * 1024 * 1024
  readonly parallel: number
  readonly counters = { requests: 0, bytes: 0, reconnects: 0 }
  readonly #target: Target
  readonly #headers: Record<string, string>
  readonly #timeout: number
  readonly #bulk: Dispatcher
  readonly #urgent: Dispatcher
  #closed = false

  private constructor(
    url: string,
    target: Target,
    headers: Record<string, string>,
    timeout: number,
    bulk: Dispatcher,
    urgent: Dispatcher,
    version: { size: number; etag?: string; lastModified?: string },
    parallel: number,
  ) {
    this.location = printable(url)
    this.#target = target
    this.#headers = headers
    this.#timeout = timeout
    this.#bulk = bulk
    this.#urgent = urgent
    this.size = version.size
    this.etag = version.etag
    this.lastModified = version.lastModified
    this.parallel = parallel
  }

  /** Opens the object: learns and pins its size and version with a one-byte ranged GET. */
  static async open(url: string, options: HttpOptions = {}): Promise<HttpStore> {
    const target = parseHttpUrl(url)
    const connections = options.connections ?? 8
    if (!Number.isSafeInteger(connections) || connections < 1)
      throw new RangeError(`connections must be an integer >= 1 (got ${connections})`)
    const headers: Record<string, string> = {}
    for (const [k, v] of Object.entries(options.headers ?? {})) {
      if (typeof v !== 'string') throw new TypeError(`header ${k} must be a string`)
      headers[k.toLowerCase()] = v
    }
    const { Pool, Client } = await import('undici')
    const connect = {
      timeout: options.connectTimeout ?? 10_000,
      ...(options.ca !== undefined ? { ca: options.ca } : {}),
      ...(options.rejectUnauthorized === false ? { rejectUnauthorized: false } : {}),
    }
    const common = { connect, keepAliveTimeout: 30_000, keepAliveMaxTimeout: 600_000, pipelining: 1 }
    const bulk = new Pool(target.origin, { ...common, connections })
    const urgent = new Client(target.origin, common)
    const timeout = options.timeout ?? 30_000
    const probe = new HttpStore(url, target, headers, timeout, bulk, urgent, { size: 1 }, connections)
    try {
      const version = await probe.#probe()
      if (options.etag !== undefined && version.etag !== options.etag) {
        throw new SourceError(
          `HTTP ${probe.location}: the object's ETag is ${version.etag ?? '(none)'}, not ${options.etag}: it changed`,
          { code: 'ESTALE', syscall: 'GET', retryable: false, location: probe.location },
        )
      }
      const store = new HttpStore(url, target, headers, timeout, bulk, urgent, version, connections)
      store.counters.requests += probe.counters.requests
      return store
    } catch (err) {
      await Promise.allSettled([bulk.close(), urgent.close()])
      throw err
    }
  }

  read(offset: number, length: number, options: ReadOptions = {}): Promise<Buffer> {
    if (length <= 0 || offset < 0 || offset + length > this.size)
      return Promise.reject(new RangeError(`HTTP read [${offset}, +${length}) outside 0..${this.size}`))
    return this.#get(offset, length, options.urgent === true ? this.#urgent : this.#bulk)
  }

  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    await Promise.allSettled([this.#bulk.destroy(), this.#urgent.destroy()])
  }

  #fail(message: string, code: string, retryable: boolean, offset?: number, length?: number): SourceError {
    const e = new SourceError(`HTTP ${this.location}: ${message}`, {
      code,
      syscall: 'GET',
      retryable,
      location: this.location,
    })
    if (offset !== undefined) {
      e.offset = offset
      e.length = length
    }
    return e
  }

  async #probe(): Promise<{ size: number; etag?: string; lastModified?: string }> {
    const res = await this.#request(this.#urgent, { range: 'bytes=0-0' }, 0, 1)
    try {
      if (res.statusCode === 200)
        throw this.#fail('the server ignores Range requests (200 instead of 206)', 'ENOTSUP', false)
      if (res.statusCode === 416) throw this.#fail('the object is empty', 'EINVAL', false)
      this.#checkStatus(res.statusCode, 0, 1)
      const range = contentRange(header(res.headers, 'content-range'))
      if (range === null) throw this.#fail('206 without a Content-Range total', 'EPROTO', false)
      const etag = header(res.headers, 'etag')
      const lastModified = header(res.headers, 'last-modified')
      if (etag === undefined && lastModified === undefined)
        throw this.#fail(
          'the server sends neither ETag nor Last-Modified: its version cannot be pinned',
          'EPROTO',
          false,
        )
      return { size: range.total, etag, lastModified }
    } finally {
      await res.body.dump()
    }
  }

  #checkStatus(status: number, offset: number, length: number): void {
    if (status === 206) return
    if (status === 412) throw this.#fail('the object changed (If-Match failed)', 'ESTALE', false, offset, length)
    if (status === 416)
      throw this.#fail('the object changed (range no longer satisfiable)', 'ESTALE', false, offset, length)
    if (status === 404 || status === 410)
      throw this.#fail(`the object is gone (${status})`, 'ENOENT', false, offset, length)
    if (status === 401 || status === 403)
      throw this.#fail(
        `access denied (${status}): a missing or expired token or presigned URL?`,
        'EACCES',
        false,
        offset,
        length,
      )
    if (status === 200) throw this.#fail('the server answered a range with the whole object', 'ENOTSUP', false)
    const retryable = status >= 500 || status === 408 || status === 429
    throw this.#fail(`HTTP status ${status}`, retryable ? 'EIO' : 'EPROTO', retryable, offset, length)
  }

  async #request(
    dispatcher: Dispatcher,
    extra: Record<string, string>,
    offset: number,
    length: number,
  ): Promise<Dispatcher.ResponseData> {
    if (this.#closed) throw this.#fail('closed', 'ESHUTDOWN', false, offset, length)
    this.counters.requests++
    try {
      return await dispatcher.request({
        origin: this.#target.origin,
        path: this.#target.path,
        method: 'GET',
        headers: { ...this.#headers, ...extra },
        headersTimeout: this.#timeout,
        bodyTimeout: this.#timeout,
      })
    } catch (err) {
      const code = (err as { code?: string }).code ?? 'EIO'
      const retryable = RETRYABLE_CODES.has(code)
      const mapped = code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT' ? 'ETIMEDOUT' : code
      throw this.#fail(
        `${(err as Error).message}`,
        mapped.startsWith('UND_ERR') ? 'ECONNRESET' : mapped,
        retryable,
        offset,
        length,
      )
    }
  }

  async #get(offset: number, length: number, dispatcher: Dispatcher): Promise<Buffer> {
    const extra: Record<string, string> = { range: `bytes=${offset}-${offset + length - 1}` }
    // If-Match needs a strong ETag; a weak one (W/"...") is still compared on every response.
    if (this.etag !== undefined && !this.etag.startsWith('W/')) extra['if-match'] = this.etag
    else if (this.etag === undefined && this.lastModified !== undefined)
      extra['if-unmodified-since'] = this.lastModified
    const res = await this.#request(dispatcher, extra, offset, length)
    let body = false
    try {
      this.#checkStatus(res.statusCode, offset, length)
      const etag = header(res.headers, 'etag')
      if (this.etag !== undefined && etag !== undefined && etag !== this.etag)
        throw this.#fail(`the object changed (ETag ${etag}, pinned ${this.etag})`, 'ESTALE', false, offset, length)
      const lastModified = header(res.headers, 'last-modified')
      if (this.etag === undefined && lastModified !== undefined && lastModified !== this.lastModified)
        throw this.#fail('the object changed (Last-Modified)', 'ESTALE', false, offset, length)
      const range = contentRange(header(res.headers, 'content-range'))
      if (range === null || range.start !== offset || range.end !== offset + length - 1)
        throw this.#fail(
          `206 for the wrong range (${header(res.headers, 'content-range')})`,
          'EPROTO',
          true,
          offset,
          length,
        )
      if (range.total !== this.size)
        throw this.#fail(
          `the object changed (size ${range.total}, pinned ${this.size})`,
          'ESTALE',
          false,
          offset,
          length,
        )
      const out = Buffer.allocUnsafe(length)
      let at = 0
      body = true
      try {
        for await (const chunk of res.body as AsyncIterable<Buffer>) {
          if (at + chunk.length > length) throw this.#fail('more body than the range', 'EPROTO', true, offset, length)
          chunk.copy(out, at)
          at += chunk.length
        }
      } catch (err) {
        if (err instanceof SourceError) throw err
        const code = (err as { code?: string }).code ?? 'ECONNRESET'
        throw this.#fail(
          `body: ${(err as Error).message}`,
          code === 'UND_ERR_BODY_TIMEOUT' ? 'ETIMEDOUT' : 'ECONNRESET',
          true,
          offset,
          length,
        )
      }
      if (at !== length) throw this.#fail(`short body (${at} of ${length} bytes)`, 'ECONNRESET', true, offset, length)
      this.counters.bytes += length
      return out
    } finally {
      if (!body) await res.body.dump().catch(() => undefined)
    }
  }
}
