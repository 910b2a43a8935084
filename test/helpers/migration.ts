// Migration test helpers: a source and a target in this process over loopback (their per-page
// work runs on native threads, and the workloads that touch the memory are native threads too:
// this JS thread never touches migrated memory before the end), and fake peers that speak the
// protocol frame by frame, for what a real peer never does (late or duplicate pages, hostile
// frames).
import * as fs from 'node:fs'
import * as net from 'node:net'
import { randomFillSync } from 'node:crypto'
import { Mapping, hugePageSize } from '../../src/core/mapping'
import { MigrationSource, type MigrationSourceOptions, type RoundInfo } from '../../src/migration/source'
import { MigrationTarget, type MigrationTargetOptions, type MigrationTargetResult } from '../../src/migration/target'
import type { MigrationResult } from '../../src/migration/common'
import { FrameConn, sourceHandshake, targetHandshake } from '../../src/migration/transport'
import { encodeFrame, encodeJson, FrameType, type MemoryKind, type MigrationMode } from '../../src/migration/wire'
import { startWorkload, type Workload } from '../../src/cli/migrate/workload'
import type { KernelFeature } from '../../src/index'
import { timeScale } from './children'
import { withFeature } from './kernel'

export const SECRET = 'test-secret-0123456789abcdef'

export function allocate(kind: MemoryKind, size: number): Mapping {
  if (kind === 'anonymous') return Mapping.anonymous(size)
  return Mapping.memfd(size, { hugetlb: kind === 'hugetlb' })
}

export function fillRandom(m: Mapping): void {
  const chunk = Buffer.alloc(Math.min(m.length, 1 << 20))
  for (let off = 0; off < m.length; off += chunk.length) {
    randomFillSync(chunk)
    m.write(off, chunk.subarray(0, Math.min(chunk.length, m.length - off)))
  }
}

export interface RunOptions {
  mode: MigrationMode
  kind: MemoryKind
  size: number
  /** bytes/s dirtied on the source until the stop, and on the target from its resume */
  dirtyRate?: number
  targetReaders?: number
  source?: Partial<MigrationSourceOptions>
  target?: Partial<MigrationTargetOptions>
  /** connect through a TCP relay that cuts every connection once, this long after post-copy starts */
  cutInPostcopyMs?: number
  /**
   * The stop hook lets the source writer make this many more writes before pausing it: pages
   * written after the last pre-copy round for certain, however the scheduler treated the writer
   * (on a loaded machine it may not have run at all during the rounds).
   */
  writesInStop?: number
  /** watch this process's threads' scheduling during post-copy (RunResult.postcopyThreads) */
  watchThreads?: boolean
}

export interface RunResult {
  source: MigrationResult
  target: MigrationTargetResult
  /** pages whose bytes (but the target's stamp word) differ from the source at its stop */
  mismatches: number
  /** connections the relay cut (cutInPostcopyMs) */
  cut?: number
  /** pages whose target stamp was lost (overwritten by a late page) */
  lostStamps: number
  targetWrites: number
  targetFaults: number
  /** the source's 'round' events, in order */
  rounds: RoundInfo[]
  /** with watchThreads: the most threads seen at once during post-copy under SCHED_FIFO, and below nice 0 */
  postcopyThreads?: { fifo: number; niced: number; lowestNice: number }
}

const SOURCE_STAMP = 0
const TARGET_STAMP = 8

