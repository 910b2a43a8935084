// MigrationTarget: the end that receives the memory. It listens (TCP, or TLS), authenticates the
// source, allocates (or is given) Mappings matching the source's ranges, receives the pre-copy
// rounds into them, and at the switchover registers them with a userfaultfd whose faults its
// native session serves (native/engine/migration_target.cc, through the FaultServer engine):
// the workload runs at once ('resume'), pages not here yet are fetched on demand over a channel
// of their own while the rest arrives in the background. If the connection breaks in post-copy,
// faulting threads stay blocked and the source reconnects; if it never comes back, the
// `onSourceLoss` policy decides: 'wait' (keep them blocked), 'poison' (SIGBUS) or 'zero'.
import { EventEmitter } from 'node:events'
import * as net from 'node:net'
import { constants as osConstants } from 'node:os'
import * as tls from 'node:tls'
import type { MigrationNotice, MigrationTargetHandle } from '../addon/binding'
import { native } from '../addon/native'
import { Feature } from '../core/constants'
import { UnsupportedError } from '../core/errors'
import { Mapping } from '../core/mapping'
import { toRange } from '../core/range'
import { Userfaultfd } from '../core/userfaultfd'
import { choice, describe, optionalInt } from '../util/validate'
import { AuthError, resolveSecret, type SecretOptions } from './auth'
import { type Control, DEFAULT_POSTCOPY_PRIORITY, decodeControl, finite, type Phase, postcopyTuning } from './common'
import { type MigrationEndpoint, FrameConn, handOver, parseEndpoint, reject, targetHandshake } from './transport'
import { encodeJson, FrameType, type MigrationMode, ProtocolError, type MigrationRangeInfo, type Setup } from './wire'

const ECANCELED = osConstants.errno.ECANCELED

export type SourceLossPolicy = 'wait' | 'poison' | 'zero'

/** Memory a migration lands in: a Mapping, or (anonymous memory only) a range of it. */
export type MigrationTargetMemory = Mapping | { address: bigint; length: number }

function isMemfd(m: MigrationTargetMemory): m is Mapping {
  return m instanceof Mapping && m.kind === 'memfd'
}

function pageSizeOf(m: MigrationTargetMemory): number {
  return m instanceof Mapping ? m.pageSize : 4096
}

export interface MigrationTargetOptions extends SecretOptions {
  /** where to listen: 'HOST:PORT' or { host, port } (default 127.0.0.1:0, any free port) */
  listen?: string | MigrationEndpoint
  /** TLS: node:tls server options (key, cert, ...); the source must then use TLS too */
  tls?: tls.TlsOptions
  /**
   * The memory to receive into, given the source's ranges (default: new Mappings of the same
   * kinds: anonymous, memfd (shmem) or memfd with huge pages). memfd kinds must be memfd
   * Mappings; anonymous ones may also be { address, length } of this process's memory.
   */
  memory?: (ranges: MigrationRangeInfo[]) => MigrationTargetMemory[]
  /** when the source is gone for good in post-copy (default 'wait') */
  onSourceLoss?: SourceLossPolicy
  /** how long a lost source may take to come back before onSourceLoss applies (ms, default 10000) */
  sourceLossTimeoutMs?: number
  /** a PING when a channel was idle this long (ms, default 100) */
  heartbeatIntervalMs?: number
  /** a channel silent this long is lost (ms, default 1000) */
  heartbeatTimeoutMs?: number
  /** a peer must finish its handshake within this long (ms, default 10000) */
  handshakeTimeoutMs?: number
  /** the fault engine's adaptive spin bound (µs, default 0) */
  spinUs?: number
}

export interface TargetSetup {
  mode: MigrationMode
  ranges: MigrationRangeInfo[]
  mappings: MigrationTargetMemory[]
  /** what the source passed as `metadata` */
  metadata: unknown
}

export interface MigrationTargetResult {
  mode: MigrationMode
  bytes: number
  pagesTotal: number
  /** from the handshake to every page here */
  totalMs: number
  /** from the switchover (workload running) to every page here */
  postcopyMs: number
  precopyPages: number
  pushedPages: number
  demandPages: number
  duplicatePages: number
  discardedPages: number
  faults: number
  requests: number
  poisonedPages: number
  zeroedPages: number
  reconnects: number
  demandP50Us: number
  demandP99Us: number
  wireBytes: number
  verified: boolean | null
  mismatches: number
}

