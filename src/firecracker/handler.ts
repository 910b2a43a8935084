// A Firecracker-compatible page-fault handler: listens on a Unix socket; each connection (one
// VM) sends the region JSON with its uffd attached; this file is the protocol (handshake, peers,
// lifecycle), and each connection's faults are served by one native FaultServer
// (./engine-connection.ts): from the memory snapshot file (straight from a private read-only mmap
// of it, or with { readMethod: 'pread' } through the engine's own buffer) or a remote snapshot,
// with fault-around, in the page size each region names (2 MiB on hugetlbfs guests).
//
// Each connection is independent: a peer that sends garbage, dies mid-stream or misbehaves
// ends only its own connection (its uffd, socket and pidfd are closed); the server keeps
// serving the others. A VM's exit is seen through a pidfd of the peer (SO_PEERCRED pid), and
// UFFDIO_COPY failing with ESRCH: either ends that connection cleanly.
import * as fs from 'node:fs'
import * as net from 'node:net'
import type { ReadMethod, RemovePolicy, SourceErrorPolicy } from '../addon/binding'
import type { UffdError } from '../core/errors'
import { Userfaultfd } from '../core/userfaultfd'
import type { ServerMetricsSource } from '../engines/fault-metrics'
import type { FaultServerError } from '../engines/fault-server'
import { FaultTrace } from '../engines/fault-trace'
import { FdChannel, closeFds, pidfdOpen, whenReadable, type PeerCredentials } from '../ipc/fd-passing'
import { isUserfaultfd } from '../ipc/uffd-passing'
import { isListening } from '../ipc/unix-socket'
import { describe } from '../util/validate'
import { debug } from '../util/diagnostics'
import { type HistogramJSON, LatencyHistogram, type LatencySummary } from '../util/histogram'
import { TypedEmitter } from '../util/typed-emitter'
import { checkRenamed, choice } from '../util/validate'
import { openMemFile } from './mem-file'
import { observe } from './observe'
import { ProtocolError, firecrackerHandshake, type GuestRegion } from './protocol'
import { parseLocation } from '../sources/location'
import { RemoteSource, type RemoteOptions } from '../sources/remote'
import { fileIdentity } from '../sources/snapshot-identity'
import { WorkingSet } from '../sources/working-set'
import { EngineConnection, type EngineSnapshot } from './engine-connection'

export type { ReadMethod, RemovePolicy } from '../addon/binding'

/** Options of FirecrackerHandler.listen(). */
export interface FirecrackerHandlerOptions {
  /** Unix socket path to listen on (Firecracker's mem_backend.backend_path). */
  socketPath: string
  /** The memory snapshot file (Firecracker's snapshot mem_file_path). */
  memFile: string
  /**
   * UFFD_EVENT_REMOVE (balloon inflation, MADV_DONTNEED): 'zero' (default) remembers the range
   * and serves zero pages for later faults there; 'unregister' unregisters the range so later
   * faults are the kernel's own (zero pages for anonymous memory) and never reach the handler;
   * 'source' serves the memory file again there (FaultServer's vocabulary, the same values).
   */
  onRemove?: RemovePolicy
  /**
   * Where the memory file cannot give a page a vCPU waits on (truncated, EIO): 'retry'
   * (default: again with backoff until it can), 'poison' (the vCPU gets SIGBUS; Linux 6.6+) or
   * 'zero' (zeros). Each connection's FaultServer onSourceError; every failure is a 'warning'.
   */
  onSourceError?: SourceErrorPolicy
  /** Who may connect. Default: the same uid as this process, or root. */
  allow?: (peer: PeerCredentials) => boolean
  /** Largest handshake message (default 65536 bytes). */
  maxMessageBytes?: number
  /** Time for a peer to send its complete handshake (default 5000 ms). */
  handshakeTimeout?: number
  /** 'mmap' (default): copy from a private read-only mapping of the file; 'pread': through a buffer. */
  readMethod?: ReadMethod
  /** Remove a stale socket file left by a dead handler (default true). */
  replaceStaleSocket?: boolean
  /**
   * memFile may be a URL: nbd://host:port/export, nbd+unix:///export?socket=PATH, http(s)://...
   * (or file:). Remote snapshots are read through one RemoteSource shared by every VM, with
   * these options (cache, manifest, headers, timeouts...), and served by a FaultServer per VM.
   */
  remote?: RemoteOptions
  /** Replay this working set (a WorkingSet or a file) for every VM: its pages first, in order. */
  workingSet?: WorkingSet | string
  /**
   * Record each VM's working set into this file, written when its connection ends (and on
   * close()): every first touch faults (4 KiB fault-around, no prefetch).
   */
  recordWorkingSet?: string
  /**
   * Fill the rest of the guest's memory in the background (after the working set). Default: true
   * for a remote snapshot, false for a local file (its pages are one copy away: lazily, a VM
   * only takes the memory it touches).
   */
  prefetch?: boolean
  /**
   * Record every fault of every connection in this trace (`serve --trace FILE`): each
   * connection's FaultServer writes its faults there (kind, address, wait, thread). You close it.
   */
  trace?: FaultTrace
}