/** A whole migration in this process, checked page by page; everything is freed after. */
export async function migrateHere(o: RunOptions): Promise<RunResult> {
  const memory = allocate(o.kind, o.size)
  const pageSize = memory.pageSize
  fillRandom(memory)
  const rate = o.dirtyRate ?? 0
  const writer = startWorkload(memory, pageSize, {
    writeRate: rate,
    writers: rate > 0 ? 1 : 0,
    writeOffset: SOURCE_STAMP,
    tag: 1,
  })
  const target = await MigrationTarget.listen({ secret: SECRET, ...o.target })
  target.on('error', () => {})
  let targetWork: Workload | undefined
  target.on('resume', () => {
    const m = target.mappings[0] as Mapping
    targetWork = startWorkload(m, m.pageSize, {
      writeRate: rate,
      writers: rate > 0 ? 1 : 0,
      readers: o.targetReaders ?? 1,
      writeOffset: TARGET_STAMP,
      tag: 2,
    })
  })
  const relay = o.cutInPostcopyMs === undefined ? undefined : await startRelay(target.address)
  const source = new MigrationSource({
    ranges: [memory],
    to: relay?.address ?? target.address,
    secret: SECRET,
    mode: o.mode,
    stop: async () => {
      if (o.writesInStop !== undefined) {
        const until = writer.stats().writes + o.writesInStop
        const deadline = Date.now() + 10_000 * timeScale
        while (writer.stats().writes < until) {
          if (Date.now() > deadline) throw new Error('the source writer made no writes in 10 s')
          await new Promise((r) => setTimeout(r, 1))
        }
      }
      if (!writer.pause(5000)) throw new Error('the source writer did not stop')
    },
    verify: { maskOffset: TARGET_STAMP, maskLength: 8 },
    ...o.source,
  })
  source.on('error', () => {})
  const rounds: RoundInfo[] = []
  source.on('round', (info: RoundInfo) => rounds.push(info))
  let cut = 0
  let armed = relay !== undefined
  let watch: ReturnType<typeof watchThreads> | undefined
  source.on('phase', ({ phase }) => {
    if (phase === 'postcopy' && o.watchThreads && watch === undefined) watch = watchThreads()
    if (phase !== 'postcopy' || !armed || relay === undefined) return
    armed = false // once: post-copy starts again after each reconnect
    setTimeout(() => (cut = relay.cut()), o.cutInPostcopyMs)
  })
  try {
    const [s, t] = await Promise.all([source.start(), target.done])
    const postcopyThreads = watch?.stop()
    const stuck = targetWork?.stop(2000) ?? 0
    if (stuck > 0) throw new Error(`${stuck} target workload thread(s) stayed blocked after the migration`)
    const v = target.verify()
    let lostStamps = 0
    if (targetWork !== undefined) {
      const stamps = targetWork.stamps()
      const m = target.mappings[0] as Mapping
      const word = Buffer.alloc(8)
      for (let p = 0; p < stamps.length; p++) {
        if (stamps[p] === 0n) continue
        m.read(p * m.pageSize + TARGET_STAMP, word)
        if (word.readBigUInt64LE(0) !== stamps[p]) lostStamps++
      }
    }
    const ws = targetWork?.stats()
    return {
      source: s,
      target: t,
      mismatches: v.mismatches.length,
      cut,
      lostStamps,
      targetWrites: ws?.writes ?? 0,
      targetFaults: ws?.faults ?? 0,
      rounds,
      postcopyThreads,
    }
  } finally {
    watch?.stop()
    relay?.close()
    targetWork?.stop(1000)
    writer.stop(1000)
    source.close()
    target.close()
    unmapAll(target)
    memory.unmap()
  }
}

/**
 * Samples this process's threads' scheduling (/proc/self/task/TID/stat: nice, policy) every
 * millisecond until stop(), which returns the most threads seen at once under SCHED_FIFO and
 * below nice 0, and the lowest nice value seen.
 */
function watchThreads(): { stop(): { fifo: number; niced: number; lowestNice: number } } {
  const SCHED_FIFO = 1
  const seen = { fifo: 0, niced: 0, lowestNice: 0 }
  const sample = () => {
    let fifo = 0
    let niced = 0
    for (const tid of fs.readdirSync('/proc/self/task')) {
      let stat: string
      try {
        stat = fs.readFileSync(`/proc/self/task/${tid}/stat`, 'utf8')
      } catch {
        continue // the thread ended
      }
      // Fields after "(comm)": state is field 3, nice field 19, policy field 41.
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      const nice = Number(f[19 - 3])
      if (Number(f[41 - 3]) === SCHED_FIFO) fifo++
      if (nice < 0) niced++
      seen.lowestNice = Math.min(seen.lowestNice, nice)
    }
    seen.fifo = Math.max(seen.fifo, fifo)
    seen.niced = Math.max(seen.niced, niced)
  }
  sample()
  const timer = setInterval(sample, 1)
  return {
    stop() {
      clearInterval(timer)
      return { ...seen }
    },
  }
}

/**
 * A TCP relay in front of `to`: cut() destroys every connection through it at once (both ends
 * see the connection break, as when a middlebox drops it) and returns how many; new connections
 * still pass.
 */
