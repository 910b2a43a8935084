// `userfaultfd migrate demo`: a source and a target as two processes in two network namespaces
// joined by a veth pair (loopback, with the reason printed, where namespaces cannot be made), a
// dirtying workload migrated from one to the other, live progress on a TTY, then the timeline
// and the page-by-page verdict. Faults on request: the link down for a while in post-copy, or
// the source killed in post-copy (the target's onSourceLoss policy then decides).
import { type ChildProcess, spawn } from 'node:child_process'
import * as fs from 'node:fs'
import { randomBytes } from 'node:crypto'
import * as path from 'node:path'
import * as readline from 'node:readline'
import type { MigrationResult } from '../../migration/common'
import type { MigrationTargetResult, SourceLossPolicy } from '../../migration/target'
import type { MemoryKind, MigrationMode } from '../../migration/wire'
import { createLinkPair, type LinkPair } from './netns'
import { formatBytes, formatMs } from './units'

export interface DemoOptions {
  size: number
  mode: MigrationMode
  memory: MemoryKind
  dirtyRate: number
  maxDowntime: number
  json: boolean
  fault?: { kind: 'link-down' | 'source-dies'; ms: number }
  onSourceLoss: SourceLossPolicy
  sourceLossTimeoutMs: number
  timeoutMs: number
  loopback: boolean
}

/** The --json line: exactly these fields (the source's result's, with a yes/no verdict). */
export type DemoSummary = Pick<
  MigrationResult,
  | 'mode'
  | 'bytes'
  | 'totalMs'
  | 'precopyMs'
  | 'downtimeMs'
  | 'postcopyMs'
  | 'wireBytes'
  | 'demandP50Us'
  | 'demandP99Us'
  | 'reconnects'
  | 'poisonedPages'
> & { verified: boolean }

type Event = Record<string, unknown> & { event: string }

interface Half {
  child: ChildProcess
  events: Event[]
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  stderr: string[]
}

function startHalf(argv: string[], env: NodeJS.ProcessEnv, onEvent: (e: Event) => void, name: string): Half {
  const child = spawn(argv[0], argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] })
  // USERFAULTFD_MIGRATE_LOG=DIR keeps each half's event lines (DIR/source.jsonl, DIR/target.jsonl).
  const logDir = process.env.USERFAULTFD_MIGRATE_LOG
  const log = logDir ? fs.createWriteStream(path.join(logDir, `${name}.jsonl`)) : undefined
  const half: Half = { child, events: [], stderr: [], exit: Promise.resolve({ code: null, signal: null }) }
  half.exit = new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal })))
  readline.createInterface({ input: child.stdout! }).on('line', (line) => {
    log?.write(`${line}\n`)
    let e: Event
    try {
      e = JSON.parse(line) as Event
    } catch {
      return
    }
    half.events.push(e)
    onEvent(e)
  })
  readline.createInterface({ input: child.stderr! }).on('line', (line) => {
    log?.write(`${JSON.stringify({ stderr: line })}\n`)
    half.stderr.push(line)
  })
  return half
}