/** The source went away in post-copy and did not come back in time. */
export class SourceLostError extends Error {
  readonly code = 'ESOURCELOST'
  readonly policy: SourceLossPolicy
  /** pages that had not arrived */
  readonly missingPages: number
  result?: MigrationTargetResult
  constructor(policy: SourceLossPolicy, missingPages: number, detail: string) {
    const what =
      policy === 'wait'
        ? 'faulting threads stay blocked until the source reconnects'
        : policy === 'poison'
          ? 'they are poisoned: a thread touching one gets SIGBUS'
          : 'they are filled with zeros'
    super(`the migration source is gone (${detail}); ${missingPages} pages never arrived: ${what}`)
    this.name = 'SourceLostError'
    this.policy = policy
    this.missingPages = missingPages
  }
}

const Handle = native.MigrationTargetHandle

function allocate(ranges: MigrationRangeInfo[]): Mapping[] {
  const out: Mapping[] = []
  try {
    for (const r of ranges) {
      if (r.kind === 'anonymous') out.push(Mapping.anonymous(r.length))
      else out.push(Mapping.memfd(r.length, { hugetlb: r.kind === 'hugetlb', name: 'userfaultfd-migration' }))
    }
  } catch (err) {
    for (const m of out) m.unmap()
    throw err
  }
  return out
}

function featuresFor(ranges: MigrationRangeInfo[], policy: SourceLossPolicy): bigint {
  let f = 0n
  for (const r of ranges) {
    if (r.kind === 'shmem') f |= Feature.MISSING_SHMEM | Feature.MINOR_SHMEM
    if (r.kind === 'hugetlb') f |= Feature.MISSING_HUGETLBFS | Feature.MINOR_HUGETLBFS
  }
  if (policy === 'poison') f |= Feature.POISON
  return f
}

export class MigrationTarget extends EventEmitter {
  readonly #server: net.Server
  readonly #secret: Buffer | null
  readonly #memory: ((ranges: MigrationRangeInfo[]) => MigrationTargetMemory[]) | undefined
  readonly #policy: SourceLossPolicy
  readonly #lossMs: number
  readonly #pingMs: number
  readonly #timeoutMs: number
  readonly #handshakeMs: number
  readonly #spin: number

  #address: MigrationEndpoint = { host: '', port: 0 }

  #phase: Phase = 'listening'
  #setup: Setup | undefined
  #mappings: MigrationTargetMemory[] = []
  #aliases: Array<Mapping | undefined> = []
  #ownMappings = false
  #uffd: Userfaultfd | undefined
  /** the ranges are registered with the uffd (from the setup to the end) */
  #registered = false
  /** the switchover happened: the workload runs on this memory */
  #switched = false
  #handle: MigrationTargetHandle | undefined
  #gens: Record<string, number> = { main: 0, demand: 0 }
  #relays: Array<() => void> = []
  #ended = new Set<string>()
  #ticker: NodeJS.Timeout | undefined
  #lossTimer: NodeJS.Timeout | undefined
  #sourceLost = false
  #reconnects = 0
  #closed = false
  #verifyMask = { maskOffset: 0, maskLength: 0 }
  #verified: boolean | null = null
  #mismatches = 0
  #times = { setup: 0, switchover: 0, complete: 0 }
  /** from the switchover frame read to the workload released (ms): the target's share of the downtime */
  #resumeMs = 0
  #switchoverAt = 0n
  #done: Promise<MigrationTargetResult>
  #resolve!: (r: MigrationTargetResult) => void
  #reject!: (e: Error) => void
  #settled = false

