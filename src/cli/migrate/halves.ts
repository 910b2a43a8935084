// The two halves of `userfaultfd migrate`: `send` (the source: memory filled with random bytes,
// a writer dirtying it until the stop, then the migration) and `receive` (the target: listens,
// receives, runs its own writer and reader from the moment it resumes, then checks every page).
// The demo runs one of each in two network namespaces; on two real hosts one runs on each.
// With `events`, each half reports on stdout as JSON lines (the demo and the tests read them).
import { spawnSync } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import { Mapping } from '../../core/mapping'
import { AuthError } from '../../migration/auth'
import type { MigrationResult, PostcopyPriority } from '../../migration/common'
import { MigrationSource } from '../../migration/source'
import { MigrationTarget, type MigrationTargetResult, type SourceLossPolicy } from '../../migration/target'
import type { MemoryKind, MigrationMode } from '../../migration/wire'
import { startWorkload, type Workload } from './workload'

/** Where the writers stamp each page: the source at 0, the target at 8 (left out of the hashes). */
const SOURCE_STAMP = 0
const TARGET_STAMP = 8

export type Emit = (event: Record<string, unknown>) => void

export interface Fault {
  kind: 'link-down' | 'source-dies'
  ms: number
  /** the source's network interface (link-down) */
  device?: string
  /** network namespace of the device (ip -n) */
  netns?: string
}

export interface SendOptions {
  to: string
  size: number
  mode: MigrationMode
  memory: MemoryKind
  dirtyRate: number
  maxDowntime: number
  secret?: string
  secretFile?: string
  insecure: boolean
  tls: boolean
  fault?: Fault
  seed: number
  /** reader threads the target runs from its resume (default 1) */
  targetReaders?: number
  postcopyPriority?: PostcopyPriority
  emit: Emit
}

export interface ReceiveOptions {
  listen: string
  secret?: string
  secretFile?: string
  insecure: boolean
  onSourceLoss: SourceLossPolicy
  sourceLossTimeoutMs: number
  tls?: { key: Buffer; cert: Buffer }
  /** link-down: taken down the moment the target resumes (post-copy starts: nothing here yet) */
  fault?: Fault
  /** memory allocated and touched before listening, used if the source's one range fits (bench) */
  prealloc?: number
  emit: Emit
}

function fill(mapping: Mapping, seed: number): void {
  // Random bytes, as a guest's memory would hold: nothing to compress, no zero pages.
  const chunk = Buffer.alloc(1 << 20)
  randomFillSync(chunk)
  for (let off = 0, k = seed; off < mapping.length; off += chunk.length, k++) {
    chunk.writeUInt32LE(k, 0) // every MiB distinct
    mapping.write(off, chunk.subarray(0, Math.min(chunk.length, mapping.length - off)))
  }
}

function allocate(kind: MemoryKind, size: number): Mapping {
  if (kind === 'anonymous') return Mapping.anonymous(size)
  return Mapping.memfd(size, { hugetlb: kind === 'hugetlb', name: 'userfaultfd-migrate-demo' })
}

function ip(args: string[]): void {
  const r = spawnSync('ip', args, { stdio: 'ignore' })
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')} failed`)
}