/** What a connection, or the handler in all, has served. */
export interface ServingCounts {
  /** Fault messages read. */
  faults: number
  /** Pages copied from the snapshot (the regions' pages: 2 MiB ones count one), fault-around included. */
  pagesServed: number
  /** Bytes copied from the snapshot. */
  bytesServed: number
  /** Zero pages served (after UFFD_EVENT_REMOVE, or past the end of the snapshot). */
  zeroPages: number
  /** UFFD_EVENT_REMOVE events (balloon inflation, MADV_DONTNEED). */
  removes: number
  /** Copies that found the page already there (EEXIST: a benign race). */
  exists: number
  /** Copies deferred by EAGAIN while an event was pending, then retried. */
  deferred: number
}

/** One connection (one VM): who, and what it was served. */
export interface ConnectionStats extends ServingCounts {
  /** Numbered from 1 in the order peers connected. */
  id: number
  /** The peer (SO_PEERCRED). */
  peer: PeerCredentials
  /** Regions its handshake declared. */
  regions: number
  /** faults waiting for their bytes now (remote snapshots) */
  waiting?: number
  /** pages (of the regions' page size) of the guest present now, and in all (after 'ready') */
  pagesPresent?: number
  pagesTotal?: number
  /** bytes of the guest present now, and in all (after 'ready') */
  bytesPresent?: number
  bytesTotal?: number
}

/** The handler's totals over every connection (FirecrackerHandler.stats()). */
export interface HandlerStats extends ServingCounts {
  /** Connections open now, ever, and ended by an error. */
  connections: { active: number; total: number; failed: number }
  /** latency from reading a fault to its page filled, over every connection (FaultServer's latencyUs) */
  latencyUs: LatencySummary
}

/** The snapshot every connection reads: its size, how the engine reads it, and its close. */
interface Snapshot {
  size: number
  engine: EngineSnapshot
  close(): void
}

// The memory file (a regular file or a block device), opened once: every connection's
// FaultServer dups this fd (and maps it, with readMethod 'mmap'), so the file is the one listen()
// checked whatever happens to its path, and its size then is the snapshot's.
function openFile(path: string, readMethod: ReadMethod): Snapshot {
  const { fd, size } = openMemFile(path) // libuv sets O_CLOEXEC
  try {
    return { size, engine: { fd, size, readMethod }, close: () => fs.closeSync(fd) }
  } catch (err) {
    fs.closeSync(fd)
    throw err
  }
}

/** The limits a peer's handshake is held to: the range each may take, and its default. */
export const HANDSHAKE_LIMITS = {
  /** ms; the largest delay a Node timer can wait (a larger one would fire at once) */
  handshakeTimeout: { min: 1, max: 2 ** 31 - 1, default: 5000 },
  /** bytes; FdChannel.receive's own bound */
  maxMessageBytes: { min: 2, max: 2 ** 26, default: 65536 },
} as const

/**
 * Checks handshakeTimeout and maxMessageBytes (absent: their defaults): a TypeError for what is
 * not a number, a RangeError for a number that is not an integer in range. Used by listen()
 * and by `userfaultfd serve`, so that a bad value fails at start, not on every connection.
 */
