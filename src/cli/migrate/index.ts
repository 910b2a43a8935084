// `userfaultfd migrate demo|send|receive`: options, checks and the human/JSON output of the two
// halves (the demo's orchestration is in ./demo.ts, the halves in ./halves.ts).
import * as fs from 'node:fs'
import { parseArgs } from 'node:util'
import { resolveSecret } from '../../migration/auth'
import type { SourceLossPolicy } from '../../migration/target'
import type { MemoryKind, MigrationMode } from '../../migration/wire'
import { demo } from './demo'
import { type Emit, type Fault, receive, send } from './halves'
import { formatBytes, formatMs, parseSize } from './units'

export const MIGRATE_USAGE = `  migrate demo [--size 1G] [--mode hybrid] [--dirty-rate 64M] [--memory anonymous|shmem|hugetlb]
        [--fault link-down:MS | --fault source-dies [--on-source-loss wait|poison|zero]]
        [--max-downtime MS] [--json]
                         live migration between two processes in two network namespaces
  migrate receive --listen HOST:PORT [--secret-file F | --insecure] [--on-source-loss P] [--json]
  migrate send --to HOST:PORT [--size 1G] [--mode M] [--dirty-rate R] [--postcopy-priority throughput|latency]
        [--secret-file F | --insecure] [--json]
                         the demo's two halves on two hosts; the secret comes from
                         USERFAULTFD_MIGRATE_SECRET or --secret-file
`

class UsageError extends Error {}

const MODES: readonly MigrationMode[] = ['precopy', 'postcopy', 'hybrid']
const MEMORY: readonly MemoryKind[] = ['anonymous', 'shmem', 'hugetlb']
const POLICIES: readonly SourceLossPolicy[] = ['wait', 'poison', 'zero']

type Values = Record<string, string | boolean | undefined>

function oneOf<T extends string>(v: unknown, flag: string, choices: readonly T[], fallback: T): T {
  if (v === undefined) return fallback
  if (!choices.includes(v as T)) throw new UsageError(`${flag} must be ${choices.join(', ')} (got '${String(v)}')`)
  return v as T
}

function size(v: unknown, flag: string, fallback: number, min = 0): number {
  if (v === undefined) return fallback
  let n: number
  try {
    n = parseSize(String(v), flag)
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  if (n < min) throw new UsageError(`${flag} must be at least ${formatBytes(min)} (got '${String(v)}')`)
  return n
}

function ms(v: unknown, flag: string, fallback: number): number {
  if (v === undefined) return fallback
  const n = Number(v)
  if (!/^\d+$/.test(String(v)) || !Number.isSafeInteger(n))
    throw new UsageError(`${flag} must be milliseconds (got '${String(v)}')`)
  return n
}

function endpoint(v: unknown, flag: string): string {
  if (typeof v !== 'string' || !/^\[?[^\]]+\]?:\d+$/.test(v)) throw new UsageError(`${flag} needs HOST:PORT`)
  return v
}

function fault(v: unknown): { kind: 'link-down' | 'source-dies'; ms: number } | undefined {
  if (v === undefined) return undefined
  const s = String(v)
  if (s === 'source-dies') return { kind: 'source-dies', ms: 0 }
  const m = /^link-down:(\d+)$/.exec(s)
  if (m === null) throw new UsageError(`--fault must be link-down:MS or source-dies (got '${s}')`)
  return { kind: 'link-down', ms: Number(m[1]) }
}

const COMMON = {
  json: { type: 'boolean' },
  events: { type: 'boolean' },
  'secret-file': { type: 'string' },
  insecure: { type: 'boolean' },
  tls: { type: 'boolean' },
} as const