  private constructor(server: net.Server, secret: Buffer | null, options: MigrationTargetOptions) {
    super()
    this.#server = server
    this.#secret = secret
    this.#memory = options.memory
    this.#policy = choice(options.onSourceLoss, 'onSourceLoss', ['wait', 'poison', 'zero'] as const, 'wait')
    this.#lossMs = optionalInt(options.sourceLossTimeoutMs, 'sourceLossTimeoutMs', 10_000, 0, 86_400_000)
    this.#pingMs = optionalInt(options.heartbeatIntervalMs, 'heartbeatIntervalMs', 100, 10, 60_000)
    this.#timeoutMs = optionalInt(options.heartbeatTimeoutMs, 'heartbeatTimeoutMs', 1000, 50, 600_000)
    this.#handshakeMs = optionalInt(options.handshakeTimeoutMs, 'handshakeTimeoutMs', 10_000, 100, 600_000)
    this.#spin = optionalInt(options.spinUs, 'spinUs', 0, 0, 100_000)
    this.#done = new Promise((resolve, reject) => {
      this.#resolve = resolve
      this.#reject = reject
    })
    this.#done.catch(() => {})
  }

  /** Listens for a source; resolves once listening (see `address`). */
  static async listen(options: MigrationTargetOptions = {}): Promise<MigrationTarget> {
    if (options === null || typeof options !== 'object')
      throw new TypeError(`options must be an object (got ${describe(options)})`)
    const secret = resolveSecret(options)
    const at = parseEndpoint(options.listen ?? '127.0.0.1:0', 'listen')
    if (options.memory !== undefined && typeof options.memory !== 'function')
      throw new TypeError(`memory must be a function (got ${describe(options.memory)})`)
    if (options.tls !== undefined && (options.tls === null || typeof options.tls !== 'object'))
      throw new TypeError(`tls must be node:tls server options (got ${describe(options.tls)})`)
    const policy = options.onSourceLoss
    if (policy === 'poison' && (Userfaultfd.probe().features & Feature.POISON) === 0n)
      throw new UnsupportedError(
        `onSourceLoss 'poison' needs UFFDIO_POISON (Linux 6.6+), which this kernel (${Userfaultfd.probe().kernel}) lacks`,
      )
    const accept = (s: net.Socket): void => {
      void target.#accept(s)
    }
    const server = options.tls ? tls.createServer(options.tls, accept) : net.createServer(accept)
    const target: MigrationTarget = new MigrationTarget(server, secret, options)
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(at.port, at.host, () => {
        server.off('error', reject)
        resolve()
      })
    })
    server.on('error', (err) => target.#emitError(err))
    const a = server.address() as net.AddressInfo
    target.#address = { host: a.address, port: a.port }
    return target
  }

  get address(): MigrationEndpoint {
    return this.#address
  }

  get phase(): Phase {
    return this.#phase
  }

  /** The memory being received into (empty before the source's SETUP). */
  get mappings(): readonly MigrationTargetMemory[] {
    return this.#mappings
  }

  /** Resolves when every page is here (and checked, if the source asked); rejects on failure. */
  get done(): Promise<MigrationTargetResult> {
    return this.#done
  }

  stats(): Record<string, number> {
    return this.#handle?.stats() ?? {}
  }

  /**
   * Checks every page against the source's hashes (sent with the source's `verify`). The mask
   * leaves bytes of each page out (default: the source's). Call it once the migration is
   * complete: it reads every page.
   */
  verify(mask: { maskOffset: number; maskLength: number } = this.#verifyMask): {
    verified: boolean
    mismatches: Array<{ range: number; page: number }>
  } {
    const h = this.#handle
    if (h === undefined || this.#registered || this.#closed)
      throw new Error('verify() needs a migration that completed')
    if (this.#mappings.some((m) => m instanceof Mapping && m.unmapped))
      throw new Error('verify(): a mapping was unmapped')
    const mismatches: Array<{ range: number; page: number }> = []
    for (let i = 0; i < this.#mappings.length; i++) {
      const bad = h.verify(i, mask.maskOffset, mask.maskLength)
      if (bad === null) throw new Error('the source sent no hashes (MigrationSource { verify: true })')
      for (const page of bad) mismatches.push({ range: i, page })
    }
    return { verified: mismatches.length === 0, mismatches }
  }

  /**
   * Stops listening and ends the migration. In post-copy, pages that never arrived are poisoned
   * first where the kernel can (touching one raises SIGBUS rather than reading zeros).
   * The Mappings it allocated stay mapped (they are the workload's memory now); unmap them
   * yourself when done.
   */
  close(): void {
    if (this.#closed) return
    this.#closed = true
    this.#server.close()
    if (this.#handle !== undefined && this.#switched && this.#registered && finite(this.#handle.stats().missing) > 0) {
      try {
        if (this.#uffd?.has(Feature.POISON)) this.#handle.settle(true)
      } catch {
        /* best effort */
      }
    }
    this.#finish(new Error('the migration target was closed'))
    this.#teardown()
  }

  [Symbol.dispose](): void {
    this.close()
  }

  // ---- connections --------------------------------------------------------------------------

  async #accept(socket: net.Socket): Promise<void> {
    socket.setNoDelay(true)
    socket.on('error', () => {})
    const conn = new FrameConn(socket)
    let setup: Setup
    try {
      ;({ setup } = await targetHandshake(conn, this.#secret, this.#handshakeMs))
    } catch (err) {
      socket.destroy()
      this.emit('rejected', err)
      if (!(err instanceof AuthError) && !(err instanceof ProtocolError)) return
      return
    }
    try {
      if (setup.channel === 'main' && !setup.resume) await this.#begin(conn, setup)
      else if (setup.channel === 'main') await this.#resumeMain(conn, setup)
      else await this.#join(conn, setup)
    } catch (err) {
      socket.destroy()
      this.emit('rejected', err)
      if (setup.channel === 'main' && !setup.resume && this.#setup?.session === setup.session) this.#abort(err as Error)
    }
  }

  async #begin(conn: FrameConn, setup: Setup): Promise<void> {
    if (this.#setup !== undefined || this.#closed) {
      await reject(conn, 'EBUSY', 'this target already has a migration')
      return
    }
    const needed = featuresFor(setup.ranges, this.#policy)
    const missing = needed & ~Userfaultfd.probe().features
    if (missing !== 0n) {
      await reject(conn, 'ENOTSUP', 'the target kernel lacks userfaultfd features these memory kinds need')
      throw new UnsupportedError(
        `the source's memory kinds need userfaultfd features this kernel (${Userfaultfd.probe().kernel}) lacks (0x${missing.toString(16)})`,
      )
    }
    this.#setup = setup
    this.#times.setup = performance.now()
    const meta = (setup.metadata ?? {}) as {
      user?: unknown
      verifyMask?: { maskOffset?: unknown; maskLength?: unknown }
      postcopyPriority?: unknown
    }
    if (meta.verifyMask) {
      this.#verifyMask = {
        maskOffset: finite(meta.verifyMask.maskOffset),
        maskLength: finite(meta.verifyMask.maskLength),
      }
    }
    let mappings: MigrationTargetMemory[]
    if (this.#memory !== undefined) {
      mappings = this.#memory(setup.ranges)
      this.#checkMemory(mappings, setup.ranges)
    } else {
      mappings = allocate(setup.ranges)
      this.#ownMappings = true
    }
    this.#mappings = mappings
    this.#aliases = mappings.map((m) => (isMemfd(m) ? m.alias() : undefined))
    this.#uffd = Userfaultfd.open({ features: needed })
    this.#handle = new Handle(
      mappings.map((m, i) => ({
        address: m.address,
        length: m.length,
        pageSize: pageSizeOf(m),
        alias: isMemfd(m) ? this.#aliases[i]?.address : undefined,
        memfd: isMemfd(m) ? m.fd : undefined,
      })),
      {
        pingMs: this.#pingMs,
        spinUs: this.#spin,
        // What the source asked for (its default if it said nothing).
        ...postcopyTuning(meta.postcopyPriority === 'throughput' ? 'throughput' : DEFAULT_POSTCOPY_PRIORITY).target,
      },
      (notices) => this.#onNotices(notices),
    )
    // Memory we did not just map may hold old contents: in post-copy every page is fetched
    // (dropped now, so that each faults); otherwise every page is overwritten by the first round
    // (populated now, so that pages are received straight into place).
    if (!this.#ownMappings) {
      if (setup.mode === 'postcopy') this.#handle.dropUnreceived()
      else this.#handle.populate()
    }
    // Registered now, not in the downtime: anonymous pages are installed by UFFDIO_COPY from the
    // first round on. Nothing may touch this memory before 'resume' (it would wait for the page).
    for (const m of mappings) this.#uffd.register(m, isMemfd(m) ? { missing: true, minor: true } : { missing: true })
    this.#registered = true
    this.#handle.registered(this.#uffd.fd)
    await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'new' }))
    const handle = this.#handle
    this.#relays.push(handOver(conn, (fd, initial) => (this.#gens.main = handle.attachMain(fd, initial))))
    this.#setPhase('precopy')
    this.#ticker = setInterval(() => this.#tick(), this.#pingMs)
    this.#ticker.unref?.()
    this.emit('setup', {
      mode: setup.mode,
      ranges: setup.ranges,
      mappings,
      metadata: meta.user,
    } satisfies TargetSetup)
  }

  #checkMemory(mappings: unknown, ranges: MigrationRangeInfo[]): void {
    if (!Array.isArray(mappings) || mappings.length !== ranges.length)
      throw new TypeError(`memory() must return ${ranges.length} Mapping(s)`)
    mappings.forEach((m, i) => {
      const r = ranges[i]
      if (!(m instanceof Mapping)) {
        if (r.kind !== 'anonymous') throw new TypeError(`memory()[${i}] must be a memfd Mapping`)
        const checked = toRange(m, `memory()[${i}]`)
        if (checked.length !== r.length) throw new RangeError(`memory()[${i}] must be ${r.length} bytes`)
        return
      }
      if (m.length !== r.length || m.pageSize !== r.pageSize)
        throw new RangeError(`memory()[${i}] must be ${r.length} bytes of ${r.pageSize}-byte pages`)
      if ((r.kind === 'anonymous') !== (m.kind === 'anonymous'))
        throw new TypeError(`memory()[${i}] must be ${r.kind === 'anonymous' ? 'anonymous' : 'a memfd'} Mapping`)
    })
  }

  async #resumeMain(conn: FrameConn, setup: Setup): Promise<void> {
    if (this.#setup === undefined || setup.session !== this.#setup.session) {
      await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'unknown' }))
      conn.socket.destroy()
      return
    }
    if (this.#phase === 'failed' || this.#sourceLost || this.#closed) {
      await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'aborted' }))
      conn.socket.destroy()
      return
    }
    if (!this.#switched && this.#phase !== 'complete' && this.#phase !== 'verifying') {
      // Lost before the switchover: the source still runs the workload; this migration is over.
      await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'aborted' }))
      conn.socket.destroy()
      this.#abort(new Error('the source reconnected before the switchover: the migration was abandoned'))
      return
    }
    const handle = this.#handle!
    this.#detach()
    if (this.#phase === 'complete' || this.#phase === 'verifying') {
      await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'complete', stats: this.#statsForSource() }))
      conn.socket.destroy()
      return
    }
    await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: 'postcopy', targetMs: this.#resumeMs }))
    this.#relays.push(handOver(conn, (fd, initial) => (this.#gens.main = handle.attachMain(fd, initial))))
    this.#ended.delete('main')
    // What is here, so that the source sends exactly the rest.
    for (let i = 0; i < this.#mappings.length; i++) {
      const bits = handle.have(i)
      const per = 1 << 20
      for (let off = 0; off < bits.length; off += per)
        handle.send('main', FrameType.HAVE, i, BigInt(off * 8), bits.subarray(off, Math.min(off + per, bits.length)))
    }
    this.#control({ t: 'have-done' })
  }

  async #join(conn: FrameConn, setup: Setup): Promise<void> {
    const live = this.#phase === 'precopy' || this.#phase === 'postcopy' || this.#phase === 'disconnected'
    if (this.#setup === undefined || setup.session !== this.#setup.session || !live || this.#handle === undefined) {
      await reject(conn, 'ESESSION', 'no such migration in progress')
      return
    }
    const handle = this.#handle
    await conn.sendFlushed(FrameType.ACCEPT, encodeJson({ state: this.#phase }))
    this.#relays.push(handOver(conn, (fd, initial) => (this.#gens.demand = handle.attachDemand(fd, initial))))
    this.#ended.delete('demand')
    if (setup.resume) {
      handle.resendRequests()
      if (this.#lossTimer !== undefined) clearTimeout(this.#lossTimer)
      this.#lossTimer = undefined
      this.#reconnects++
      this.#setPhase('postcopy')
      this.emit('reconnect', { reconnects: this.#reconnects })
    }
  }

  #detach(): void {
    this.#handle?.detach()
    for (const r of this.#relays.splice(0)) r()
    this.#ended.add('main')
    this.#ended.add('demand')
  }

  #lost(reason: Error): void {
    if (this.#closed || this.#phase === 'disconnected' || this.#phase === 'failed') return
    if (this.#phase === 'complete') return
    if (this.#phase === 'verifying') {
      this.#detach()
      this.#complete()
      return
    }
    if (!this.#switched) {
      this.#abort(new Error(`the connection to the source was lost before the switchover: ${reason.message}`))
      return
    }
    this.#detach()
    this.#setPhase('disconnected')
    this.emit('disconnect', { reason: reason.message })
    this.#lossTimer = setTimeout(() => this.#onSourceLost(reason), this.#lossMs)
  }

  #onSourceLost(reason: Error): void {
    this.#lossTimer = undefined
    if (this.#closed || this.#phase !== 'disconnected') return
    const h = this.#handle!
    const missing = finite(h.stats().missing)
    const err = new SourceLostError(this.#policy, missing, reason.message)
    this.#emitError(err)
    if (this.#policy === 'wait') return
    this.#sourceLost = true
    try {
      h.settle(this.#policy === 'poison')
    } catch (e) {
      this.#emitError(e as Error)
    }
    this.#unregister()
    err.result = this.#result()
    this.#setPhase('failed')
    this.#finish(err)
  }

  #abort(err: Error): void {
    if (this.#phase === 'failed') return
    this.#detach()
    // Nothing serves this memory any more: a touch must not wait forever for a page.
    this.#unregister()
    this.#setPhase('failed')
    this.#emitError(err)
    this.#finish(err)
  }

  // ---- phases -------------------------------------------------------------------------------

  #switchover(): void {
    const h = this.#handle
    const uffd = this.#uffd
    if (h === undefined || uffd === undefined || this.#switched) return
    this.#switched = true
    if (this.#times.switchover === 0) this.#times.switchover = performance.now()
    const at = (): number => (this.#switchoverAt > 0n ? Number(process.hrtime.bigint() - this.#switchoverAt) / 1e6 : 0)
    const parts = { dispatchMs: at(), serveMs: 0 }
    const t = performance.now()
    const missing = finite(h.stats().missing) > 0
    if (missing) {
      h.startServing(uffd.fd)
      parts.serveMs = performance.now() - t
    }
    // The downtime ends here: the workload may run.
    this.#resumeMs = at()
    this.emit('resume', { pagesMissing: missing ? finite(h.stats().missing) : 0 })
    this.#control({ t: 'resumed', targetMs: this.#resumeMs, parts })
    if (missing) this.#setPhase('postcopy')
    else this.#complete()
  }

  #complete(): void {
    if (this.#phase === 'complete' || this.#phase === 'failed') return
    this.#times.complete = performance.now()
    this.#unregister()
    if (this.#phase !== 'verifying') {
      this.#control({ t: 'done', stats: this.#statsForSource() })
      if (this.#setup?.verify && !this.#ended.has('main')) {
        this.#setPhase('verifying')
        return
      }
    }
    this.#setPhase('complete')
    this.#finish()
  }

  #unregister(): void {
    const h = this.#handle
    h?.stopServing()
    if (this.#registered && this.#uffd !== undefined) {
      for (const m of this.#mappings) {
        try {
          this.#uffd.unregister(m)
        } catch {
          /* unmapped meanwhile */
        }
      }
    }
    this.#registered = false
    this.#uffd?.close()
    this.#uffd = undefined
  }

  #checkHashes(): void {
    if (this.#phase !== 'verifying') return
    try {
      const v = this.verify()
      this.#verified = v.verified
      this.#mismatches = v.mismatches.length
    } catch (err) {
      this.#emitError(err as Error)
      this.#verified = false
    }
    this.#control({ t: 'verified', verified: this.#verified, mismatches: this.#mismatches })
    this.#setPhase('complete')
    this.#finish()
  }

  // ---- notices ------------------------------------------------------------------------------

  #onNotices(notices: MigrationNotice[]): void {
    for (const n of notices) {
      switch (n.kind) {
        case 'control': {
          let c: Control
          try {
            c = decodeControl(n.payload ?? Buffer.alloc(0))
          } catch (err) {
            this.#emitError(err as Error)
            this.#lost(err as Error)
            break
          }
          if (c.t === 'switchover') {
            this.#switchoverAt = n.at ?? process.hrtime.bigint()
            this.#times.switchover = performance.now() - Number(process.hrtime.bigint() - this.#switchoverAt) / 1e6
          }
          this.#onControl(c)
          break
        }
        case 'closed':
          if (n.errno === ECANCELED || n.id !== this.#gens[n.channel ?? '']) break
          this.#ended.add(n.channel ?? '')
          if (n.protocol) {
            const err = new ProtocolError(n.message ?? 'protocol error')
            this.#emitError(err)
            this.#lost(err)
          } else {
            this.#lost(n.error ?? new Error(`the ${n.channel} channel closed`))
          }
          break
        case 'complete':
          this.#complete()
          break
        case 'error':
          this.#emitError(n.error ?? new Error(n.message ?? 'migration target error'))
          break
        default:
          break
      }
    }
  }

  #onControl(c: Control): void {
    switch (c.t) {
      case 'round':
        this.emit('progress', this.#progress(finite(c.round)))
        break
      case 'switchover':
        this.#switchover()
        break
      case 'hashes-done':
        this.#checkHashes()
        break
      case 'bye':
        this.#detach()
        break
      default:
        break
    }
  }

  #control(c: Control): void {
    this.#handle?.send('main', FrameType.CONTROL, 0, 0n, encodeJson(c))
  }

  #tick(): void {
    const h = this.#handle
    if (h === undefined || this.#closed) return
    const s = h.stats()
    const live = this.#phase === 'precopy' || this.#phase === 'postcopy' || this.#phase === 'verifying'
    if (live && s.silentMs > this.#timeoutMs)
      this.#lost(Object.assign(new Error(`nothing received for ${Math.round(s.silentMs)} ms`), { code: 'ETIMEDOUT' }))
    if (this.#phase === 'postcopy' || this.#phase === 'precopy') this.emit('progress', this.#progress())
  }

  #progress(round?: number): Record<string, unknown> {
    const s = this.#handle?.stats() ?? {}
    return {
      phase: this.#phase,
      round,
      pagesTotal: this.#pagesTotal(),
      pagesMissing: finite(s.missing),
      precopyPages: finite(s.precopyPages),
      pushedPages: finite(s.pushedPages),
      demandPages: finite(s.demandPages),
      faults: finite(s.faults),
    }
  }

  #pagesTotal(): number {
    return (this.#setup?.ranges ?? []).reduce((n, r) => n + r.length / r.pageSize, 0)
  }

  #statsForSource(): Record<string, number> {
    const s = this.#handle?.stats() ?? {}
    return {
      demandP50us: finite(s.demandP50us),
      demandP99us: finite(s.demandP99us),
      poisonedPages: finite(s.poisonedPages),
      zeroedPages: finite(s.zeroedPages),
      duplicatePages: finite(s.duplicatePages),
      faults: finite(s.faults),
      requests: finite(s.requests),
      targetMs: this.#resumeMs,
    }
  }

  #result(): MigrationTargetResult {
    const s = this.#handle?.stats() ?? {}
    const t = this.#times
    const end = t.complete || performance.now()
    return {
      mode: this.#setup?.mode ?? 'hybrid',
      bytes: (this.#setup?.ranges ?? []).reduce((n, r) => n + r.length, 0),
      pagesTotal: this.#pagesTotal(),
      totalMs: end - t.setup,
      postcopyMs: t.switchover ? Math.max(0, end - t.switchover) : 0,
      precopyPages: finite(s.precopyPages),
      pushedPages: finite(s.pushedPages),
      demandPages: finite(s.demandPages),
      duplicatePages: finite(s.duplicatePages),
      discardedPages: finite(s.discardedPages),
      faults: finite(s.faults),
      requests: finite(s.requests),
      poisonedPages: finite(s.poisonedPages),
      zeroedPages: finite(s.zeroedPages),
      reconnects: this.#reconnects,
      demandP50Us: finite(s.demandP50us),
      demandP99Us: finite(s.demandP99us),
      wireBytes: finite(s.wireBytes),
      verified: this.#verified,
      mismatches: this.#mismatches,
    }
  }

  #setPhase(phase: Phase): void {
    if (this.#phase === phase) return
    this.#phase = phase
    this.emit('phase', { phase, at: performance.now() })
  }

  #finish(err?: Error): void {
    if (this.#settled) return
    this.#settled = true
    if (this.#ticker !== undefined) clearInterval(this.#ticker)
    this.#ticker = undefined
    if (this.#lossTimer !== undefined) clearTimeout(this.#lossTimer)
    this.#lossTimer = undefined
    this.#server.close()
    if (err === undefined) this.#resolve(this.#result())
    else this.#reject(err)
  }

  #emitError(err: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', err)
    else process.emitWarning(`MigrationTarget: ${err.message}`, 'UffdWarning')
  }

  #teardown(): void {
    if (this.#lossTimer !== undefined) clearTimeout(this.#lossTimer)
    this.#lossTimer = undefined
    if (this.#ticker !== undefined) clearInterval(this.#ticker)
    this.#ticker = undefined
    this.#detach()
    this.#unregister()
    this.#handle?.close()
    for (const a of this.#aliases) a?.unmap()
    this.#aliases = []
    void this.#ownMappings
  }
}