export function checkHandshakeLimits(options: { handshakeTimeout?: unknown; maxMessageBytes?: unknown }): {
  handshakeTimeout: number
  maxMessageBytes: number
} {
  const out = { handshakeTimeout: 0, maxMessageBytes: 0 }
  for (const name of ['handshakeTimeout', 'maxMessageBytes'] as const) {
    const { min, max, default: fallback } = HANDSHAKE_LIMITS[name]
    const v = options[name]
    if (v === undefined) {
      out[name] = fallback
      continue
    }
    const unit = name === 'handshakeTimeout' ? 'milliseconds' : 'bytes'
    if (typeof v !== 'number') throw new TypeError(`${name} must be a number of ${unit} (got ${describe(v)})`)
    if (!Number.isSafeInteger(v) || v < min || v > max)
      throw new RangeError(`${name} must be an integer number of ${unit} from ${min} to ${max} (got ${describe(v)})`)
    out[name] = v
  }
  return out
}

function defaultAllow(peer: PeerCredentials): boolean {
  const uid = process.getuid?.() ?? 0
  return peer.uid === uid || peer.uid === 0
}

let nextId = 1
const EMPTY: HistogramJSON = { count: 0, buckets: [] }

/** One VM: its socket, uffd, regions, and the loop serving its faults. */
class Connection {
  readonly id = nextId++
  readonly stats: ConnectionStats
  readonly #handler: FirecrackerHandler
  readonly #socket: net.Socket
  readonly #channel: FdChannel
  #uffd: Userfaultfd | undefined
  #regions: GuestRegion[] = []
  #cancelPidfd: (() => void) | undefined
  #pidfd = -1
  #ended = false
  #engine: EngineConnection | undefined
  #engineSeen = { faults: 0, pagesServed: 0, bytesServed: 0, zeroPages: 0, removes: 0, exists: 0, deferred: 0 }
  #endedSignal: (() => void) | undefined
  /** faults waiting for bytes now */
  waiting = 0
  /** bytes of the guest present, and in all (0/0 before 'ready') */
  present = { pages: 0, pagesTotal: 0, bytes: 0, total: 0 }

  constructor(handler: FirecrackerHandler, socket: net.Socket) {
    this.#handler = handler
    this.#socket = socket
    socket.on('error', () => {
      /* reported through end() */
    })
    this.#channel = new FdChannel(socket)
    this.stats = {
      id: this.id,
      peer: { pid: 0, uid: -1, gid: -1 },
      regions: 0,
      faults: 0,
      pagesServed: 0,
      bytesServed: 0,
      zeroPages: 0,
      removes: 0,
      exists: 0,
      deferred: 0,
    }
  }

  get ended(): boolean {
    return this.#ended
  }

