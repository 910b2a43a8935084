// Connections of a migration: dialing and listening (TCP, or TLS with node:tls), the handshake
// (version, mutual authentication, SETUP/ACCEPT) done in JS, and the hand-over of the socket to
// the native session. A plain TCP socket is handed over as it is (the native threads read and
// write its fd); a TLS socket cannot be, so a Unix socket pair is put in between and JS relays
// the bytes through TLS (slower: the bytes cross the JS thread, and TLS costs CPU).
import * as net from 'node:net'
import * as tls from 'node:tls'
import { native } from '../addon/native'
import { socketFd, socketPair } from '../ipc/fd-passing'
import { AuthError, nonce, proof, sameMac } from './auth'
import {
  type ChannelKind,
  decodeChallenge,
  decodeHello,
  decodeJson,
  decodeReject,
  decodeSetup,
  encodeChallenge,
  encodeFrame,
  encodeHello,
  encodeJson,
  type Frame,
  FrameParser,
  FrameType,
  frameName,
  MAC_SIZE,
  NONCE_SIZE,
  PROTOCOL_VERSION,
  ProtocolError,
  type Setup,
} from './wire'

export type AnySocket = net.Socket | tls.TLSSocket

/** The peer said no (REJECT): its code and reason. */
export class RejectedError extends Error {
  readonly code: string
  constructor(code: string, message: string) {
    super(message)
    this.name = 'RejectedError'
    this.code = code
  }
}

/** Frame-by-frame I/O on a socket during the handshake. */
export class FrameConn {
  readonly socket: AnySocket
  readonly #parser = new FrameParser()
  #waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | undefined
  #failure: Error | undefined
  #frames: Frame[] = []

  constructor(socket: AnySocket) {
    this.socket = socket
    socket.on('data', (chunk: Buffer) => {
      try {
        this.#parser.push(chunk)
        for (let f = this.#parser.next(); f !== undefined; f = this.#parser.next()) this.#frames.push(f)
      } catch (err) {
        this.#fail(err as Error)
        socket.destroy()
        return
      }
      this.#deliver()
    })
    socket.on('error', (err) => this.#fail(err))
    socket.on('close', () => this.#fail(new Error('connection closed during the handshake')))
  }

  send(type: number, payload?: Uint8Array): void {
    this.socket.write(encodeFrame(type, payload))
  }

  /** Writes a frame and resolves once it left this process (before a hand-over). */
  sendFlushed(type: number, payload?: Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => {
      this.socket.write(encodeFrame(type, payload), (err) => (err ? reject(err) : resolve()))
    })
  }

  /** The next frame, which must be one of `types` (a REJECT is thrown as RejectedError). */
  async expect(types: number[], timeoutMs: number): Promise<Frame> {
    const f = await this.#next(timeoutMs)
    if (f.type === FrameType.REJECT && !types.includes(FrameType.REJECT)) {
      const r = decodeReject(f.payload)
      throw new RejectedError(r.code, r.message)
    }
    if (!types.includes(f.type))
      throw new ProtocolError(`expected ${types.map(frameName).join(' or ')}, got ${frameName(f.type)}`)
    return f
  }

  /** Stops reading; returns what arrived beyond the handshake (normally nothing). */
  detach(): Buffer {
    this.socket.pause()
    this.socket.removeAllListeners('data')
    const rest = [...this.#frames.map((f) => encodeFrame(f.type, f.payload, f.range, f.page)), this.#parser.rest()]
    // What the socket read but did not emit yet (paused streams keep reading up to their
    // high-water mark) follows, in order.
    for (let chunk = this.socket.read(); chunk !== null; chunk = this.socket.read()) rest.push(chunk as Buffer)
    this.#frames = []
    return Buffer.concat(rest)
  }

  #next(timeoutMs: number): Promise<Frame> {
    const ready = this.#frames.shift()
    if (ready !== undefined) return Promise.resolve(ready)
    if (this.#failure !== undefined) return Promise.reject(this.#failure)
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = undefined
        reject(new ProtocolError(`the peer sent nothing for ${timeoutMs} ms during the handshake`))
      }, timeoutMs)
      this.#waiter = {
        resolve: (f) => {
          clearTimeout(timer)
          resolve(f)
        },
        reject: (e) => {
          clearTimeout(timer)
          reject(e)
        },
      }
    })
  }

  #deliver(): void {
    const w = this.#waiter
    if (w === undefined) return
    const f = this.#frames.shift()
    if (f === undefined) return
    this.#waiter = undefined
    w.resolve(f)
  }

  #fail(err: Error): void {
    if (this.#failure === undefined) this.#failure = err
    const w = this.#waiter
    this.#waiter = undefined
    w?.reject(this.#failure)
  }
}

