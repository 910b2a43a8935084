// `userfaultfd serve --socket PATH --mem-file FILE`: the Firecracker-compatible page-fault
// handler as a process. Logs (timestamped text or JSON lines) on stderr: listening,
// connections, each VM's progress with percentage and ETA; SIGINT/SIGTERM close every
// connection and the socket; --json prints the final stats on stdout.
import * as fs from 'node:fs'
import { FaultTrace } from '../engines/fault-trace'
import type { SourceErrorPolicy } from '../addon/binding'
import type { ConnectionStats } from '../firecracker/handler'
import { FirecrackerHandler, type ReadMethod, type RemovePolicy } from '../firecracker/handler'
import type { GuestRegion } from '../firecracker/protocol'
import { handlerMetrics } from '../firecracker/metrics'
import { createLogger, type LogFormat } from './log'
import { listenMetrics, portOf } from './metrics-http'
import { formatDuration, mib, rateAndEta } from './progress'
import type { RemoteOptions } from '../sources/remote'

export interface ServeArgs {
  socket: string
  memFile: string
  onRemove: RemovePolicy
  /** a page the memory file cannot give (truncated, EIO): retry (default), poison, zero */
  onSourceError?: SourceErrorPolicy
  readMethod: ReadMethod
  allowUid: number[]
  json: boolean
  handshakeTimeout: number
  logFormat: LogFormat
  /** per-VM progress lines every this many ms (0: none) */
  progressIntervalMs: number
  /** working-set replay and record files */
  workingSet?: string
  recordWorkingSet?: string
  /** remote --mem-file: HTTP headers ('Name: value'), CA file, manifest, local cache */
  headers?: string[]
  ca?: string
  manifest?: string
  cacheDir?: string
  cacheSizeMiB?: number
  cacheKey?: string
  /** write every fault to this Chrome trace-event file (completed on exit) */
  trace?: string
  /** serve the Prometheus text on http://metricsHost:metricsPort/metrics (0: any free port) */
  metricsPort?: number
  metricsHost?: string
}

/** The RemoteSource options the command line asks for. */
function remoteOptions(args: ServeArgs): RemoteOptions {
  const headers: Record<string, string> = {}
  for (const h of args.headers ?? []) {
    const at = h.indexOf(':')
    headers[h.slice(0, at).trim().toLowerCase()] = h.slice(at + 1).trim()
  }
  return {
    ...(Object.keys(headers).length > 0 ? { headers } : {}),
    ...(args.ca !== undefined ? { ca: fs.readFileSync(args.ca) } : {}),
    ...(args.manifest !== undefined ? { manifest: args.manifest } : {}),
    ...(args.cacheDir !== undefined
      ? { cache: { dir: args.cacheDir, high: (args.cacheSizeMiB ?? 8192) * 1048576 } }
      : {}),
    ...(args.cacheKey !== undefined ? { cacheKey: args.cacheKey } : {}),
  }
}

/**
 * On a terminal, one status line kept at the bottom (restored bytes, rate, faults waiting);
 * log lines are written above it.
 */