function parse(args: string[], options: Record<string, { type: 'string' | 'boolean' }>): Values {
  try {
    return parseArgs({ args, options, allowPositionals: false, strict: true }).values as Values
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
}

function checkSecret(v: Values): void {
  try {
    resolveSecret({ secretFile: v['secret-file'] as string | undefined, insecure: v.insecure === true })
  } catch (err) {
    throw new UsageError(
      `${(err as Error).message.replace('pass { secret }', 'use --secret-file F').replace('{ insecure: true }', '--insecure')}`,
    )
  }
}

/** A reporter: JSON lines (--events), nothing but the result (--json), or lines for people. */
function reporter(
  v: Values,
  side: 'source' | 'target',
): { emit: Emit; final: () => Record<string, unknown> | undefined } {
  let result: Record<string, unknown> | undefined
  const events = v.events === true
  const human = !events && v.json !== true
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
        if (now - lastProgress < 1000) break
        lastProgress = now
        if (side === 'source')
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

function summaryLine(r: Record<string, unknown> | undefined, verified: boolean): Record<string, unknown> {
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

async function runSend(args: string[]): Promise<number> {
  const v = parse(args, {
    ...COMMON,
    to: { type: 'string' },
    size: { type: 'string' },
    mode: { type: 'string' },
    memory: { type: 'string' },
    'dirty-rate': { type: 'string' },
    'max-downtime': { type: 'string' },
    fault: { type: 'string' },
    'fault-device': { type: 'string' },
    seed: { type: 'string' },
    'target-readers': { type: 'string' },
    'postcopy-priority': { type: 'string' },
  })
  const to = endpoint(v.to, '--to')
  checkSecret(v)
  const memory = oneOf(v.memory, '--memory', MEMORY, 'anonymous')
  const page = memory === 'hugetlb' ? 2 << 20 : 4096
  const bytes = size(v.size, '--size', 1 << 30, page)
  if (bytes % page !== 0) throw new UsageError(`--size must be a multiple of ${formatBytes(page)}`)
  const f = fault(v.fault)
  const faultSpec: Fault | undefined =
    f === undefined ? undefined : { ...f, device: v['fault-device'] as string | undefined }
  const { emit, final } = reporter(v, 'source')
  const code = await send({
    to,
    size: bytes,
    mode: oneOf(v.mode, '--mode', MODES, 'hybrid'),
    memory,
    dirtyRate: size(v['dirty-rate'], '--dirty-rate', 64 << 20),
    maxDowntime: ms(v['max-downtime'], '--max-downtime', 20),
    secretFile: v['secret-file'] as string | undefined,
    insecure: v.insecure === true,
    tls: v.tls === true,
    fault: faultSpec,
    seed: ms(v.seed, '--seed', 1),
    targetReaders: ms(v['target-readers'], '--target-readers', 1),
    postcopyPriority: oneOf(
      v['postcopy-priority'],
      '--postcopy-priority',
      ['throughput', 'latency'] as const,
      'throughput',
    ),
    emit,
  })
  const r = final()
  if (code === 4)
    process.stderr.write('userfaultfd: authentication failed: the target refused our secret (or could not prove it)\n')
  if (v.json === true && r !== undefined) {
    const res = r.result as Record<string, unknown>
    process.stdout.write(`${JSON.stringify(summaryLine(res, res?.verified === true))}\n`)
  } else if (v.events !== true && r !== undefined) {
    const res = r.result as Record<string, number | boolean>
    process.stdout.write(
      `done: pre-copy ${formatMs(Number(res.precopyMs))}, downtime ${formatMs(Number(res.downtimeMs))}, post-copy ${formatMs(Number(res.postcopyMs))}, ` +
        `wire ${formatBytes(Number(res.wireBytes))}, verified ${res.verified}\n`,
    )
  }
  return code
}

async function runReceive(args: string[]): Promise<number> {
  const v = parse(args, {
    ...COMMON,
    listen: { type: 'string' },
    'on-source-loss': { type: 'string' },
    'source-loss-timeout': { type: 'string' },
    'tls-key': { type: 'string' },
    'tls-cert': { type: 'string' },
    fault: { type: 'string' },
    'fault-device': { type: 'string' },
    prealloc: { type: 'string' },
  })
  const listen = endpoint(v.listen, '--listen')
  const f = fault(v.fault)
  if (f !== undefined && f.kind !== 'link-down') throw new UsageError('receive takes --fault link-down:MS only')
  checkSecret(v)
  let tls: { key: Buffer; cert: Buffer } | undefined
  if (v['tls-key'] !== undefined || v['tls-cert'] !== undefined) {
    if (typeof v['tls-key'] !== 'string' || typeof v['tls-cert'] !== 'string')
      throw new UsageError('--tls-key and --tls-cert go together')
    tls = { key: fs.readFileSync(v['tls-key']), cert: fs.readFileSync(v['tls-cert']) }
  }
  const { emit, final } = reporter(v, 'target')
  const code = await receive({
    listen,
    secretFile: v['secret-file'] as string | undefined,
    insecure: v.insecure === true,
    onSourceLoss: oneOf(v['on-source-loss'], '--on-source-loss', POLICIES, 'wait'),
    sourceLossTimeout: ms(v['source-loss-timeout'], '--source-loss-timeout', 5000),
    tls,
    fault: f === undefined ? undefined : { ...f, device: v['fault-device'] as string | undefined },
    prealloc: v.prealloc === undefined ? undefined : size(v.prealloc, '--prealloc', 0, 4096),
    emit,
  })
  const r = final()
  if (v.json === true && r !== undefined) {
    process.stdout.write(`${JSON.stringify(summaryLine(r.result as Record<string, unknown>, r.verified === true))}\n`)
  } else if (v.events !== true && r !== undefined) {
    const res = (r.result ?? {}) as Record<string, number>
    process.stdout.write(
      `done: ${res.precopyPages} pages in pre-copy, ${res.demandPages} on demand, ${res.pushedPages} pushed, ` +
        `demand p99 ${Number(res.demandP99Us).toFixed(0)} us, verified ${r.verified}\n`,
    )
  }
  return code
}

async function runDemo(args: string[]): Promise<number> {
  const v = parse(args, {
    json: { type: 'boolean' },
    size: { type: 'string' },
    mode: { type: 'string' },
    memory: { type: 'string' },
    'dirty-rate': { type: 'string' },
    'max-downtime': { type: 'string' },
    fault: { type: 'string' },
    'on-source-loss': { type: 'string' },
    'source-loss-timeout': { type: 'string' },
    timeout: { type: 'string' },
    loopback: { type: 'boolean' },
  })
  const memory = oneOf(v.memory, '--memory', MEMORY, 'anonymous')
  const page = memory === 'hugetlb' ? 2 << 20 : 4096
  const bytes = size(v.size, '--size', 1 << 30, page)
  if (bytes % page !== 0) throw new UsageError(`--size must be a multiple of ${formatBytes(page)}`)
  const f = fault(v.fault)
  if (v['on-source-loss'] !== undefined && f?.kind !== 'source-dies')
    throw new UsageError('--on-source-loss goes with --fault source-dies')
  return demo({
    size: bytes,
    mode: oneOf(v.mode, '--mode', MODES, 'hybrid'),
    memory,
    dirtyRate: size(v['dirty-rate'], '--dirty-rate', 64 << 20),
    maxDowntime: ms(v['max-downtime'], '--max-downtime', 20),
    json: v.json === true,
    fault: f,
    onSourceLoss: oneOf(
      v['on-source-loss'],
      '--on-source-loss',
      POLICIES,
      f?.kind === 'source-dies' ? 'poison' : 'wait',
    ),
    // Longer than a link-down fault lasts: that one must end in a reconnect, not in the policy.
    sourceLossTimeout: ms(
      v['source-loss-timeout'],
      '--source-loss-timeout',
      f?.kind === 'link-down' ? f.ms + 10_000 : 3000,
    ),
    timeoutMs: ms(v.timeout, '--timeout', 300_000),
    loopback: v.loopback === true,
  })
}

/** Runs `migrate <sub> ...`; usage errors exit 2 with the message. */
export async function migrate(args: string[], usage: () => void): Promise<number> {
  const [sub, ...rest] = args
  try {
    switch (sub) {
      case 'demo':
        return await runDemo(rest)
      case 'send':
        return await runSend(rest)
      case 'receive':
        return await runReceive(rest)
      default:
        throw new UsageError(
          sub === undefined ? 'migrate needs demo, send or receive' : `unknown migrate command '${sub}'`,
        )
    }
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`userfaultfd: ${err.message}\n\n`)
      usage()
      return 2
    }
    throw err
  }
}
