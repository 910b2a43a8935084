// `userfaultfd migrate send|receive|demo`: what each runs once its options are checked (the
// option tables are ../commands/migrate.ts; the demo's orchestration is ./demo.ts, the halves
// ./halves.ts), and how the halves report: JSON lines (--events, for the demo), one JSON object
// (--json), or lines for people.
import * as fs from 'node:fs'
import { resolveSecret } from '../../migration/auth'
import type { PostcopyPriority } from '../../migration/common'
import type { SourceLossPolicy } from '../../migration/target'
import type { MemoryKind, MigrationMode } from '../../migration/wire'
import { UsageError } from '../command'
import { demo } from './demo'
import { type Emit, type Fault, receive, send } from './halves'
import { formatBytes, formatMs } from './units'

/** Refuses to start without a secret unless --insecure (exit 2, saying how to give one). */
export function checkSecret(secretFile: string | undefined, insecure: boolean): void {
  try {
    resolveSecret({ secretFile, insecure })
  } catch (err) {
    throw new UsageError(
      (err as Error).message
        .replace('pass { secret }', 'use --secret-file F')
        .replace('{ insecure: true }', '--insecure'),
    )
  }
}

export function parseFault(v: string | undefined): { kind: 'link-down' | 'source-dies'; ms: number } | undefined {
  if (v === undefined) return undefined
  if (v === 'source-dies') return { kind: 'source-dies', ms: 0 }
  const m = /^link-down:(\d+)$/.exec(v)
  if (m === null || Number(m[1]) > 600_000)
    throw new UsageError(`--fault must be link-down:MS (MS up to 600000) or source-dies (got '${v}')`)
  return { kind: 'link-down', ms: Number(m[1]) }
}

export function checkEndpoint(v: string, flag: string): void {
  if (!/^\[?[^\]\s]+\]?:\d+$/.test(v) || Number(v.slice(v.lastIndexOf(':') + 1)) > 65535)
    throw new UsageError(`${flag} needs HOST:PORT (got '${v}')`)
}

/** A reporter: JSON lines (--events), nothing but the result (--json), or lines for people. */
function reporter(
  events: boolean,
  json: boolean,
  side: 'source' | 'target',
): { emit: Emit; final: () => Record<string, unknown> | undefined } {
  let result: Record<string, unknown> | undefined
  const human = !events && !json
  let lastProgress = 0
  const emit: Emit = (e) => {
    if (e.event === 'result') result = e
    if (events) {
      process.stdout.write(`${JSON.stringify(e, (_, x) => (typeof x === 'bigint' ? x.toString() : x))}\n`)
      return
    }
    if (!human) return
    switch (e.event) {
      case 'listening':
        process.stdout.write(`listening on ${e.host}:${e.port}\n`)
        break
      case 'phase':
        if (e.side === side) process.stdout.write(`phase: ${e.phase}\n`)
        break
      case 'round':
        process.stdout.write(
          `round ${e.round}: ${e.pages} pages in ${formatMs(Number(e.ms))}, ${e.dirtyPages} dirtied meanwhile\n`,
        )
        break
      case 'progress': {
        const now = performance.now()
        if (now - lastProgress < 1000 || side !== 'source') break
        lastProgress = now
        process.stdout.write(
          `  ${e.phase}: ${e.pagesSent} sent, ${e.pagesDemanded} demanded, ${e.pagesPushed} pushed, ${formatBytes(Number(e.bytesPerSecond))}/s\n`,
        )
        break
      }
      case 'rejected':
        process.stdout.write(`rejected a peer: ${e.message}\n`)
        break
      case 'failed':
      case 'error':
        process.stderr.write(`${e.side ?? side}: ${e.message}\n`)
        break
      case 'reconnect':
      case 'disconnect':
      case 'fault':
        process.stdout.write(`${e.event}${e.reason ? `: ${e.reason}` : ''}\n`)
        break
      default:
        break
    }
  }
  return { emit, final: () => result }
}

/** The --json line: exactly these fields. */
export function summaryLine(r: Record<string, unknown> | undefined, verified: boolean): Record<string, unknown> {
  const x = (r ?? {}) as Record<string, number | string | boolean>
  return {
    mode: x.mode,
    bytes: x.bytes,
    totalMs: x.totalMs ?? 0,
    precopyMs: x.precopyMs ?? 0,
    downtimeMs: x.downtimeMs ?? 0,
    postcopyMs: x.postcopyMs ?? 0,
    wireBytes: x.wireBytes ?? 0,
    demandP50Us: x.demandP50Us ?? 0,
    demandP99Us: x.demandP99Us ?? 0,
    verified,
    reconnects: x.reconnects ?? 0,
    poisonedPages: x.poisonedPages ?? 0,
  }
}