class StatusLine {
  #shown = false
  constructor(readonly out: NodeJS.WritableStream) {}
  show(text: string): void {
    this.out.write(`\r${text}\x1b[K`)
    this.#shown = true
  }
  clear(): void {
    if (this.#shown) this.out.write('\r\x1b[K')
    this.#shown = false
  }
}

/** How far one VM's restore is: bytes of its memory served so far, out of all its regions'. */
interface VmProgress {
  totalBytes: number
  pageSize: number
  last: { t: number; bytes: number }
}

function servedBytes(c: ConnectionStats, pageSize: number): number {
  return c.bytesServed + c.zeroPages * pageSize
}

/** Bytes present / in all over the VMs connected now, and faults waiting. */
function restoreProgress(
  handler: FirecrackerHandler,
  vms: Map<number, VmProgress>,
): { present: number; total: number; waiting: number } {
  let present = 0
  let total = 0
  let waiting = 0
  for (const c of handler.connections()) {
    const vm = vms.get(c.id)
    if (vm === undefined) continue
    total += vm.totalBytes
    waiting += c.waiting ?? 0
    present += c.bytesPresent ?? Math.min(vm.totalBytes, servedBytes(c, vm.pageSize))
  }
  return { present, total, waiting }
}

export async function serve(args: ServeArgs): Promise<number> {
  const tty = process.stderr.isTTY === true && args.logFormat === 'text'
  const status = tty ? new StatusLine(process.stderr) : null
  const base = createLogger(args.logFormat, 'userfaultfd serve')
  const logger: typeof base = {
    log(level, message, fields) {
      status?.clear()
      base.log(level, message, fields)
    },
  }
  // The command's checks found nobody listening on it: a dead handler's socket.
  if (fs.existsSync(args.socket))
    logger.log('info', `replacing the stale socket ${args.socket} (no handler listens on it)`, {
      event: 'stale-socket',
      socket: args.socket,
    })
  const trace = args.trace === undefined ? undefined : new FaultTrace(args.trace)
  let handler: FirecrackerHandler
  try {
    handler = await FirecrackerHandler.listen({
      socketPath: args.socket,
      memFile: args.memFile,
      onRemove: args.onRemove,
      ...(args.onSourceError !== undefined ? { onSourceError: args.onSourceError } : {}),
      readMethod: args.readMethod,
      handshakeTimeout: args.handshakeTimeout,
      allow: args.allowUid.length > 0 ? (peer) => args.allowUid.includes(peer.uid) : undefined,
      remote: remoteOptions(args),
      workingSet: args.workingSet,
      recordWorkingSet: args.recordWorkingSet,
      trace,
    })
  } catch (err) {
    trace?.close()
    throw err
  }
  logger.log(
    'info',
    `listening on ${args.socket} (memory file ${args.memFile}, ${mib(handler.snapshot.size)} MiB, on remove: ${args.onRemove})`,
    { event: 'listening', socket: args.socket, memFile: args.memFile, memFileBytes: handler.snapshot.size },
  )
  let metrics: Awaited<ReturnType<typeof listenMetrics>> | undefined
  if (args.metricsPort !== undefined) {
    const host = args.metricsHost ?? '127.0.0.1'
    try {
      metrics = await listenMetrics(args.metricsPort, host, () => handlerMetrics(handler))
    } catch (err) {
      await handler.close()
      throw new Error(`--metrics-port ${args.metricsPort}: ${(err as Error).message}`)
    }
    const url = `http://${host.includes(':') ? `[${host}]` : host}:${portOf(metrics)}/metrics`
    logger.log('info', `metrics on ${url}`, { event: 'metrics', url })
  }
  const vms = new Map<number, VmProgress>()
  handler.on('ready', (c, regions: GuestRegion[]) => {
    const totalBytes = regions.reduce((n, r) => n + r.size, 0)
    vms.set(c.id, { totalBytes, pageSize: regions[0]?.pageSize ?? 4096, last: { t: Date.now(), bytes: 0 } })
    logger.log(
      'info',
      `connection ${c.id}: pid ${c.peer.pid} uid ${c.peer.uid}, ${c.regions} region(s), ${mib(totalBytes)} MiB of guest memory`,
      { event: 'ready', connection: c.id, pid: c.peer.pid, uid: c.peer.uid, regions: c.regions, totalBytes },
    )
  })
  handler.on('warning', (c, err) => {
    logger.log('warn', `connection ${c.id}: ${err.message}`, {
      event: 'warning',
      connection: c.id,
      code: (err as { code?: string }).code,
      error: err.message,
    })
  })
  handler.on('workingSet', (c, file, pages) => {
    logger.log('info', `connection ${c.id}: working set of ${pages} pages written to ${file}`, {
      event: 'working-set',
      connection: c.id,
      file,
      pages,
    })
  })
  handler.on('end', (c, err?: Error) => {
    vms.delete(c.id)
    logger.log(
      err ? 'warn' : 'info',
      `connection ${c.id} ended${err ? `: ${err.message}` : ''} (${c.pagesServed} pages served, ${c.zeroPages} zero, ${c.removes} removes)`,
      {
        event: 'end',
        connection: c.id,
        pid: c.peer.pid,
        error: err?.message,
        pagesServed: c.pagesServed,
        zeroPages: c.zeroPages,
        removes: c.removes,
      },
    )
  })

  const started = Date.now()
  let timer: NodeJS.Timeout | undefined
  if (args.progressIntervalMs > 0) {
    timer = setInterval(() => {
      const now = Date.now()
      for (const c of handler.connections()) {
        const vm = vms.get(c.id)
        if (vm === undefined) continue
        const bytes = servedBytes(c, vm.pageSize)
        if (bytes === vm.last.bytes) continue // idle: nothing new to say
        const { perSecond, etaSeconds } = rateAndEta(vm.last.bytes, vm.last.t, bytes, now, vm.totalBytes)
        vm.last = { t: now, bytes }
        const percent = vm.totalBytes === 0 ? 100 : Math.min(100, (bytes / vm.totalBytes) * 100)
        const waiting = c.waiting === undefined ? '' : `, ${c.waiting} fault(s) waiting`
        logger.log(
          'info',
          `connection ${c.id} (pid ${c.peer.pid}): ${percent.toFixed(1)}% of ${mib(vm.totalBytes)} MiB served, ${mib(perSecond)} MiB/s, ETA ${formatDuration(etaSeconds)}${waiting}`,
          {
            event: 'progress',
            connection: c.id,
            pid: c.peer.pid,
            servedBytes: bytes,
            totalBytes: vm.totalBytes,
            percent: Number(percent.toFixed(3)),
            bytesPerSecond: Math.round(perSecond),
            etaSeconds: etaSeconds === undefined ? null : Number(etaSeconds.toFixed(1)),
            ...(c.waiting !== undefined ? { faultsWaiting: c.waiting, bytesPresent: c.bytesPresent ?? 0 } : {}),
          },
        )
      }
    }, args.progressIntervalMs)
    timer.unref()
  }
  // On a terminal: one status line over every VM, once a second: bytes present / total, rate,
  // faults waiting.
  let statusTimer: NodeJS.Timeout | undefined
  if (status !== null) {
    let last = { t: Date.now(), bytes: 0 }
    statusTimer = setInterval(() => {
      const { present, total, waiting } = restoreProgress(handler, vms)
      if (total === 0) return
      const now = Date.now()
      const rate = now > last.t ? (Math.max(0, present - last.bytes) * 1000) / (now - last.t) : 0
      last = { t: now, bytes: present }
      status.show(
        `${mib(present)} / ${mib(total)} MiB present (${((present / total) * 100).toFixed(1)}%), ${mib(rate)} MiB/s, ${waiting} fault(s) waiting, ${vms.size} VM(s)`,
      )
    }, 1000)
    statusTimer.unref()
  }

  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    const stop = (sig: NodeJS.Signals): void => {
      process.off('SIGINT', stop)
      process.off('SIGTERM', stop)
      resolve(sig)
    }
    process.on('SIGINT', stop)
    process.on('SIGTERM', stop)
  })
  if (timer) clearInterval(timer)
  if (statusTimer) clearInterval(statusTimer)
  status?.clear()
  if (metrics) {
    const closed = new Promise((resolve) => metrics.close(resolve))
    metrics.closeAllConnections()
    await closed
  }
  await handler.close()
  if (trace !== undefined) {
    trace.close()
    logger.log('info', `trace of ${trace.records} fault(s) written to ${trace.path}`, {
      event: 'trace',
      file: trace.path,
      records: trace.records,
    })
  }
  const stats = { ...handler.stats(), uptimeMs: Date.now() - started }
  if (args.json) process.stdout.write(`${JSON.stringify(stats)}\n`)
  logger.log(
    'info',
    `stopped by ${signal}; ${stats.pagesServed} pages served to ${stats.connections.total} connection(s) in ${formatDuration(stats.uptimeMs / 1000)}`,
    {
      event: 'stopped',
      signal,
      pagesServed: stats.pagesServed,
      connections: stats.connections.total,
      uptimeMs: stats.uptimeMs,
    },
  )
  return 0
}