export interface MigrationEndpoint {
  host: string
  port: number
}

export function parseEndpoint(value: unknown, what: string): MigrationEndpoint {
  if (typeof value === 'string') {
    const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(value)
    if (m === null) throw new TypeError(`${what} must be HOST:PORT (got '${value}')`)
    return parseEndpoint({ host: m[1], port: Number(m[2]) }, what)
  }
  if (value === null || typeof value !== 'object') throw new TypeError(`${what} must be HOST:PORT or { host, port }`)
  const { host, port } = value as Record<string, unknown>
  if (typeof host !== 'string' || host === '') throw new TypeError(`${what}.host must be a non-empty string`)
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 0 || port > 65535)
    throw new RangeError(`${what}.port must be 0..65535 (got ${String(port)})`)
  return { host, port }
}

/** TLS keying material both ends of one TLS session share (channel binding); empty without TLS. */
export function tlsBinding(socket: AnySocket): Buffer {
  if (!(socket instanceof tls.TLSSocket)) return Buffer.alloc(0)
  return socket.exportKeyingMaterial(32, 'EXPORTER-userfaultfd-migrate', Buffer.alloc(0))
}

export function dial(
  to: MigrationEndpoint,
  tlsOptions: tls.ConnectionOptions | undefined,
  timeoutMs: number,
): Promise<AnySocket> {
  return new Promise((resolve, reject) => {
    const socket: AnySocket = tlsOptions
      ? tls.connect({ ...tlsOptions, host: to.host, port: to.port })
      : net.connect({ host: to.host, port: to.port })
    const timer = setTimeout(() => {
      socket.destroy()
      reject(Object.assign(new Error(`connecting to ${to.host}:${to.port} timed out`), { code: 'ETIMEDOUT' }))
    }, timeoutMs)
    socket.once(tlsOptions ? 'secureConnect' : 'connect', () => {
      clearTimeout(timer)
      socket.setNoDelay(true)
      resolve(socket)
    })
    socket.once('error', (err) => {
      clearTimeout(timer)
      socket.destroy()
      reject(err)
    })
  })
}

export interface SourceHello {
  secret: Buffer | null
  channel: ChannelKind
  setup: Omit<Setup, 'channel'>
  timeoutMs: number
}

/** The connecting side's handshake; resolves with the target's ACCEPT payload. */
export async function sourceHandshake(
  conn: FrameConn,
  o: SourceHello,
  timing?: { rttMs: number },
): Promise<Record<string, unknown>> {
  conn.send(
    FrameType.HELLO,
    encodeHello({
      versionMin: PROTOCOL_VERSION,
      versionMax: PROTOCOL_VERSION,
      channel: o.channel,
      auth: o.secret !== null,
    }),
  )
  const ch = decodeChallenge((await conn.expect([FrameType.CHALLENGE], o.timeoutMs)).payload)
  if (ch.version !== PROTOCOL_VERSION)
    throw new ProtocolError(`the target chose protocol version ${ch.version}; this end speaks ${PROTOCOL_VERSION}`)
  if (ch.auth && o.secret === null)
    throw new AuthError('authentication failed: the target requires a shared secret and none is set')
  const mine = o.secret === null ? Buffer.alloc(NONCE_SIZE) : nonce()
  const binding = tlsBinding(conn.socket)
  const mac =
    o.secret === null
      ? Buffer.alloc(MAC_SIZE)
      : proof(o.secret, 'source', ch.version, o.channel, ch.nonce, mine, binding)
  conn.send(FrameType.AUTH, Buffer.concat([mine, mac]))
  const sent = performance.now()
  let ok: Frame
  try {
    ok = await conn.expect([FrameType.AUTH_OK], o.timeoutMs)
    // A round trip with next to no work at the far end: the one-way delay estimate.
    if (timing !== undefined) timing.rttMs = performance.now() - sent
  } catch (err) {
    if (err instanceof RejectedError && err.code === 'EAUTH')
      throw new AuthError(
        'authentication failed: the target rejected our proof (is the shared secret the same on both ends?)',
      )
    throw err
  }
  if (o.secret !== null) {
    const expected = proof(o.secret, 'target', ch.version, o.channel, mine, ch.nonce, binding)
    if (!sameMac(ok.payload, expected))
      throw new AuthError(
        ch.auth
          ? 'authentication failed: the target could not prove the shared secret'
          : 'authentication failed: the target does not authenticate (insecure); refusing to send it memory',
      )
  }
  conn.send(FrameType.SETUP, encodeJson({ ...o.setup, channel: o.channel }))
  return decodeJson((await conn.expect([FrameType.ACCEPT], o.timeoutMs)).payload, 'ACCEPT')
}