export interface SendValues {
  to: string
  size: number
  mode: MigrationMode
  memory: MemoryKind
  dirtyRate: number
  maxDowntime: number
  secretFile?: string
  insecure: boolean
  tls: boolean
  fault?: string
  faultDevice?: string
  seed: number
  targetReaders: number
  postcopyPriority: PostcopyPriority
  json: boolean
  events: boolean
}

export async function runSend(v: SendValues): Promise<number> {
  const f = parseFault(v.fault)
  const fault: Fault | undefined = f === undefined ? undefined : { ...f, device: v.faultDevice }
  const { emit, final } = reporter(v.events, v.json, 'source')
  const code = await send({ ...v, fault, emit })
  const r = final()
  if (code === 4)
    process.stderr.write(
      'userfaultfd migrate send: authentication failed: the target refused our secret (or could not prove it)\n',
    )
  if (v.json && r !== undefined) {
    const res = r.result as Record<string, unknown>
    process.stdout.write(`${JSON.stringify(summaryLine(res, res?.verified === true))}\n`)
  } else if (!v.events && r !== undefined) {
    const res = r.result as Record<string, number | boolean>
    process.stdout.write(
      `done: pre-copy ${formatMs(Number(res.precopyMs))}, downtime ${formatMs(Number(res.downtimeMs))}, post-copy ${formatMs(Number(res.postcopyMs))}, ` +
        `wire ${formatBytes(Number(res.wireBytes))}, verified ${res.verified}\n`,
    )
  }
  return code
}

export interface ReceiveValues {
  listen: string
  secretFile?: string
  insecure: boolean
  onSourceLoss: SourceLossPolicy
  sourceLossTimeoutMs: number
  tlsKey?: string
  tlsCert?: string
  fault?: string
  faultDevice?: string
  prealloc?: number
  json: boolean
  events: boolean
}

export async function runReceive(v: ReceiveValues): Promise<number> {
  const f = parseFault(v.fault)
  if (f !== undefined && f.kind !== 'link-down') throw new UsageError('receive takes --fault link-down:MS only')
  if ((v.tlsKey === undefined) !== (v.tlsCert === undefined))
    throw new UsageError('--tls-key and --tls-cert go together')
  const tls =
    v.tlsKey !== undefined && v.tlsCert !== undefined
      ? { key: fs.readFileSync(v.tlsKey), cert: fs.readFileSync(v.tlsCert) }
      : undefined
  const { emit, final } = reporter(v.events, v.json, 'target')
  const code = await receive({
    ...v,
    tls,
    fault: f === undefined ? undefined : { ...f, device: v.faultDevice },
    emit,
  })
  const r = final()
  if (v.json && r !== undefined) {
    process.stdout.write(`${JSON.stringify(summaryLine(r.result as Record<string, unknown>, r.verified === true))}\n`)
  } else if (!v.events && r !== undefined) {
    const res = (r.result ?? {}) as Record<string, number>
    process.stdout.write(
      `done: ${res.precopyPages} pages in pre-copy, ${res.demandPages} on demand, ${res.pushedPages} pushed, ` +
        `demand p99 ${Number(res.demandP99Us).toFixed(0)} us, verified ${r.verified}\n`,
    )
  }
  return code
}

export interface DemoValues {
  size: number
  mode: MigrationMode
  memory: MemoryKind
  dirtyRate: number
  maxDowntime: number
  fault?: string
  onSourceLoss?: SourceLossPolicy
  sourceLossTimeoutMs?: number
  timeout: number
  loopback: boolean
  json: boolean
}

export function runDemo(v: DemoValues): Promise<number> {
  const f = parseFault(v.fault)
  if (v.onSourceLoss !== undefined && f?.kind !== 'source-dies')
    throw new UsageError('--on-source-loss goes with --fault source-dies')
  return demo({
    size: v.size,
    mode: v.mode,
    memory: v.memory,
    dirtyRate: v.dirtyRate,
    maxDowntime: v.maxDowntime,
    json: v.json,
    fault: f,
    onSourceLoss: v.onSourceLoss ?? (f?.kind === 'source-dies' ? 'poison' : 'wait'),
    // Longer than a link-down fault lasts: that one must end in a reconnect, not in the policy.
    sourceLossTimeoutMs: v.sourceLossTimeoutMs ?? (f?.kind === 'link-down' ? f.ms + 10_000 : 3000),
    timeoutMs: v.timeout,
    loopback: v.loopback,
  })
}
