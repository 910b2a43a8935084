// NBD source: a read-only NBD client in TypeScript over net.Socket (no libnbd: the addon stays
// loadable everywhere, and reads are scheduled by the same event loop that runs the HTTP source).
// Newstyle fixed handshake, NBD_OPT_STRUCTURED_REPLY (holes come back as OFFSET_HOLE chunks with no
// data: sparse and compressed qcow2 images served by qemu-nbd cost nothing for their empty
// clusters), NBD_OPT_GO with NBD_INFO_BLOCK_SIZE (NBD_OPT_EXPORT_NAME where GO is unsupported), and
// pipelined NBD_CMD_READs on each connection. One connection is kept for demand reads, so that a
// thread blocked on a page never waits behind megabytes of background reads (QEMU postcopy's
// preempt channel); the others carry bulk reads.
//
// URLs (the NBD URI standard): nbd://host[:port]/[export] (port 10809 by default) and
// nbd+unix:///[export]?socket=PATH. TLS (nbds://) is not supported.
import * as net from 'node:net'
import { type BlockStore, codeOfErrno, printable, type ReadOptions, SourceError } from './store'

const NBDMAGIC = 0x4e42444d41474943n
const IHAVEOPT = 0x49484156454f5054n
const REPLY_MAGIC = 0x3e889045565a9n
const REQUEST_MAGIC = 0x25609513
const SIMPLE_REPLY_MAGIC = 0x67446698
const STRUCTURED_REPLY_MAGIC = 0x668e33ef

const FLAG_FIXED_NEWSTYLE = 1
const FLAG_NO_ZEROES = 2

const OPT_EXPORT_NAME = 1
const OPT_ABORT = 2
const OPT_GO = 7
const OPT_STRUCTURED_REPLY = 8

const REP_ACK = 1
const REP_INFO = 3
const REP_ERR_UNSUP = 0x80000001
const INFO_EXPORT = 0
const INFO_BLOCK_SIZE = 3

const CMD_READ = 0
const CMD_DISC = 2

const REPLY_FLAG_DONE = 1
const REPLY_NONE = 0
const REPLY_OFFSET_DATA = 1
const REPLY_OFFSET_HOLE = 2
const REPLY_ERROR = 0x8001
const REPLY_ERROR_OFFSET = 0x8002

/** The spec's advice: no read over 32 MiB unless the server said more (we never need more). */
const MAX_READ = 32 * 1024 * 1024

export interface NbdTarget {
  /** TCP */
  host?: string
  port?: number
  /** Unix socket */
  socket?: string
  export: string
}

export interface NbdOptions {
  /** connections for bulk reads (default 2), besides the one kept for demand reads */
  connections?: number
  /** ms for one read to complete before its connection is dropped (default 30000) */
  timeout?: number
  /** ms to connect and finish the handshake (default 10000) */
  connectTimeout?: number
  /** bulk reads in flight per connection (default 8) */
  depth?: number
}

/** Parses nbd://host[:port]/export and nbd+unix:///export?socket=PATH. */
export function parseNbdUrl(url: string): NbdTarget {
  let u: URL
  try {
    u = new URL(url)
  } catch {
    throw new TypeError(`not a URL: ${url}`)
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''))
  if (u.protocol === 'nbd:') {
    if (u.hostname === '') throw new TypeError(`nbd URL needs a host: ${url}`)
    const port = u.port === '' ? 10809 : Number(u.port)
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1')
    return { host, port, export: exportName }
  }
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket')
    if (socket === null || socket === '') throw new TypeError(`nbd+unix URL needs ?socket=PATH: ${url}`)
    return { socket, export: exportName }
  }
  if (u.protocol === 'nbds:' || u.protocol === 'nbds+unix:')
    throw new TypeError(`NBD over TLS (${u.protocol}) is not supported: ${printable(url)}`)
  throw new TypeError(`not an NBD URL (nbd:// or nbd+unix://): ${printable(url)}`)
}

interface Pending {
  offset: number
  length: number
  buffer: Buffer
  resolve: (b: Buffer) => void
  reject: (e: Error) => void
  /** structured replies: bytes covered so far, and an error chunk's error */
  covered: number
  error?: SourceError
  /** performance.now() when sent */
  sentAt: number
}

