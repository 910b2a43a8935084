// Passing a uffd (or any fd, e.g. a memfd) to another process over a Unix socket: SCM_RIGHTS
// with a payload, on a socket that Node's `net` created or on a raw socketpair.
//
// What other bindings get wrong, and this module does not:
// - waiting: readiness comes from the event loop (a watcher on a dup of the socket), never a
//   busy loop or a blocking recvmsg on the JS thread;
// - leaks: received fds are close-on-exec from birth (MSG_CMSG_CLOEXEC); when the control data
//   was truncated (MSG_CTRUNC) or more fds arrived than asked for, every fd that did arrive is
//   closed and the receive fails; a failed receive never hands out fds;
// - net sockets: Node must not be reading the socket (a plain read(2) discards attached fds),
//   so the socket is paused and its handle's read stopped before anything is received;
// - short sends on stream sockets: the rest is sent (without the fds, which went with byte 0);
// - SIGPIPE: MSG_NOSIGNAL, a vanished peer is EPIPE.
import * as net from 'node:net'
import { constants as osConstants } from 'node:os'
import { native } from '../addon/native'
import { UffdError } from '../core/errors'
import { describe } from '../core/range'
import type { Userfaultfd } from '../core/userfaultfd'

/** The peer's identity as the kernel recorded it at connect() time (SO_PEERCRED). */
export interface PeerCredentials {
  /** The peer's process id. */
  pid: number
  /** The peer's user id. */
  uid: number
  /** The peer's group id. */
  gid: number
}

/** A socket: a connected net.Socket (Unix domain), or a raw socket fd (e.g. from socketPair()). */
export type SocketLike = net.Socket | number

/** Options of receiveFds() and FdChannel.receive(). */
export interface ReceiveOptions {
  /** Largest payload accepted in one receive (default 65536). */
  maxBytes?: number
  /** Most fds accepted (default 1); more is an error and every fd that arrived is closed. */
  maxFds?: number
  /** Fewest fds required (default 0); fewer is an error (the fds that arrived are closed). */
  minFds?: number
  /** Stops waiting (AbortError). */
  signal?: AbortSignal
}

/** One message received, with the fds that came with it (close-on-exec, yours to close). */
export interface ReceivedMessage {
  /** The payload (empty at end of stream: `end` is then true). */
  data: Buffer
  /** The fds that came with it: yours to close (close-on-exec is set). */
  fds: number[]
  /** The peer closed its end before sending anything. */
  end: boolean
}

interface NativeWatcher {
  wait(events: number): void
  stop(): void
  ref(): void
  unref(): void
  close(): void
}

interface NativeRecv {
  bytes: number
  fds: number[]
  truncated: boolean
  extraFds: boolean
  dropped: number
  payloadTruncated: boolean
}

interface FdNative {
  socketpair(type: string): [number, number]
  sendFds(sock: number, payload: ArrayBufferView, fds?: number[]): number
  recvFds(sock: number, buffer: ArrayBufferView, maxFds: number): NativeRecv | null
  peerCred(sock: number): PeerCredentials
  pidfdOpen(pid: number): number
  fdFlags(fd: number): { cloexec: boolean; nonblock: boolean }
  FdWatcher: new (fd: number, callback: (r: number | Error) => void) => NativeWatcher
}

/** @internal the fd-passing half of the addon */
export const fdNative = native as unknown as FdNative

const READABLE = 1
const WRITABLE = 2
const MAX_FDS = 253

/** A UffdError for protocol-level failures (no syscall failed, but the message is unusable). */
export function protocolError(code: string, syscall: string, detail: string): UffdError {
  const err = new UffdError(`${code}: ${detail}, ${syscall}`)
  err.code = code
  err.errno = (osConstants.errno as Record<string, number>)[code] ?? 0
  err.syscall = syscall
  return err
}

function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      native.close(fd)
    } catch {
      /* already closed */
    }
  }
}