/** The source half. Resolves with the exit status. */
export async function send(o: SendOptions): Promise<number> {
  const memory = allocate(o.memory, o.size)
  let workload: Workload | undefined
  let source: MigrationSource | undefined
  try {
    o.emit({ event: 'filling', bytes: o.size })
    fill(memory, o.seed)
    workload = startWorkload(memory, memory.pageSize, {
      writeRate: o.dirtyRate,
      writeOffset: SOURCE_STAMP,
      writers: o.dirtyRate > 0 ? 1 : 0,
      seed: o.seed,
      tag: 1,
    })
    const w = workload
    source = new MigrationSource({
      ranges: [memory],
      to: o.to,
      secret: o.secret,
      secretFile: o.secretFile,
      insecure: o.insecure,
      tls: o.tls ? { rejectUnauthorized: false } : undefined,
      mode: o.mode,
      maxDowntime: o.maxDowntime,
      stop: () => {
        if (!w.pause(5000)) throw new Error('the writer did not stop')
      },
      resume: () => w.resume(),
      verify: { maskOffset: TARGET_STAMP, maskLength: 8 },
      metadata: { dirtyRate: o.dirtyRate, seed: o.seed, readers: o.targetReaders ?? 1 },
      postcopyPriority: o.postcopyPriority,
    })
    let injected = false
    source.on('phase', ({ phase }) => {
      o.emit({ event: 'phase', side: 'source', phase })
      if (phase === 'postcopy' && o.fault !== undefined && !injected) {
        injected = true
        inject(o.fault, o.emit)
      }
    })
    source.on('round', (r) => o.emit({ event: 'round', ...r }))
    source.on('progress', (p) => o.emit({ event: 'progress', side: 'source', ...p }))
    source.on('disconnect', (d) => o.emit({ event: 'disconnect', side: 'source', ...d }))
    source.on('reconnect', (r) => o.emit({ event: 'reconnect', side: 'source', ...r }))
    source.on('error', (err: Error) => o.emit({ event: 'error', side: 'source', message: err.message }))
    const result: MigrationResult = await source.start()
    o.emit({ event: 'result', side: 'source', result, writes: w.stats().writes })
    return result.verified === false ? 1 : 0
  } catch (err) {
    const e = err as Error
    const auth = e instanceof AuthError || (e as { cause?: unknown }).cause instanceof AuthError
    o.emit({ event: 'failed', side: 'source', message: e.message, auth })
    return auth ? 4 : 1
  } finally {
    source?.close()
    workload?.stop(1000)
  }
}

export function inject(fault: Fault, emit: Emit): void {
  if (fault.kind === 'source-dies') {
    emit({ event: 'fault', fault: 'source-dies' })
    process.kill(process.pid, 'SIGKILL')
    return
  }
  const device = fault.device
  if (device === undefined) return
  const ns = fault.netns === undefined ? [] : ['-n', fault.netns]
  // Down now, synchronously: before the first page of the post-copy push leaves.
  ip([...ns, 'link', 'set', 'dev', device, 'down'])
  emit({ event: 'fault', fault: 'link-down', ms: fault.ms })
  setTimeout(() => {
    try {
      ip([...ns, 'link', 'set', 'dev', device, 'up'])
      emit({ event: 'fault', fault: 'link-up' })
    } catch (err) {
      emit({ event: 'error', side: 'source', message: (err as Error).message })
    }
  }, fault.ms).unref()
}