export interface ExportInfo {
  size: number
  flags: number
  /** the server's preferred and largest block sizes, where it said */
  preferredBlock?: number
  maxBlock?: number
  structured: boolean
}

/** Where a socket's reads go (net's onread), switched from the handshake to the connection. */
interface Receiver {
  buffer: () => Buffer
  data: (n: number, buf: Buffer) => void
}

/** Bytes arriving on a socket, consumed as fixed-size fields (handshake) or streamed (payloads). */
class Incoming {
  chunks: Buffer[] = []
  length = 0
  waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null
  failure: Error | null = null

  push(chunk: Buffer): void {
    this.chunks.push(chunk)
    this.length += chunk.length
    this.#serve()
  }

  fail(err: Error): void {
    this.failure = err
    if (this.waiter) {
      const w = this.waiter
      this.waiter = null
      w.reject(err)
    }
  }

  /** Exactly n bytes (the handshake is sequential: one waiter at a time). */
  take(n: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure)
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject }
      this.#serve()
    })
  }

  takeNow(n: number): Buffer {
    const out = Buffer.allocUnsafe(n)
    let at = 0
    while (at < n) {
      const c = this.chunks[0]
      const k = Math.min(c.length, n - at)
      c.copy(out, at, 0, k)
      at += k
      if (k === c.length) this.chunks.shift()
      else this.chunks[0] = c.subarray(k)
    }
    this.length -= n
    return out
  }

  #serve(): void {
    if (this.waiter && this.length >= this.waiter.n) {
      const w = this.waiter
      this.waiter = null
      w.resolve(this.takeNow(w.n))
    }
  }
}

type Stage = 'magic' | 'simple' | 'structured' | 'chunk-fields' | 'payload' | 'skip'

/** One NBD connection in the transmission phase: pipelined reads, matched by handle. */
export class NbdConnection {
  readonly info: ExportInfo
  readonly #socket: net.Socket
  readonly #location: string
  readonly #timeout: number
  readonly #pending = new Map<number, Pending>() // in send order
  #nextHandle = 1
  #out: Buffer | null = null
  #outLength = 0
  #flushQueued = false
  #timer: NodeJS.Timeout | null = null
  #slab: Buffer | null = null
  #slabUsed = 0
  readonly #scratch = Buffer.allocUnsafe(64 * 1024)
  #direct: Buffer | null = null
  #dead: SourceError | null = null
  // reply parsing state
  #head = Buffer.allocUnsafe(32)
  #headHave = 0
  #headNeed = 4
  #stage: Stage = 'magic'
  #current: Pending | null = null
  #currentHandle = 0
  #structuredReply = false
  #chunk = { flags: 0, type: 0, length: 0 }
  #sink: { buffer: Buffer | null; at: number; left: number } = { buffer: null, at: 0, left: 0 }