function intOption(value: unknown, name: string, fallback: number, min: number, max: number): number {
  if (value === undefined) return fallback
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer ${min}..${max} (got ${describe(value)})`)
  }
  return value
}

/**
 * The fd of a socket, with Node's reading stopped so that it cannot swallow the fds (a read(2)
 * on a Unix socket discards them). For a server, create it with { pauseOnConnect: true }; for a
 * client, do not read from the socket before the fds arrived.
 */
export function socketFd(socket: SocketLike): number {
  if (typeof socket === 'number') {
    if (!Number.isSafeInteger(socket) || socket < 0)
      throw new TypeError(`socket fd must be a non-negative integer (got ${socket})`)
    return socket
  }
  if (!(socket instanceof net.Socket))
    throw new TypeError(`socket must be a net.Socket or an fd (got ${describe(socket)})`)
  const handle = (socket as unknown as { _handle?: { fd?: number; reading?: boolean; readStop?: () => number } })
    ._handle
  const fd = handle?.fd
  if (handle === undefined || handle === null || typeof fd !== 'number' || fd < 0) {
    throw protocolError(
      'EBADF',
      'socketFd',
      socket.connecting ? 'the socket is still connecting' : 'the socket has no fd (closed, or not a Unix socket)',
    )
  }
  if (socket.readableFlowing !== false) socket.pause()
  if (handle.reading) {
    handle.reading = false
    handle.readStop?.()
  }
  return fd
}

/** A connected pair of Unix sockets (non-blocking, close-on-exec), as raw fds: close them yourself. */
export function socketPair(type: 'stream' | 'seqpacket' | 'dgram' = 'stream'): [number, number] {
  return fdNative.socketpair(type)
}

/** SO_PEERCRED of a connected Unix socket: for allow-lists (uid/gid), and to watch the peer (pid). */
export function peerCredentials(socket: SocketLike): PeerCredentials {
  return fdNative.peerCred(socketFd(socket))
}

/**
 * An fd-passing endpoint over one socket: one event-loop watcher reused by every send and
 * receive. close() releases the watcher; the socket itself stays the caller's.
 */
export class FdChannel {
  /** The socket's fd. */
  readonly fd: number
  #watcher: NativeWatcher | undefined
  #pending: { resolve: (events: number) => void; reject: (e: unknown) => void } | undefined
  #buffer: Buffer | undefined
  #closed = false

  constructor(socket: SocketLike) {
    this.fd = socketFd(socket)
  }

  /** The peer's credentials (SO_PEERCRED). */
  peer(): PeerCredentials {
    return fdNative.peerCred(this.fd)
  }

  /**
   * Sends `payload` with `fds` attached (SCM_RIGHTS). The fds are duplicated into the peer: the
   * caller still owns (and should close) its own copies. Resolves when every byte was sent.
   */
  async send(
    payload: string | ArrayBufferView,
    fds: readonly number[] | Userfaultfd = [],
    options: { signal?: AbortSignal } = {},
  ): Promise<void> {
    const list = Array.isArray(fds) ? [...fds] : [(fds as Userfaultfd).fd]
    if (list.length > MAX_FDS) throw new RangeError(`at most ${MAX_FDS} fds per message (got ${list.length})`)
    const bytes = typeof payload === 'string' ? Buffer.from(payload) : payload
    if (!ArrayBuffer.isView(bytes))
      throw new TypeError(`payload must be a string or an ArrayBufferView (got ${describe(payload)})`)
    if (bytes.byteLength === 0) {
      if (list.length > 0) throw new RangeError('fds need a payload of at least one byte')
      return
    }
    let view = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    let attach: number[] | undefined = list
    while (view.byteLength > 0) {
      this.#live()
      const n = fdNative.sendFds(this.fd, view, attach)
      if (n < 0) {
        await this.#wait(WRITABLE, options.signal)
        continue
      }
      attach = undefined // the fds went with the first byte sent
      view = view.subarray(n)
    }
  }

  /**
   * Receives one message: the bytes that one recvmsg returns (on a stream socket the payload
   * may come in pieces; fds always come with the first) and the fds attached to it.
   */
  async receive(options: ReceiveOptions = {}): Promise<ReceivedMessage> {
    if (options === null || typeof options !== 'object')
      throw new TypeError(`receive options must be an object (got ${describe(options)})`)
    const maxBytes = intOption(options.maxBytes, 'maxBytes', 65536, 1, 1 << 26)
    const maxFds = intOption(options.maxFds, 'maxFds', 1, 0, MAX_FDS)
    const minFds = intOption(options.minFds, 'minFds', 0, 0, maxFds)
    options.signal?.throwIfAborted()
    // One byte more than allowed: a message that fills it is too large.
    if (this.#buffer === undefined || this.#buffer.length < maxBytes + 1)
      this.#buffer = Buffer.allocUnsafe(maxBytes + 1)
    const buffer = this.#buffer.subarray(0, maxBytes + 1)
    for (;;) {
      this.#live()
      const r = fdNative.recvFds(this.fd, buffer, maxFds)
      if (r === null) {
        await this.#wait(READABLE, options.signal)
        continue
      }
      if (r.truncated) {
        throw protocolError(
          'EPROTO',
          'recvmsg',
          `control data truncated (MSG_CTRUNC): the peer sent more fds than the ${maxFds} expected; the ${r.dropped} that arrived were closed`,
        )
      }
      if (r.extraFds) {
        throw protocolError(
          'EPROTO',
          'recvmsg',
          `the peer sent ${r.dropped} fds, at most ${maxFds} expected; all were closed`,
        )
      }
      if (r.bytes > maxBytes || r.payloadTruncated) {
        closeFds(r.fds)
        throw protocolError('EMSGSIZE', 'recvmsg', `message larger than ${maxBytes} bytes`)
      }
      if (r.fds.length < minFds) {
        closeFds(r.fds)
        throw protocolError(
          'EPROTO',
          'recvmsg',
          r.bytes === 0
            ? `the peer closed the connection before sending ${minFds === 1 ? 'an fd' : `${minFds} fds`}`
            : `expected ${minFds === 1 ? 'an fd' : `at least ${minFds} fds`} with the message, got ${r.fds.length}`,
        )
      }
      return { data: Buffer.from(buffer.subarray(0, r.bytes)), fds: r.fds, end: r.bytes === 0 }
    }
  }

  /** Keeps the process alive while waiting (default), or not. */
  ref(): this {
    this.#watcher?.ref()
    return this
  }

  /** Lets the process exit while a receive waits. */
  unref(): this {
    this.#watcher?.unref()
    return this
  }

  /** Idempotent. A pending send/receive rejects with EBADF. The socket is not closed. */
  close(): void {
    if (this.#closed) return
    this.#closed = true
    this.#watcher?.close()
    this.#watcher = undefined
    const p = this.#pending
    this.#pending = undefined
    p?.reject(protocolError('EBADF', 'FdChannel', 'the channel was closed'))
  }

  /** close(). */
  [Symbol.dispose](): void {
    this.close()
  }

  #live(): void {
    if (this.#closed) throw protocolError('EBADF', 'FdChannel', 'the channel was closed')
  }

  #wait(events: number, signal: AbortSignal | undefined): Promise<number> {
    this.#live()
    if (this.#pending !== undefined)
      return Promise.reject(protocolError('EBUSY', 'FdChannel', 'one send or receive at a time per channel'))
    signal?.throwIfAborted()
    if (this.#watcher === undefined) {
      this.#watcher = new fdNative.FdWatcher(this.fd, (r) => {
        const p = this.#pending
        this.#pending = undefined
        if (p === undefined) return
        if (typeof r === 'number') p.resolve(r)
        else p.reject(r)
      })
    }
    const watcher = this.#watcher
    return new Promise<number>((resolve, reject) => {
      const onAbort = (): void => {
        watcher.stop()
        this.#pending = undefined
        reject(signal!.reason)
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      this.#pending = {
        resolve: (v) => {
          signal?.removeEventListener('abort', onAbort)
          resolve(v)
        },
        reject: (e) => {
          signal?.removeEventListener('abort', onAbort)
          reject(e)
        },
      }
      watcher.wait(events)
    })
  }
}

/** Sends `payload` with `fds` (or a Userfaultfd's fd) attached. See FdChannel.send. */
export async function sendFds(
  socket: SocketLike,
  payload: string | ArrayBufferView,
  fds: readonly number[] | Userfaultfd,
  options: { signal?: AbortSignal } = {},
): Promise<void> {
  const channel = new FdChannel(socket)
  try {
    await channel.send(payload, fds, options)
  } finally {
    channel.close()
  }
}

/** Receives one message and its fds, with the peer's credentials. See FdChannel.receive. */
export async function receiveFds(
  socket: SocketLike,
  options: ReceiveOptions = {},
): Promise<ReceivedMessage & { peer: PeerCredentials }> {
  const channel = new FdChannel(socket)
  try {
    const msg = await channel.receive(options)
    try {
      return { ...msg, peer: channel.peer() }
    } catch (err) {
      closeFds(msg.fds)
      throw err
    }
  } finally {
    channel.close()
  }
}

/** Opens a pidfd for `pid` (readable once the process exits). */
export function pidfdOpen(pid: number): number {
  return fdNative.pidfdOpen(pid)
}

/** Whether an fd has close-on-exec / O_NONBLOCK set. */
export function fdFlags(fd: number): { cloexec: boolean; nonblock: boolean } {
  return fdNative.fdFlags(fd)
}

/** @internal closes fds, ignoring ones already closed */
export { closeFds }

/**
 * Calls `onReady` once when `fd` becomes readable (e.g. a pidfd: its process exited), from the
 * event loop. Returns a canceller. The watcher does not keep the process alive.
 */
export function whenReadable(fd: number, onReady: (error?: Error) => void): () => void {
  let watcher: NativeWatcher | undefined = new fdNative.FdWatcher(fd, (r) => {
    cancel()
    onReady(typeof r === 'number' ? undefined : r)
  })
  watcher.unref()
  watcher.wait(READABLE)
  function cancel(): void {
    watcher?.close()
    watcher = undefined
  }
  return cancel
}