/** The target half. Resolves with the exit status once one migration ended. */
export async function receive(o: ReceiveOptions): Promise<number> {
  // A machine that keeps memory ready for incoming workloads (the plain-TCP floor's "touched").
  const ready = o.prealloc ? Mapping.anonymous(o.prealloc, { populate: true }) : undefined
  const target = await MigrationTarget.listen({
    memory: ready
      ? (ranges) =>
          ranges.length === 1 && ranges[0].kind === 'anonymous' && ranges[0].length === ready.length
            ? [ready]
            : ranges.map((r) =>
                r.kind === 'anonymous'
                  ? Mapping.anonymous(r.length)
                  : Mapping.memfd(r.length, { hugetlb: r.kind === 'hugetlb' }),
              )
      : undefined,
    listen: o.listen,
    secret: o.secret,
    secretFile: o.secretFile,
    insecure: o.insecure,
    onSourceLoss: o.onSourceLoss,
    sourceLossTimeoutMs: o.sourceLossTimeoutMs,
    tls: o.tls,
  })
  o.emit({ event: 'listening', host: target.address.host, port: target.address.port })
  let workload: Workload | undefined
  let resumedAt = 0
  let dirtyRate = 0
  let readers = 1
  target.on('rejected', (err: Error) =>
    o.emit({
      event: 'rejected',
      message: err.message,
      auth: err instanceof AuthError,
    }),
  )
  target.on('setup', (s) => {
    const meta = (s.metadata ?? {}) as { dirtyRate?: unknown; readers?: unknown }
    dirtyRate = typeof meta.dirtyRate === 'number' && meta.dirtyRate >= 0 ? meta.dirtyRate : 0
    readers = typeof meta.readers === 'number' && meta.readers >= 0 && meta.readers <= 8 ? meta.readers : 1
    o.emit({ event: 'setup', mode: s.mode, bytes: s.mappings.reduce((n: number, m: Mapping) => n + m.length, 0) })
  })
  target.on('phase', ({ phase }) => o.emit({ event: 'phase', side: 'target', phase }))
  target.on('progress', (p) => o.emit({ event: 'progress', side: 'target', ...p }))
  target.on('disconnect', (d) => o.emit({ event: 'disconnect', side: 'target', ...d }))
  target.on('reconnect', (r) => o.emit({ event: 'reconnect', side: 'target', ...r }))
  target.on('error', (err: Error) =>
    o.emit({ event: 'error', side: 'target', code: (err as { code?: string }).code, message: err.message }),
  )
  target.on('resume', ({ pagesMissing }: { pagesMissing: number }) => {
    resumedAt = performance.now()
    // Before the workload touches anything: every page still to come is missing, so the link
    // goes down during post-copy whatever its size.
    if (o.fault?.kind === 'link-down' && pagesMissing > 0) inject(o.fault, o.emit)
    const m = target.mappings[0] as Mapping
    // The workload runs from the moment the target resumes: a writer at the source's rate and
    // a reader, both touching random pages (most of them not here yet in post-copy).
    workload = startWorkload(m, m.pageSize, {
      writeRate: dirtyRate,
      writeOffset: TARGET_STAMP,
      writers: dirtyRate > 0 ? 1 : 0,
      readers,
      tag: 2,
    })
    o.emit({ event: 'resumed' })
  })
  let result: MigrationTargetResult | undefined
  let status = 0
  try {
    result = await target.done
  } catch (err) {
    const e = err as Error & { result?: MigrationTargetResult }
    result = e.result
    o.emit({ event: 'failed', side: 'target', message: e.message, code: (e as { code?: string }).code })
    status = (e as { code?: string }).code === 'ESOURCELOST' ? 0 : 1
  }
  // Let the workload run into what the policy did (SIGBUS on a poisoned page), then stop it.
  if (workload !== undefined && result !== undefined && result.poisonedPages > 0) {
    const until = performance.now() + 2000
    while (workload.stats().sigbus === 0 && performance.now() < until) await new Promise((r) => setTimeout(r, 20))
  }
  const left = workload?.stop(2000) ?? 0
  const ws = workload?.stats()
  let stampsOk = true
  let verified: boolean | null = result?.verified ?? null
  if (result !== undefined && result.poisonedPages === 0 && target.phase === 'complete' && workload !== undefined) {
    // The target's own writes must have survived every late page (checked at offset 8), and
    // every other byte must equal the source's at its stop (hashes, offset 8..16 left out).
    const stamps = workload.stamps()
    const m = target.mappings[0] as Mapping
    const word = Buffer.alloc(8)
    for (let p = 0; p < stamps.length; p++) {
      if (stamps[p] === 0n) continue
      m.read(p * m.pageSize + TARGET_STAMP, word)
      if (word.readBigUInt64LE(0) !== stamps[p]) stampsOk = false
    }
    try {
      verified = target.verify().verified && stampsOk
    } catch {
      verified = stampsOk && verified === true
    }
  } else if (result !== undefined && result.poisonedPages > 0) {
    verified = false
  }
  o.emit({
    event: 'result',
    side: 'target',
    result,
    verified,
    stampsOk,
    workload: ws,
    stuckThreads: left,
    resumedAt,
  })
  target.close()
  for (const m of target.mappings) if (left === 0 && m instanceof Mapping) m.unmap()
  if (left === 0) ready?.unmap()
  return status
}