  private constructor(
    socket: net.Socket,
    receiver: Receiver,
    info: ExportInfo,
    location: string,
    timeout: number,
    rest: Buffer[],
  ) {
    this.#socket = socket
    this.info = info
    this.#location = location
    this.#timeout = timeout
    receiver.buffer = () => this.#readBuffer()
    receiver.data = (n, buf) => this.#onRead(n, buf)
    socket.on('error', (err: Error & { code?: string }) =>
      this.#die(`connection failed: ${err.message}`, err.code ?? 'ECONNRESET', true),
    )
    socket.on('close', () => this.#die('the server closed the connection', 'ECONNRESET', true))
    for (const b of rest) this.#onData(b)
  }

  get alive(): boolean {
    return this.#dead === null
  }

  get inflight(): number {
    return this.#pending.size
  }

  /**
   * Connects and negotiates; rejects with a SourceError (retryable where a retry may help).
   * `simple`: no structured replies (a connection handed to native code, which parses only simple ones).
   */
  static async connect(
    target: NbdTarget,
    location: string,
    options: NbdOptions = {},
    simple = false,
  ): Promise<NbdConnection> {
    const connectTimeout = options.connectTimeout ?? 10_000
    const incoming = new Incoming()
    // Reads land where the parser says: payloads straight into the reply's buffer (see
    // #readBuffer), everything else in a scratch buffer. During the handshake: the scratch.
    const scratch = Buffer.allocUnsafe(64 * 1024)
    const receiver: Receiver = {
      buffer: () => scratch,
      data: (n, buf) => incoming.push(Buffer.from(buf.subarray(0, n))),
    }
    const onread = {
      buffer: () => receiver.buffer(),
      callback: (n: number, buf: Buffer): boolean => {
        receiver.data(n, buf)
        return true
      },
    }
    const socket =
      target.socket !== undefined
        ? net.createConnection({ path: target.socket, onread })
        : net.createConnection({ host: target.host, port: target.port ?? 10809, onread })
    socket.setNoDelay(true)
    const fail = (code: string, message: string, retryable = true): SourceError =>
      new SourceError(`NBD ${location}: ${message}`, { code, syscall: 'connect', retryable, location })
    const onError = (err: Error & { code?: string }): void =>
      incoming.fail(fail(err.code ?? 'ECONNRESET', `cannot connect: ${err.message}`))
    const onClose = (): void =>
      incoming.fail(fail('ECONNRESET', 'the server closed the connection during the handshake'))
    socket.on('error', onError)
    socket.on('close', onClose)
    const timer = setTimeout(
      () => incoming.fail(fail('ETIMEDOUT', `no handshake within ${connectTimeout} ms`)),
      connectTimeout,
    )
    try {
      const info = await handshake(
        socket,
        incoming,
        target.export,
        (code, message) => fail(code, message, false),
        !simple,
      )
      socket.off('error', onError)
      socket.off('close', onClose)
      return new NbdConnection(socket, receiver, info, location, options.timeout ?? 30_000, incoming.chunks.splice(0))
    } catch (err) {
      socket.destroy()
      throw err
    } finally {
      clearTimeout(timer)
    }
  }

  /** `length` bytes at `offset` (pipelined: any number may be in flight). */
  read(offset: number, length: number): Promise<Buffer> {
    if (this.#dead) return Promise.reject(this.#dead)
    if (length <= 0 || offset + length > this.info.size || length > MAX_READ)
      return Promise.reject(new RangeError(`NBD read [${offset}, +${length}) outside 0..${this.info.size}`))
    const handle = this.#nextHandle++
    // Requests issued in one turn of the event loop are written together, in one buffer.
    if (this.#out === null || this.#outLength + 28 > this.#out.length) {
      this.#flush()
      this.#out = Buffer.allocUnsafe(28 * 64)
      this.#outLength = 0
      if (!this.#flushQueued) {
        this.#flushQueued = true
        process.nextTick(() => {
          this.#flushQueued = false
          this.#flush()
        })
      }
    }
    const req = this.#out
    const at = this.#outLength
    this.#outLength += 28
    req.writeUInt32BE(REQUEST_MAGIC, at)
    req.writeUInt32BE(CMD_READ, at + 4) // flags 0, type READ
    req.writeUInt32BE(Math.floor(handle / 0x100000000), at + 8)
    req.writeUInt32BE(handle >>> 0, at + 12)
    req.writeUInt32BE(Math.floor(offset / 0x100000000), at + 16)
    req.writeUInt32BE(offset >>> 0, at + 20)
    req.writeUInt32BE(length, at + 24)
    return new Promise<Buffer>((resolve, reject) => {
      this.#pending.set(handle, {
        offset,
        length,
        buffer: this.#alloc(length),
        resolve,
        reject,
        covered: 0,
        sentAt: performance.now(),
      })
      this.#watch()
    })
  }