function bar(fraction: number, width = 24): string {
  const n = Math.max(0, Math.min(width, Math.round(fraction * width)))
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}]`
}

export async function demo(o: DemoOptions): Promise<number> {
  const say = (line: string): void => {
    if (!o.json) process.stdout.write(`${line}\n`)
  }
  const tty = process.stdout.isTTY === true && !o.json
  let link: LinkPair | undefined
  let host = '127.0.0.1'
  let sourceHost = '127.0.0.1'
  if (!o.loopback) {
    const made = createLinkPair()
    if ('reason' in made) {
      process.stderr.write(`userfaultfd: ${made.reason}; falling back to loopback (127.0.0.1)\n`)
    } else {
      link = made
      host = made.targetIp
      sourceHost = made.sourceIp
    }
  }
  if (o.fault?.kind === 'link-down' && link === undefined) {
    process.stderr.write('userfaultfd: --fault link-down needs the network namespaces; cannot inject it on loopback\n')
    return 2
  }
  const secret = randomBytes(24).toString('hex')
  const env = { ...process.env, USERFAULTFD_MIGRATE_SECRET: secret }
  const cli = path.join(__dirname, '..', 'index.js')
  const node = process.execPath
  const halves: Half[] = []
  let interrupted = false
  const onSignal = (sig: NodeJS.Signals): void => {
    interrupted = true
    for (const h of halves) h.child.kill('SIGKILL')
    link?.remove()
    process.stderr.write(`\nuserfaultfd: ${sig}: stopped, namespaces removed\n`)
    process.exit(130)
  }
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)

  const t0 = performance.now()
  const times: Record<string, number> = {}
  let status = ''
  let progress: Event | undefined
  let targetProgress: Event | undefined
  let lastDraw = 0
  let waitHeld = false
  const draw = (force = false): void => {
    if (!tty) return
    const now = performance.now()
    if (!force && now - lastDraw < 100) return
    lastDraw = now
    const p = progress
    let line = status
    if (p !== undefined) {
      const total = Number(p.pagesTotal) || 1
      const phase = String(p.phase)
      const sent = Number(p.pagesSent) + Number(p.pagesPushed) + Number(p.pagesDemanded)
      const frac = phase === 'postcopy' ? 1 - Number(p.pagesLeft) / total : Math.min(1, Number(p.pagesSent) / total)
      line =
        `${phase.padEnd(12)} round ${String(p.round).padStart(2)} ${bar(frac)} ` +
        `sent ${sent} pages (pre-copy ${p.pagesSent}, demanded ${p.pagesDemanded}, pushed ${p.pagesPushed}) ` +
        `${formatBytes(Number(p.bytesPerSecond))}/s ETA ${formatMs(Number(p.etaMs))}`
      if (targetProgress !== undefined && phase === 'postcopy') line += ` | target faults ${targetProgress.faults}`
    }
    process.stdout.write(`\r\x1b[2K${line.slice(0, (process.stdout.columns ?? 160) - 1)}`)
  }
  const onEvent = (side: string) => (e: Event) => {
    const at = performance.now() - t0
    if (e.event === 'phase') {
      times[`${side}:${e.phase}`] ??= at
      status = `${side} ${e.phase}`
      draw(true)
    } else if (e.event === 'progress' && side === 'source') {
      progress = e
      draw()
    } else if (e.event === 'progress') {
      targetProgress = e
    } else if (e.event === 'fault') {
      if (tty) process.stdout.write('\n')
      say(`fault: ${e.fault}${e.ms ? ` for ${e.ms} ms` : ''} at ${formatMs(at)}`)
    } else if (e.event === 'reconnect' || e.event === 'disconnect') {
      if (tty) process.stdout.write('\n')
      say(`${side}: ${e.event}${e.reason ? ` (${e.reason})` : ''} at ${formatMs(at)}`)
    } else if (e.event === 'error') {
      if (tty) process.stdout.write('\n')
      say(`${side} error: ${e.message}`)
      if (side === 'target' && e.code === 'ESOURCELOST' && o.onSourceLoss === 'wait') {
        // The target holds its faulting threads for a source that will not come back: show
        // it for a moment, then end the demo (a real target would wait, or be closed).
        setTimeout(() => {
          waitHeld = true
          for (const h of halves) h.child.kill('SIGKILL')
        }, 2000).unref()
      }
    } else if (e.event === 'round' && !tty) {
      say(
        `round ${e.round}: ${e.pages} pages in ${formatMs(Number(e.ms))}, ${e.dirtyPages} dirtied meanwhile (${formatMs(Number(e.estimatedMs))} to send)`,
      )
    }
  }

  try {
    say(
      link
        ? `network: namespaces ${link.sourceNs} (${link.sourceIp}) and ${link.targetNs} (${link.targetIp}), veth ${link.sourceDev}/${link.targetDev}`
        : 'network: loopback',
    )
    say(
      `memory: ${formatBytes(o.size)} ${o.memory}, mode ${o.mode}, writer ${formatBytes(o.dirtyRate)}/s on each side${o.fault ? `, fault ${o.fault.kind}` : ''}`,
    )
    const targetArgv = [
      ...(link?.exec('target') ?? []),
      node,
      cli,
      'migrate',
      'receive',
      '--listen',
      `${host}:0`,
      '--events',
      '--on-source-loss',
      o.onSourceLoss,
      '--source-loss-timeout',
      String(o.sourceLossTimeoutMs),
    ]
    // The link goes down from the target's end the moment it resumes (before its workload touches
    // anything: the whole post-copy is still ahead); the source dies the moment it hears that.
    if (o.fault?.kind === 'link-down' && link !== undefined)
      targetArgv.push('--fault', `link-down:${o.fault.ms}`, '--fault-device', link.targetDev)
    const target = startHalf(targetArgv, env, onEvent('target'), 'target')
    halves.push(target)
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the target did not start listening')), 20_000)
      target.child.stdout?.on('data', () => {
        const l = target.events.find((e) => e.event === 'listening')
        if (l !== undefined) {
          clearTimeout(timer)
          resolve(Number(l.port))
        }
      })
      void target.exit.then(() => reject(new Error(`the target exited: ${target.stderr.join('\n')}`)))
    })
    const sourceArgv = [
      ...(link?.exec('source') ?? []),
      node,
      cli,
      'migrate',
      'send',
      '--to',
      `${host}:${port}`,
      '--size',
      String(o.size),
      '--mode',
      o.mode,
      '--memory',
      o.memory,
      '--dirty-rate',
      String(o.dirtyRate),
      '--max-downtime',
      String(o.maxDowntime),
      '--events',
    ]
    if (o.fault?.kind === 'source-dies') sourceArgv.push('--fault', 'source-dies')
    void sourceHost
    const source = startHalf(sourceArgv, env, onEvent('source'), 'source')
    halves.push(source)
    const timeout = setTimeout(() => {
      for (const h of halves) h.child.kill('SIGKILL')
    }, o.timeoutMs)
    const [sExit, tExit] = await Promise.all([source.exit, target.exit])
    clearTimeout(timeout)
    if (tty) process.stdout.write('\r\x1b[2K')
    const totalWall = performance.now() - t0
    const sResult = source.events.find((e) => e.event === 'result')?.result as MigrationResult | undefined
    const tEvent = target.events.find((e) => e.event === 'result')
    const tResult = tEvent?.result as MigrationTargetResult | undefined
    const workload = tEvent?.workload as { sigbus: number; faults: number } | undefined
    const failed = [...source.events, ...target.events].filter((e) => e.event === 'failed')
    for (const f of failed) say(`${f.side}: ${f.message}`)
    const verified = sResult?.verified === true && tEvent?.verified === true
    const summary: DemoSummary = {
      mode: o.mode,
      bytes: o.size,
      totalMs: sResult?.totalMs ?? totalWall,
      precopyMs: sResult?.precopyMs ?? Math.max(0, (times['source:stopping'] ?? 0) - (times['source:precopy'] ?? 0)),
      downtimeMs: sResult?.downtimeMs ?? Math.max(0, (times['target:postcopy'] ?? 0) - (times['source:stopping'] ?? 0)),
      postcopyMs: sResult?.postcopyMs ?? tResult?.postcopyMs ?? 0,
      wireBytes: sResult?.wireBytes ?? tResult?.wireBytes ?? 0,
      demandP50Us: sResult?.demandP50Us ?? tResult?.demandP50Us ?? 0,
      demandP99Us: sResult?.demandP99Us ?? tResult?.demandP99Us ?? 0,
      verified,
      reconnects: Math.max(sResult?.reconnects ?? 0, tResult?.reconnects ?? 0),
      poisonedPages: tResult?.poisonedPages ?? 0,
    }
    if (!o.json) printTimeline(summary, sResult, tResult, workload)
    let code: number
    if (o.fault?.kind === 'source-dies') {
      const sigbus = workload?.sigbus ?? 0
      if (o.onSourceLoss === 'poison') {
        code = summary.poisonedPages > 0 && sigbus > 0 ? 0 : 1
        say(
          code === 0
            ? `the source died in post-copy: ${summary.poisonedPages} pages poisoned, the target's workload got SIGBUS (${sigbus} thread(s)) instead of hanging`
            : `FAILED: expected poisoned pages and a SIGBUS (poisoned ${summary.poisonedPages}, SIGBUS ${sigbus})`,
        )
      } else if (o.onSourceLoss === 'zero') {
        code = (tResult?.zeroedPages ?? 0) > 0 ? 0 : 1
        say(`the source died in post-copy: ${tResult?.zeroedPages ?? 0} pages filled with zeros`)
      } else {
        code = waitHeld ? 3 : 1
        say(
          waitHeld
            ? "the source died in post-copy: the target kept its faulting threads waiting for a new source (policy 'wait'); demo stopped"
            : 'FAILED: the target did not report the lost source',
        )
      }
    } else if (o.fault?.kind === 'link-down') {
      code = verified && summary.reconnects >= 1 ? 0 : 1
    } else {
      code = verified ? 0 : 1
    }
    if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`)
    if (code !== 0 && !interrupted && o.fault === undefined) {
      for (const line of [...source.stderr, ...target.stderr].slice(-20)) process.stderr.write(`${line}\n`)
      if (sExit.code !== 0 || tExit.code !== 0)
        process.stderr.write(
          `userfaultfd: source exited ${sExit.signal ?? sExit.code}, target ${tExit.signal ?? tExit.code}\n`,
        )
    }
    return code
  } finally {
    for (const h of halves) h.child.kill('SIGKILL')
    await Promise.all(halves.map((h) => h.exit))
    link?.remove()
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

function printTimeline(
  s: DemoSummary,
  source: MigrationResult | undefined,
  target: MigrationTargetResult | undefined,
  workload: { sigbus: number; faults: number } | undefined,
): void {
  const out = (l: string): void => {
    process.stdout.write(`${l}\n`)
  }
  out('')
  out('timeline')
  out(
    `  pre-copy   ${formatMs(s.precopyMs).padStart(10)}   ${source?.rounds ?? 0} round(s), ${source?.precopyPages ?? 0} pages, the workload running`,
  )
  out(
    `  downtime   ${formatMs(s.downtimeMs).padStart(10)}   source stopped -> target running (${source?.dirtyAtStop ?? 0} pages dirty at the stop)`,
  )
  out(
    `  post-copy  ${formatMs(s.postcopyMs).padStart(10)}   ${source?.demandPages ?? target?.demandPages ?? 0} pages on demand, ${source?.pushedPages ?? target?.pushedPages ?? 0} pushed`,
  )
  out(`  total      ${formatMs(s.totalMs).padStart(10)}`)
  out(
    `demand latency  p50 ${s.demandP50Us.toFixed(0)} us, p99 ${s.demandP99Us.toFixed(0)} us (request sent -> page installed, at the target)`,
  )
  out(
    `wire           ${formatBytes(s.wireBytes)} for ${formatBytes(s.bytes)} of memory (${(s.wireBytes / s.bytes).toFixed(3)}x)`,
  )
  if (s.reconnects > 0) out(`reconnects     ${s.reconnects}`)
  if (s.poisonedPages > 0)
    out(`poisoned       ${s.poisonedPages} pages (target workload: ${workload?.sigbus ?? 0} SIGBUS)`)
  if (target !== undefined) out(`duplicates     ${target.duplicatePages} pages received twice (dropped)`)
  out(
    `verified       ${s.verified ? "yes: every page equals the source at its stop (the target's own writes kept)" : 'NO'}`,
  )
}