export interface TargetHello {
  hello: { channel: ChannelKind }
  setup: Setup
}

/**
 * The listening side's handshake, up to the peer's SETUP (the caller answers ACCEPT or REJECT).
 * A peer that fails to authenticate gets a REJECT (EAUTH) and an AuthError is thrown: it learnt
 * the protocol version and a random nonce, nothing else.
 */
export async function targetHandshake(conn: FrameConn, secret: Buffer | null, timeoutMs: number): Promise<TargetHello> {
  const hello = decodeHello((await conn.expect([FrameType.HELLO], timeoutMs)).payload)
  if (hello.versionMin > PROTOCOL_VERSION || hello.versionMax < PROTOCOL_VERSION) {
    await reject(
      conn,
      'EVERSION',
      `protocol version ${PROTOCOL_VERSION} is not in ${hello.versionMin}..${hello.versionMax}`,
    )
    throw new ProtocolError(`the peer speaks protocol versions ${hello.versionMin}..${hello.versionMax}`)
  }
  const mine = nonce()
  conn.send(FrameType.CHALLENGE, encodeChallenge({ version: PROTOCOL_VERSION, auth: secret !== null, nonce: mine }))
  const auth = (await conn.expect([FrameType.AUTH], timeoutMs)).payload
  const theirs = auth.subarray(0, NONCE_SIZE)
  const mac = auth.subarray(NONCE_SIZE)
  const binding = tlsBinding(conn.socket)
  if (secret !== null) {
    const expected = proof(secret, 'source', PROTOCOL_VERSION, hello.channel, mine, theirs, binding)
    if (!sameMac(mac, expected)) {
      await reject(conn, 'EAUTH', 'authentication failed')
      throw new AuthError('a peer failed to authenticate (wrong or no shared secret): dropped')
    }
    conn.send(FrameType.AUTH_OK, proof(secret, 'target', PROTOCOL_VERSION, hello.channel, theirs, mine, binding))
  } else {
    conn.send(FrameType.AUTH_OK, Buffer.alloc(MAC_SIZE))
  }
  const setup = decodeSetup((await conn.expect([FrameType.SETUP], timeoutMs)).payload)
  if (setup.channel !== hello.channel) throw new ProtocolError('SETUP names another channel than HELLO')
  return { hello, setup }
}

export async function reject(conn: FrameConn, code: string, message: string): Promise<void> {
  try {
    await Promise.race([
      conn.sendFlushed(FrameType.REJECT, encodeJson({ code, message })),
      new Promise((r) => setTimeout(r, 1000)),
    ])
  } catch {
    /* the peer is gone already */
  }
  conn.socket.destroy()
}

/**
 * Gives the connection to a native session: `attach(fd, initial)` must dup the fd (the native
 * handles do). Bytes that arrived beyond the handshake (the peer's first frames, in the same
 * segment as its last handshake frame: a resumed target sends its HAVE bitmaps right after
 * ACCEPT) go to the session as `initial`, ahead of the socket. Returns a function that tears
 * down the JS side of a TLS relay (a no-op for TCP).
 */
export function handOver(conn: FrameConn, attach: (fd: number, initial?: Uint8Array) => void): () => void {
  const socket = conn.socket
  const rest = conn.detach()
  socket.removeAllListeners('error')
  socket.removeAllListeners('close')
  if (!(socket instanceof tls.TLSSocket)) {
    attach(socketFd(socket), rest.length > 0 ? rest : undefined)
    socket.destroy()
    return () => {}
  }
  // TLS: native <-> Unix socket pair <-> this relay <-> TLS.
  const [mine, theirs] = socketPair('stream')
  try {
    attach(mine)
  } finally {
    native.close(mine)
  }
  const local = new net.Socket({ fd: theirs, readable: true, writable: true })
  const end = (): void => {
    local.destroy()
    socket.destroy()
  }
  local.on('error', end)
  local.on('close', end)
  socket.on('error', end)
  socket.on('close', end)
  if (rest.length > 0) local.write(rest)
  socket.pipe(local)
  local.pipe(socket)
  socket.resume()
  return end
}