  // Small reads share 1 MiB slabs: one backing store per slab instead of one per read spares
  // the garbage collector (a slab lives as long as any of its reads' buffers).
  #alloc(length: number): Buffer {
    if (length > 64 * 1024) return Buffer.allocUnsafe(length)
    if (this.#slab === null || this.#slabUsed + length > this.#slab.length) {
      this.#slab = Buffer.allocUnsafe(1024 * 1024)
      this.#slabUsed = 0
    }
    const b = this.#slab.subarray(this.#slabUsed, this.#slabUsed + length)
    this.#slabUsed += (length + 7) & ~7
    return b
  }

  #flush(): void {
    if (this.#out !== null && this.#outLength > 0 && this.#dead === null)
      this.#socket.write(this.#out.subarray(0, this.#outLength))
    this.#out = null
    this.#outLength = 0
  }

  // One timer per connection (not one per read): the oldest read in flight must be answered
  // within the timeout, or the connection is dropped and its reads fail (retryably).
  #watch(): void {
    if (this.#timer !== null) return
    const tick = Math.max(10, Math.min(1000, this.#timeout / 4))
    this.#timer = setInterval(() => {
      const oldest = this.#pending.values().next()
      if (oldest.done) {
        clearInterval(this.#timer!)
        this.#timer = null
        return
      }
      if (performance.now() - oldest.value.sentAt > this.#timeout)
        this.#die(`no reply to a read within ${this.#timeout} ms`, 'ETIMEDOUT', true)
    }, tick)
    this.#timer.unref()
  }

  /**
   * For a connection handed to native code: its socket's fd (the JS side reads nothing from it
   * any more), or null where it has none or reads are in flight. Call release() once the fd is
   * dup'ed: the JS socket then goes without a goodbye (the dup keeps the connection open).
   */
  handOver(): { fd: number; release: () => void } | null {
    const fd = (this.#socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd
    if (this.#dead !== null || this.#pending.size > 0 || typeof fd !== 'number' || fd < 0) return null
    this.#socket.pause() // an onread socket stops reading at once: replies are the new owner's
    return {
      fd,
      release: () => {
        this.#dead = this.#error('handed over', 'ESHUTDOWN', false)
        this.#socket.destroy()
      },
    }
  }

  /** NBD_CMD_DISC, then the socket closes; pending reads fail. */
  close(): void {
    if (this.#dead === null && this.#socket.writable) {
      const req = Buffer.alloc(28)
      req.writeUInt32BE(REQUEST_MAGIC, 0)
      req.writeUInt16BE(CMD_DISC, 6)
      this.#socket.end(req)
    }
    this.#die('the connection was closed', 'ESHUTDOWN', false)
  }

  #error(message: string, code: string, retryable: boolean, errno?: number): SourceError {
    return new SourceError(`NBD ${this.#location}: ${message}`, {
      code,
      syscall: 'NBD_CMD_READ',
      retryable,
      location: this.#location,
      errno,
    })
  }

  // The connection is unusable: every read in flight fails with its own error (same cause).
  #die(message: string, code: string, retryable: boolean): void {
    if (this.#dead) return
    this.#dead = this.#error(message, code, retryable)
    this.#socket.destroy()
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
    for (const p of this.#pending.values()) {
      const e = this.#error(message, code, retryable)
      e.offset = p.offset
      e.length = p.length
      p.reject(e)
    }
    this.#pending.clear()
  }

  #protocol(message: string): void {
    this.#die(`protocol error: ${message}`, 'EPROTO', true)
  }

  /** Where the next socket read goes: the rest of a payload in place when it is large. */
  #readBuffer(): Buffer {
    const s = this.#sink
    if (this.#stage === 'payload' && s.buffer !== null && s.left >= 16 * 1024) {
      this.#direct = s.buffer.subarray(s.at, s.at + s.left)
      return this.#direct
    }
    this.#direct = null
    return this.#scratch
  }

  #onRead(n: number, buf: Buffer): void {
    if (buf === this.#direct && this.#direct !== null) {
      // the bytes are in place already
      this.#direct = null
      const s = this.#sink
      s.at += n
      s.left -= n
      if (s.left === 0) this.#payloadDone()
      return
    }
    this.#onData(buf.subarray(0, n))
  }

  #onData(chunk: Buffer): void {
    let at = 0
    while (at < chunk.length && this.#dead === null) {
      if (this.#stage === 'payload' || this.#stage === 'skip') {
        const s = this.#sink
        const n = Math.min(s.left, chunk.length - at)
        if (s.buffer !== null) chunk.copy(s.buffer, s.at, at, at + n)
        s.at += n
        s.left -= n
        at += n
        if (s.left === 0) this.#payloadDone()
        continue
      }
      const n = Math.min(this.#headNeed - this.#headHave, chunk.length - at)
      chunk.copy(this.#head, this.#headHave, at, at + n)
      this.#headHave += n
      at += n
      if (this.#headHave === this.#headNeed) this.#headDone()
    }
  }

  #expect(stage: Stage, n: number): void {
    this.#stage = stage
    this.#headNeed = n
    this.#headHave = 0
  }

  #sinkTo(buffer: Buffer | null, at: number, left: number, stage: 'payload' | 'skip' = 'payload'): void {
    this.#sink = { buffer, at, left }
    this.#stage = stage
    if (left === 0) this.#payloadDone()
  }

  #headDone(): void {
    const h = this.#head
    switch (this.#stage) {
      case 'magic': {
        const magic = h.readUInt32BE(0)
        if (magic === SIMPLE_REPLY_MAGIC) this.#stage = 'simple'
        else if (magic === STRUCTURED_REPLY_MAGIC) this.#stage = 'structured'
        else {
          this.#protocol(`bad reply magic 0x${magic.toString(16)}`)
          return
        }
        this.#structuredReply = this.#stage === 'structured'
        this.#headNeed = this.#stage === 'simple' ? 16 : 20
        return
      }
      case 'simple': {
        const error = h.readUInt32BE(4)
        const handle = h.readUInt32BE(8) * 0x100000000 + h.readUInt32BE(12)
        const p = this.#pending.get(handle)
        if (p === undefined) {
          this.#protocol(`reply for unknown handle ${handle}`)
          return
        }
        this.#current = p
        this.#currentHandle = handle
        if (error !== 0) {
          this.#finish(this.#error(`read failed: ${codeOfErrno(error)}`, codeOfErrno(error), true, error))
          this.#expect('magic', 4)
          return
        }
        this.#sinkTo(p.buffer, 0, p.length)
        return
      }
      case 'structured': {
        const flags = h.readUInt16BE(4)
        const type = h.readUInt16BE(6)
        const handle = h.readUInt32BE(8) * 0x100000000 + h.readUInt32BE(12)
        const length = h.readUInt32BE(16)
        const p = this.#pending.get(handle)
        if (p === undefined) {
          this.#protocol(`structured reply for unknown handle ${handle}`)
          return
        }
        this.#current = p
        this.#currentHandle = handle
        this.#chunk = { flags, type, length }
        if (type === REPLY_NONE) {
          if (length !== 0) {
            this.#protocol('NBD_REPLY_TYPE_NONE with a payload')
            return
          }
          this.#chunkDone()
          return
        }
        // The fixed fields first: offset (DATA), offset + size (HOLE), error + message length.
        const fields = type === REPLY_OFFSET_DATA ? 8 : type === REPLY_OFFSET_HOLE ? 12 : type & 0x8000 ? 6 : 0
        if (fields === 0 || length < fields) {
          // An unknown non-error chunk type may be skipped (the spec allows ignoring it).
          this.#sinkTo(null, 0, length, 'skip')
          return
        }
        this.#expect('chunk-fields', fields)
        return
      }
      case 'chunk-fields': {
        const p = this.#current!
        const c = this.#chunk
        if (c.type === REPLY_OFFSET_DATA) {
          const offset = h.readUInt32BE(0) * 0x100000000 + h.readUInt32BE(4)
          const n = c.length - 8
          const rel = offset - p.offset
          if (rel < 0 || rel + n > p.length) {
            this.#protocol('data chunk outside the read')
            return
          }
          p.covered += n
          this.#sinkTo(p.buffer, rel, n)
          return
        }
        if (c.type === REPLY_OFFSET_HOLE) {
          const offset = h.readUInt32BE(0) * 0x100000000 + h.readUInt32BE(4)
          const size = h.readUInt32BE(8)
          const rel = offset - p.offset
          if (rel < 0 || rel + size > p.length) {
            this.#protocol('hole chunk outside the read')
            return
          }
          p.buffer.fill(0, rel, rel + size)
          p.covered += size
          this.#sinkTo(null, 0, c.length - 12, 'skip')
          return
        }
        // an error chunk: the message (and ERROR_OFFSET's offset) follow; read and drop them
        const errno = h.readUInt32BE(0)
        const code = codeOfErrno(errno)
        p.error = this.#error(`read failed: ${code}`, code, true, errno)
        if (c.type !== REPLY_ERROR && c.type !== REPLY_ERROR_OFFSET) p.error.message += ` (error chunk ${c.type})`
        this.#sinkTo(null, 0, c.length - 6, 'skip')
        return
      }
    }
  }

  #payloadDone(): void {
    if (this.#current === null) {
      this.#expect('magic', 4)
      return
    }
    if (!this.#structuredReply) {
      // a simple reply's data
      this.#finish(null)
      this.#expect('magic', 4)
      return
    }
    this.#chunkDone()
  }

  #chunkDone(): void {
    const p = this.#current!
    const done = (this.#chunk.flags & REPLY_FLAG_DONE) !== 0
    this.#chunk = { flags: 0, type: 0, length: 0 }
    if (done) {
      if (p.error) this.#finish(p.error)
      else if (p.covered !== p.length)
        this.#finish(this.#error(`structured reply covered ${p.covered} of ${p.length} bytes`, 'EPROTO', true))
      else this.#finish(null)
    }
    this.#expect('magic', 4)
  }

  #finish(err: SourceError | null): void {
    const p = this.#current!
    this.#current = null
    this.#pending.delete(this.#currentHandle)
    if (err) {
      err.offset = p.offset
      err.length = p.length
      p.reject(err)
    } else {
      p.resolve(p.buffer)
    }
  }
}