  async run(): Promise<void> {
    try {
      this.stats.peer = this.#channel.peer()
      if (!this.#handler.allow(this.stats.peer)) {
        throw new ProtocolError(`peer uid ${this.stats.peer.uid} (pid ${this.stats.peer.pid}) is not allowed`)
      }
      await this.#handshake()
      if (this.#ended) return
      this.#handler.emit('ready', this.stats, this.#regions)
      await this.#serve()
      this.end()
    } catch (err) {
      this.end(err as Error)
    }
  }

  async #handshake(): Promise<void> {
    const { handshakeTimeout, maxMessageBytes } = this.#handler
    const signal = AbortSignal.timeout(handshakeTimeout)
    // The bytes as they come, in as many pieces as the stream delivers (split anywhere, even
    // inside a character): framed by the JSON grammar, decoded and parsed once, when complete.
    const format = firecrackerHandshake
    const framer = format.framer()
    const pieces: Buffer[] = []
    let received = 0
    let fd = -1
    try {
      for (;;) {
        const first = fd < 0
        // Byte 0 carries the uffd; later pieces of a split message must carry nothing.
        let msg: Awaited<ReturnType<FdChannel['receive']>>
        try {
          msg = await this.#channel.receive({
            maxBytes: maxMessageBytes - received,
            maxFds: first ? 1 : 0,
            signal,
          })
        } catch (err) {
          const e = err as UffdError & { name?: string }
          if (e.name === 'TimeoutError') throw new ProtocolError(`incomplete handshake after ${handshakeTimeout} ms`)
          if (e.code === 'EMSGSIZE') throw new ProtocolError(`handshake message larger than ${maxMessageBytes} bytes`)
          if (e.code === 'EPROTO')
            throw new ProtocolError(
              first
                ? `expected exactly one fd with the handshake: ${e.message}`
                : `unexpected fd after the handshake's first bytes: ${e.message}`,
            )
          throw err
        }
        if (msg.end)
          throw new ProtocolError(
            received === 0
              ? 'the peer closed the connection without sending the handshake'
              : 'the peer closed the connection mid-handshake (incomplete JSON)',
          )
        if (first) {
          if (msg.fds.length !== 1)
            throw new ProtocolError('the handshake carries no fd: the uffd must be attached (SCM_RIGHTS)')
          fd = msg.fds[0]
        }
        pieces.push(msg.data)
        received += msg.data.length
        if (framer.push(msg.data)) break
        if (received >= maxMessageBytes)
          throw new ProtocolError(`handshake message larger than ${maxMessageBytes} bytes`)
      }
      this.#regions = format.parse(Buffer.concat(pieces, received), { fileSize: this.#handler.snapshot.size })
      if (!isUserfaultfd(fd)) throw new ProtocolError('the fd attached to the handshake is not a userfaultfd')
      this.stats.regions = this.#regions.length
      this.#uffd = Userfaultfd.fromFd(fd)
      fd = -1
    } finally {
      if (fd >= 0) closeFds([fd])
    }
    // The socket has nothing more to say (Firecracker sends one message): free its watcher.
    this.#channel.close()
    // Learn when the VM exits (its uffd then has nothing more to serve).
    const pid = this.stats.peer.pid
    if (pid > 0) {
      try {
        this.#pidfd = pidfdOpen(pid)
        this.#cancelPidfd = whenReadable(this.#pidfd, () => this.end())
      } catch {
        /* already gone: ESRCH on the first copy ends it */
      }
    }
  }

  // One FaultServer serves the regions; this waits for the end (the VM's exit seen through its
  // pidfd, ESRCH, or close()).
  async #serve(): Promise<void> {
    const h = this.#handler
    const ended = new Promise<void>((resolve) => {
      this.#endedSignal = resolve
    })
    this.#engine = new EngineConnection(
      this.#uffd!,
      this.#regions,
      h.snapshot.engine,
      {
        onRemove: h.onRemove,
        onSourceError: h.onSourceError,
        workingSet: h.workingSet,
        record: h.recordWorkingSet !== undefined,
        prefetch: h.prefetch,
        trace: h.trace,
      },
      (err) => this.#onServeError(err),
    )
    if (this.#ended) return
    await ended
  }

  // ESRCH: the VM's address space is gone (it exited): a clean end. Anything else (a snapshot
  // that cannot be read, a remote read that failed) is a 'warning' with the faulting address:
  // the engine retries the fault with backoff, since a vCPU waits on it.
  #onServeError(err: FaultServerError): void {
    if ((err as { code?: string }).code === 'ESRCH') this.end()
    else this.#handler.emit('warning', this.stats, err)
  }

  /** Brings this.stats and the handler's totals up to date (from the connection's FaultServer). */
  refresh(): void {
    if (this.#engine === undefined || this.#engine.server.closed) return
    const c = this.#engine.counts()
    const totals = this.#handler.totals
    for (const k of Object.keys(this.#engineSeen) as Array<keyof ServingCounts>) {
      totals[k] += c[k] - this.#engineSeen[k]
      this.#engineSeen[k] = c[k]
      this.stats[k] = c[k]
    }
    this.waiting = c.waiting
    this.present = { pages: c.pagesPresent, pagesTotal: c.pagesTotal, bytes: c.bytesPresent, total: c.bytesTotal }
    this.stats.waiting = c.waiting
    this.stats.pagesPresent = c.pagesPresent
    this.stats.pagesTotal = c.pagesTotal
    this.stats.bytesPresent = c.bytesPresent
    this.stats.bytesTotal = c.bytesTotal
  }

  /** The connection's demand-latency histogram so far (empty before 'ready'). */
  latency(): HistogramJSON {
    return this.#engine === undefined || this.#engine.server.closed ? EMPTY : this.#engine.latencyHistogram()
  }

  /** Its FaultServer's raw metrics, labelled with the connection (none before 'ready'). */
  metricsSource(): ServerMetricsSource | undefined {
    const m = this.#engine?.server._metricsSource()
    return m === undefined ? undefined : { ...m, labels: { connection: String(this.id) } }
  }

  /** Idempotent: closes the uffd, the socket, the pidfd; reports why it ended. */
  end(error?: Error): void {
    if (this.#ended) return
    this.#ended = true
    if (this.#engine !== undefined) {
      this.refresh()
      this.#handler.keepLatency(this.#engine.latencyHistogram())
      const file = this.#handler.recordWorkingSet
      if (file !== undefined) this.#handler.saveWorkingSet(this.stats, this.#engine.workingSet(), file)
      this.#engine.close()
    }
    this.#endedSignal?.()
    this.#uffd?.close()
    this.#channel.close()
    this.#cancelPidfd?.()
    if (this.#pidfd >= 0) closeFds([this.#pidfd])
    this.#pidfd = -1
    this.#socket.destroy()
    this.#handler.connectionEnded(this, error)
  }
}

/** The handler's events and their listeners' arguments. */
export interface FirecrackerHandlerEvents {
  /** a peer connected (its handshake is still to come) */
  connection: [connection: ConnectionStats]
  /** a peer's handshake was valid: its faults are served from now on */
  ready: [connection: ConnectionStats, regions: GuestRegion[]]
  /** a connection ended: cleanly (the VM exited, or close()) or with the error that ended it */
  end: [connection: ConnectionStats, error: Error | undefined]
  /** the listening socket failed (after listen() succeeded) */
  serverError: [error: Error]
  /** an error a connection survives: a remote read that failed and is retried */
  warning: [connection: ConnectionStats, error: Error]
  /** a recorded working set was written (recordWorkingSet) */
  workingSet: [connection: ConnectionStats, file: string, pages: number]
}

/**
 * The handler. Events (typed: see FirecrackerHandlerEvents): 'connection', 'ready', 'end' for
 * every connection, 'serverError'; a connection's error never becomes an 'error' event of the
 * handler.
 */
export class FirecrackerHandler extends TypedEmitter<FirecrackerHandlerEvents> {
  /** The socket it listens on. */
  readonly socketPath: string
  /** See FirecrackerHandlerOptions.onRemove. */
  readonly onRemove: RemovePolicy
  /** See FirecrackerHandlerOptions.maxMessageBytes. */
  readonly maxMessageBytes: number
  /** See FirecrackerHandlerOptions.handshakeTimeout. */
  readonly handshakeTimeout: number
  /** See FirecrackerHandlerOptions.onSourceError. */
  readonly onSourceError: SourceErrorPolicy
  /** Who may connect (see FirecrackerHandlerOptions.allow). */
  readonly allow: (peer: PeerCredentials) => boolean
  /** @internal the snapshot every connection reads */
  readonly snapshot: Snapshot
  /** @internal */
  workingSet: WorkingSet | undefined
  /** @internal */
  recordWorkingSet: string | undefined
  /** @internal */
  prefetch: boolean
  #remote: RemoteSource | undefined
  readonly #saves = new Set<Promise<void>>()
  /** See FirecrackerHandlerOptions.trace. */
  readonly trace: FaultTrace | undefined
  /** @internal */
  readonly totals = { faults: 0, pagesServed: 0, bytesServed: 0, zeroPages: 0, removes: 0, exists: 0, deferred: 0 }
  readonly #server: net.Server
  readonly #connections = new Set<Connection>()
  /** latency of the connections that ended (live ones are asked) */
  readonly #latency = new LatencyHistogram()
  #total = 0
  #failed = 0
  #closed = false

  private constructor(options: FirecrackerHandlerOptions, snapshot: Snapshot, remote: boolean) {
    super()
    this.socketPath = options.socketPath
    this.onRemove = options.onRemove ?? 'zero'
    this.onSourceError = options.onSourceError ?? 'retry'
    const limits = checkHandshakeLimits(options)
    this.maxMessageBytes = limits.maxMessageBytes
    this.handshakeTimeout = limits.handshakeTimeout
    this.allow = options.allow ?? defaultAllow
    this.snapshot = snapshot
    this.prefetch = options.prefetch ?? remote
    this.recordWorkingSet = options.recordWorkingSet
    this.trace = options.trace
    // pauseOnConnect: Node must never read these sockets (a read(2) would discard the uffd).
    this.#server = net.createServer({ pauseOnConnect: true }, (socket) => this.#accept(socket))
  }

  /** Opens the memory file and listens. */
  static async listen(options: FirecrackerHandlerOptions): Promise<FirecrackerHandler> {
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
    if (typeof options.socketPath !== 'string' || options.socketPath === '')
      throw new TypeError('socketPath must be a non-empty string')
    if (typeof options.memFile !== 'string' || options.memFile === '')
      throw new TypeError('memFile must be a non-empty string')
    checkRenamed(options, { source: 'readMethod' }, 'FirecrackerHandler.listen')
    choice(options.onRemove, 'onRemove', ['zero', 'source', 'unregister'] as const, 'zero')
    choice(options.onSourceError, 'onSourceError', ['retry', 'poison', 'zero'] as const, 'retry')
    const readMethod = choice(options.readMethod, 'readMethod', ['mmap', 'pread'] as const, 'mmap')
    if (options.recordWorkingSet !== undefined && typeof options.recordWorkingSet !== 'string')
      throw new TypeError('recordWorkingSet must be a file path')
    if (options.prefetch !== undefined && typeof options.prefetch !== 'boolean')
      throw new TypeError('prefetch must be a boolean')
    if (options.trace !== undefined && !(options.trace instanceof FaultTrace))
      throw new TypeError('trace must be a FaultTrace')
    checkHandshakeLimits(options)
    const location = parseLocation(options.memFile)
    let remote: RemoteSource | undefined
    let snapshot: Snapshot
    if (location.kind === 'file') {
      snapshot = openFile(location.path, readMethod)
    } else {
      remote = await RemoteSource.open(location.url, options.remote)
      const r = remote
      snapshot = {
        size: r.size,
        engine: { remote: r },
        close: () => {
          r.close().catch(() => undefined)
        },
      }
    }
    const handler = new FirecrackerHandler(options, snapshot, remote !== undefined)
    try {
      handler.#remote = remote
      const ws = typeof options.workingSet === 'string' ? WorkingSet.load(options.workingSet) : options.workingSet
      if (ws !== undefined) {
        if (!(ws instanceof WorkingSet)) throw new TypeError('workingSet must be a WorkingSet or a file path')
        if (options.recordWorkingSet !== undefined)
          throw new TypeError('a handler cannot both replay (workingSet) and record (recordWorkingSet)')
        // a working set for another snapshot version is refused now
        if (remote !== undefined) ws.check(await remote.identity())
        else ws.check(fileIdentity((snapshot.engine as { fd: number }).fd))
      }
      handler.workingSet = ws
      await handler.#listen(options.replaceStaleSocket ?? true)
    } catch (err) {
      snapshot.close()
      throw err
    }
    return handler
  }

  /** The remote snapshot (memFile was a URL), shared by every VM. */
  get remote(): RemoteSource | undefined {
    return this.#remote
  }

  /** @internal Writes a recorded working set once known; close() waits for it. */
  saveWorkingSet(conn: ConnectionStats, ws: Promise<WorkingSet>, file: string): void {
    const p: Promise<void> = ws
      .then((set) => {
        set.save(file)
        this.emit('workingSet', conn, file, set.pages.length)
      })
      .catch((err: Error) => {
        this.emit('warning', conn, err)
      })
      .finally(() => this.#saves.delete(p))
    this.#saves.add(p)
  }

  /** Every event also goes to NODE_DEBUG and the diagnostics channels (./observe.ts). */
  override emit<K extends keyof FirecrackerHandlerEvents>(event: K, ...args: FirecrackerHandlerEvents[K]): boolean {
    observe(this, event, args)
    return super.emit(event, ...args)
  }

  async #listen(replaceStale: boolean): Promise<void> {
    const attempt = (): Promise<void> =>
      new Promise((resolve, reject) => {
        const onError = (err: Error): void => reject(err)
        this.#server.once('error', onError)
        this.#server.listen(this.socketPath, () => {
          this.#server.off('error', onError)
          this.#server.on('error', (err) => this.emit('serverError', err))
          resolve()
        })
      })
    try {
      await attempt()
    } catch (err) {
      // Only a socket file nobody listens on is stale; never unlink anything else.
      if (
        (err as NodeJS.ErrnoException).code !== 'EADDRINUSE' ||
        !replaceStale ||
        !isSocketFile(this.socketPath) ||
        (await isListening(this.socketPath))
      )
        throw err
      if (debug.enabled) debug('FirecrackerHandler %s: replacing a stale socket file', this.socketPath)
      fs.unlinkSync(this.socketPath)
      await attempt()
    }
    if (debug.enabled) debug('FirecrackerHandler %s: listening', this.socketPath)
  }

  #accept(socket: net.Socket): void {
    if (this.#closed) {
      socket.destroy()
      return
    }
    this.#total++
    const conn = new Connection(this, socket)
    this.#connections.add(conn)
    this.emit('connection', conn.stats)
    void conn.run()
  }

  /** @internal */
  connectionEnded(conn: Connection, error?: Error): void {
    this.#connections.delete(conn)
    if (error !== undefined) this.#failed++
    this.emit('end', conn.stats, error)
  }

  /** @internal an ended connection's latency histogram */
  keepLatency(h: HistogramJSON): void {
    this.#latency.merge(h)
  }

  /** Totals over every connection so far, and their latency (every connection's engine). */
  stats(): HandlerStats {
    const latency = LatencyHistogram.fromJSON(this.#latency.toJSON())
    for (const c of this.#connections) {
      c.refresh()
      latency.merge(c.latency())
    }
    return {
      connections: { active: this.#connections.size, total: this.#total, failed: this.#failed },
      ...this.totals,
      latencyUs: latency.summary(),
    }
  }

  /** Per-connection stats of the connections still open. */
  connections(): ConnectionStats[] {
    return [...this.#connections].map((c) => {
      c.refresh()
      return c.stats
    })
  }

  /**
   * @internal Each open connection's FaultServer metrics (per range: faults, blocked time, pages by class,
   * stage histograms), labelled with its `connection` number: for `serve --metrics-port`.
   */
  metricsSources(): ServerMetricsSource[] {
    const out: ServerMetricsSource[] = []
    for (const c of this.#connections) {
      const m = c.metricsSource()
      if (m !== undefined) out.push(m)
    }
    return out
  }

  /**
   * Faults waiting for bytes, and the guests' memory present / in all over the open connections:
   * in bytes, and in pages (each guest's own page size: 2 MiB pages count one).
   */
  progress(): { waiting: number; pagesPresent: number; pagesTotal: number; bytesPresent: number; bytesTotal: number } {
    const p = { waiting: 0, pagesPresent: 0, pagesTotal: 0, bytesPresent: 0, bytesTotal: 0 }
    for (const c of this.#connections) {
      c.refresh()
      p.waiting += c.waiting
      p.pagesPresent += c.present.pages
      p.pagesTotal += c.present.pagesTotal
      p.bytesPresent += c.present.bytes
      p.bytesTotal += c.present.total
    }
    return p
  }

  /** Stops listening, ends every connection (their VMs lose their handler), unmaps the file. */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()))
    for (const conn of [...this.#connections]) conn.end()
    await closed
    // recorded working sets are written before the snapshot goes
    while (this.#saves.size > 0) await Promise.all([...this.#saves])
    this.snapshot.close()
  }

  /** close(), for `await using handler = await FirecrackerHandler.listen(...)`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}

function isSocketFile(path: string): boolean {
  try {
    return fs.lstatSync(path).isSocket()
  } catch {
    return false
  }
}