export async function startRelay(to: { host: string; port: number }): Promise<{
  address: { host: string; port: number }
  cut(): number
  close(): void
}> {
  const pairs = new Set<[net.Socket, net.Socket]>()
  const server = net.createServer((c) => {
    const u = net.connect(to.port, to.host)
    const pair: [net.Socket, net.Socket] = [c, u]
    pairs.add(pair)
    const end = () => {
      c.destroy()
      u.destroy()
      pairs.delete(pair)
    }
    c.on('error', end).on('close', end)
    u.on('error', end).on('close', end)
    c.pipe(u)
    u.pipe(c)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as net.AddressInfo).port
  const cut = (): number => {
    const n = pairs.size
    for (const [c, u] of [...pairs]) {
      c.resetAndDestroy()
      u.resetAndDestroy()
    }
    pairs.clear()
    return n
  }
  return {
    address: { host: '127.0.0.1', port },
    cut,
    close() {
      cut()
      server.close()
    },
  }
}

/**
 * For a test of pre-copy rounds ('hybrid', 'precopy') on `kind` memory: true where the kernel can
 * track dirty pages (write protection; arm64 has none before 6.10). Where it cannot, asserts the
 * MigrationSource constructor's refusal (UnsupportedError naming the feature), says so, and
 * returns false: the test then returns, having checked the refusal instead.
 */
export function canPrecopy(kind: MemoryKind, mode: MigrationMode = 'hybrid'): boolean {
  if (mode === 'postcopy') return true
  const needs: KernelFeature[] = ['PAGEFAULT_FLAG_WP']
  if (kind !== 'anonymous') needs.push('WP_HUGETLBFS_SHMEM')
  return withFeature(needs, () => {
    // A range aligned to the kind's page size (hugetlb: 2 MiB), so that only the kernel refuses.
    const unit = kind === 'hugetlb' ? hugePageSize() : 1 << 20
    const m = Mapping.anonymous(2 * unit)
    const address = (m.address + BigInt(unit - 1)) & ~BigInt(unit - 1)
    try {
      new MigrationSource({
        ranges: [{ address, length: unit, kind }],
        to: '127.0.0.1:1',
        secret: SECRET,
        mode,
        stop: () => {},
      }).close()
    } finally {
      m.unmap()
    }
  })
}

/** A source that speaks frame by frame: handshake done, then raw frames on `conn`. */
export async function fakeSource(
  to: { host: string; port: number },
  o: {
    mode: MigrationMode
    ranges: Array<{ length: number; pageSize: number; kind: MemoryKind }>
    secret?: string
    session?: string
  },
): Promise<{ main: FrameConn; demand: FrameConn; session: string; close(): void }> {
  const session = o.session ?? '0123456789abcdef0123456789abcdef'
  const secret = Buffer.from(o.secret ?? SECRET)
  const open = async (channel: 'main' | 'demand'): Promise<FrameConn> => {
    const socket = net.connect(to.port, to.host)
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve)
      socket.once('error', reject)
    })
    socket.setNoDelay(true)
    const conn = new FrameConn(socket)
    await sourceHandshake(conn, {
      secret,
      channel,
      timeoutMs: 5000,
      setup: { session, resume: false, mode: o.mode, ranges: o.ranges, verify: false, metadata: {} },
    })
    return conn
  }
  const main = await open('main')
  const demand = await open('demand')
  return {
    main,
    demand,
    session,
    close() {
      main.socket.destroy()
      demand.socket.destroy()
    },
  }
}

export function control(conn: FrameConn, message: Record<string, unknown>): void {
  conn.socket.write(encodeFrame(FrameType.CONTROL, encodeJson(message)))
}

export function pagesFrame(range: number, page: number, bytes: Uint8Array): Buffer {
  return encodeFrame(FrameType.PAGES, bytes, range, BigInt(page))
}

/** A target that speaks frame by frame (after the handshake), for the source's side. */
export function fakeTarget(
  onConn: (conn: FrameConn, setup: Awaited<ReturnType<typeof targetHandshake>>) => void,
): Promise<{
  port: number
  close(): void
}> {
  const server = net.createServer(async (socket) => {
    const conn = new FrameConn(socket)
    try {
      const hs = await targetHandshake(conn, Buffer.from(SECRET), 5000)
      socket.write(encodeFrame(FrameType.ACCEPT, encodeJson({ state: 'new' })))
      onConn(conn, hs)
    } catch {
      socket.destroy()
    }
  })
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({ port: (server.address() as net.AddressInfo).port, close: () => server.close() }),
    )
  })
}

export function until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      if (cond()) resolve()
      else if (Date.now() > end) reject(new Error(`timed out waiting for ${what}`))
      else setTimeout(tick, 5)
    }
    tick()
  })
}

/** Unmaps the Mappings a target allocated. */
export function unmapAll(target: MigrationTarget): void {
  for (const m of target.mappings) if (m instanceof Mapping) m.unmap()
}