async function handshake(
  socket: net.Socket,
  incoming: Incoming,
  exportName: string,
  fail: (code: string, message: string) => SourceError,
  askStructured = true,
): Promise<ExportInfo> {
  const greeting = await incoming.take(18)
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw fail('EPROTO', 'not an NBD server (bad magic)')
  if (greeting.readBigUInt64BE(8) !== IHAVEOPT)
    throw fail('EPROTO', 'the server speaks only the oldstyle handshake (not supported)')
  const serverFlags = greeting.readUInt16BE(16)
  if ((serverFlags & FLAG_FIXED_NEWSTYLE) === 0)
    throw fail('EPROTO', 'the server does not speak the fixed newstyle handshake')
  const noZeroes = (serverFlags & FLAG_NO_ZEROES) !== 0
  const clientFlags = Buffer.alloc(4)
  clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (noZeroes ? FLAG_NO_ZEROES : 0))
  socket.write(clientFlags)

  const sendOption = (option: number, data: Buffer): void => {
    const head = Buffer.allocUnsafe(16)
    head.writeBigUInt64BE(IHAVEOPT, 0)
    head.writeUInt32BE(option, 8)
    head.writeUInt32BE(data.length, 12)
    socket.write(Buffer.concat([head, data]))
  }
  const readReply = async (option: number): Promise<{ type: number; data: Buffer }> => {
    const head = await incoming.take(20)
    if (head.readBigUInt64BE(0) !== REPLY_MAGIC) throw fail('EPROTO', 'bad option reply magic')
    if (head.readUInt32BE(8) !== option) throw fail('EPROTO', 'option reply for another option')
    const type = head.readUInt32BE(12)
    const length = head.readUInt32BE(16)
    if (length > 65536) throw fail('EPROTO', 'option reply too long')
    const data = length > 0 ? await incoming.take(length) : Buffer.alloc(0)
    return { type, data }
  }

  // Structured replies: holes without data. Refused: simple replies (still correct).
  let structured = false
  if (askStructured) {
    sendOption(OPT_STRUCTURED_REPLY, Buffer.alloc(0))
    for (;;) {
      const r = await readReply(OPT_STRUCTURED_REPLY)
      if (r.type === REP_ACK) structured = true
      if (r.type === REP_ACK || r.type >= 0x80000000) break
    }
  }

  const name = Buffer.from(exportName, 'utf8')
  const go = Buffer.allocUnsafe(4 + name.length + 2 + 2)
  go.writeUInt32BE(name.length, 0)
  name.copy(go, 4)
  go.writeUInt16BE(1, 4 + name.length)
  go.writeUInt16BE(INFO_BLOCK_SIZE, 6 + name.length)
  sendOption(OPT_GO, go)
  const info: ExportInfo = { size: -1, flags: 0, structured }
  for (;;) {
    const r = await readReply(OPT_GO)
    if (r.type === REP_INFO && r.data.length >= 2) {
      const kind = r.data.readUInt16BE(0)
      if (kind === INFO_EXPORT && r.data.length >= 12) {
        info.size = Number(r.data.readBigUInt64BE(2))
        info.flags = r.data.readUInt16BE(10)
      } else if (kind === INFO_BLOCK_SIZE && r.data.length >= 14) {
        info.preferredBlock = r.data.readUInt32BE(6)
        info.maxBlock = r.data.readUInt32BE(10)
      }
      continue
    }
    if (r.type === REP_ACK) break
    if (r.type === REP_ERR_UNSUP) {
      // An old server: NBD_OPT_EXPORT_NAME (no reply on failure: the server just closes).
      const head = Buffer.allocUnsafe(16)
      head.writeBigUInt64BE(IHAVEOPT, 0)
      head.writeUInt32BE(OPT_EXPORT_NAME, 8)
      head.writeUInt32BE(name.length, 12)
      socket.write(Buffer.concat([head, name]))
      const tail = await incoming.take(noZeroes ? 10 : 134)
      info.size = Number(tail.readBigUInt64BE(0))
      info.flags = tail.readUInt16BE(8)
      info.structured = false
      break
    }
    if (r.type >= 0x80000000) {
      const why = r.data.toString('utf8')
      const names: Record<number, string> = {
        2147483650: 'refused by policy',
        2147483651: 'invalid request',
        2147483652: 'not supported on this platform',
        2147483653: 'TLS required (not supported by this client)',
        2147483654: `no export named '${exportName}'`,
        2147483655: 'the server is shutting down',
        2147483656: 'block size negotiation required',
      }
      // Sending NBD_OPT_ABORT lets the server close cleanly.
      sendOption(OPT_ABORT, Buffer.alloc(0))
      throw fail(
        r.type === 0x80000006 ? 'ENOENT' : 'EPROTO',
        `${names[r.type] ?? `option error 0x${r.type.toString(16)}`}${why ? ` (${why})` : ''}`,
      )
    }
  }
  if (info.size < 0) throw fail('EPROTO', 'the server did not say the export size')
  return info
}

/** Connections handed to native code: their fds, and release() to let the JS sockets go once dup'ed. */
export interface HandedOver {
  fds: number[]
  release: () => void
}

function handedOver(list: Array<{ fd: number; release: () => void }>): HandedOver {
  return {
    fds: list.map((h) => h.fd),
    release: () => {
      for (const h of list) h.release()
    },
  }
}

/** A connection slot: connected, connecting, or empty (never connected, or dropped). */
class Slot {
  conn: NbdConnection | null = null
  connecting: Promise<NbdConnection> | null = null

  constructor(conn: NbdConnection | null = null) {
    this.conn = conn
  }

  /** -1: free to (re)connect; busy connections count their reads in flight. */
  get load(): number {
    if (this.connecting) return 1e9
    if (this.conn === null || !this.conn.alive) return -1
    return this.conn.inflight
  }
}

/** An NBD export as a BlockStore: one connection for demand reads, `connections` for bulk reads. */
export class NbdStore implements BlockStore {
  readonly kind = 'nbd'
  readonly location: string
  readonly size: number
  readonly maxRead: number
  readonly parallel: number
  readonly counters = { requests: 0, bytes: 0, reconnects: 0 }
  readonly info: ExportInfo
  readonly #target: NbdTarget
  readonly #options: NbdOptions
  readonly #urgent: Slot
  readonly #bulk: Slot[]
  /** false once the server refused a second connection (qemu-nbd without --shared): all reads share one */
  #multi = true
  #closed = false
  #spread = 0

  private constructor(url: string, target: NbdTarget, options: NbdOptions, first: NbdConnection) {
    this.location = printable(url)
    this.#target = target
    this.#options = options
    this.info = first.info
    this.size = first.info.size
    const max = Math.min(first.info.maxBlock ?? MAX_READ, MAX_READ)
    this.maxRead = Math.max(4096, max - (max % 4096))
    const connections = options.connections ?? 2
    this.parallel = connections * (options.depth ?? 8)
    this.#urgent = new Slot(first)
    this.#bulk = Array.from({ length: connections }, () => new Slot())
  }

  static async open(url: string, options: NbdOptions = {}): Promise<NbdStore> {
    const target = parseNbdUrl(url)
    if (options.connections !== undefined && (!Number.isSafeInteger(options.connections) || options.connections < 1))
      throw new RangeError(`connections must be an integer >= 1 (got ${options.connections})`)
    const first = await NbdConnection.connect(target, printable(url), options)
    const store = new NbdStore(url, target, options, first)
    // the bulk connections now, so that the first burst of reads spreads over them
    for (let i = 0; i < store.#bulk.length; i++) Promise.resolve(store.#connection(false)).catch(() => undefined)
    return store
  }

  read(offset: number, length: number, options: ReadOptions = {}): Promise<Buffer> {
    if (this.#closed)
      return Promise.reject(
        new SourceError(`NBD ${this.location}: closed`, {
          code: 'ESHUTDOWN',
          syscall: 'NBD_CMD_READ',
          retryable: false,
          location: this.location,
        }),
      )
    this.counters.requests++
    this.counters.bytes += length
    const conn = this.#connection(options.urgent === true || !this.#multi)
    // the common case without an extra promise hop: a live connection
    if (conn instanceof NbdConnection) return conn.read(offset, length)
    return conn.then((c) => c.read(offset, length))
  }

  /** Once the bulk connections being made are made (or failed): a handler's, before its clock starts. */
  async connected(): Promise<void> {
    await Promise.all(this.#bulk.map((s) => s.connecting?.catch(() => null)))
  }

  /** ms a read may take (the timeout option) */
  get timeout(): number {
    return this.#options.timeout ?? 30_000
  }

  /**
   * The idle bulk connections, handed over as fds for native reads (the FaultServer's working-set
   * replay); the store makes new ones when it next needs them. Null when none is idle. Call
   * release() once the fds are dup'ed.
   */
  takeIdle(): HandedOver | null {
    if (this.#closed || !this.#multi) return null
    const taken: Array<{ fd: number; release: () => void }> = []
    for (const slot of this.#bulk) {
      if (slot.connecting !== null || slot.conn === null || !slot.conn.alive || slot.conn.inflight > 0) continue
      const h = slot.conn.handOver()
      if (h === null) continue
      slot.conn = null // not a reconnect: the next read connects anew
      taken.push(h)
    }
    return taken.length === 0 ? null : handedOver(taken)
  }

  /**
   * `count` (default: as many as the bulk connections) new connections with simple replies,
   * handed over as fds (see takeIdle); null where the server takes one client at a time.
   */
  async handOverNew(count = this.#bulk.length): Promise<HandedOver | null> {
    if (this.#closed || !this.#multi) return null
    const conns = await Promise.all(
      Array.from({ length: count }, () =>
        NbdConnection.connect(this.#target, this.location, this.#options, true).catch(() => null),
      ),
    )
    const handed = conns.map((c) => c?.handOver() ?? null)
    if (handed.some((h) => h === null) || this.#closed) {
      for (const c of conns) c?.close()
      return null
    }
    return handedOver(handed as Array<{ fd: number; release: () => void }>)
  }

  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    for (const slot of [this.#urgent, ...this.#bulk]) {
      if (slot.connecting) await slot.connecting.catch(() => null)
      slot.conn?.close()
    }
  }

  // A dead connection is replaced on the next read (the fetcher's retry brings it here). Bulk
  // reads go to the least busy live connection; while none is up, spread over the connecting.
  #connection(urgent: boolean): Promise<NbdConnection> | NbdConnection {
    let slot = this.#urgent
    if (!urgent) {
      let best: Slot | null = null
      for (const s of this.#bulk)
        if (s.conn?.alive && !s.connecting && (best === null || s.conn.inflight < best.conn!.inflight)) best = s
      if (best === null) {
        best = this.#bulk.find((s) => !s.connecting && !s.conn?.alive) ?? this.#bulk[this.#spread++ % this.#bulk.length]
      }
      slot = best
    }
    if (slot.conn?.alive) return slot.conn
    if (slot.connecting) return slot.connecting
    if (slot.conn !== null) this.counters.reconnects++
    const p = NbdConnection.connect(this.#target, this.location, this.#options)
    slot.connecting = p
    return p.then(
      (c) => {
        slot.connecting = null
        slot.conn = c
        if (this.#closed) c.close()
        return c
      },
      (err: SourceError) => {
        slot.connecting = null
        // A server that takes one client at a time (qemu-nbd without --shared) refuses or
        // stalls the second connection: share the demand connection instead.
        if (!urgent && this.#urgent.conn?.alive) {
          this.#multi = false
          return this.#connection(true)
        }
        throw err
      },
    )
  }
}
