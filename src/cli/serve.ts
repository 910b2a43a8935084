// `userfaultfd serve --socket PATH --mem-file FILE`: the Firecracker-compatible page-fault
// handler as a process. Logs (timestamped text or JSON lines) on stderr: listening,
// connections, each VM's progress with percentage and ETA; SIGINT/SIGTERM close every
// connection and the socket; --json prints the final stats on stdout.
import * as fs from 'node:fs'
import type { ConnectionStats } from '../firecracker/handler'
import { FirecrackerHandler, type RemovePolicy } from '../firecracker/handler'
import type { GuestRegion } from '../firecracker/protocol'
import { createLogger, type LogFormat } from './log'
import { formatDuration, mib, rateAndEta } from './progress'

export interface ServeArgs {
  socket: string
  memFile: string
  onRemove: RemovePolicy
  source: 'mmap' | 'pread'
  allowUid: number[]
  json: boolean
  handshakeTimeout: number
  logFormat: LogFormat
  /** per-VM progress lines every this many ms (0: none) */
  progressIntervalMs: number
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

export async function serve(args: ServeArgs): Promise<number> {
  const logger = createLogger(args.logFormat, 'userfaultfd serve')
  // The command's checks found nobody listening on it: a dead handler's socket.
  if (fs.existsSync(args.socket))
    logger.log('info', `replacing the stale socket ${args.socket} (no handler listens on it)`, {
      event: 'stale-socket',
      socket: args.socket,
    })
  const handler = await FirecrackerHandler.listen({
    socketPath: args.socket,
    memFile: args.memFile,
    onRemove: args.onRemove,
    source: args.source,
    handshakeTimeout: args.handshakeTimeout,
    allow: args.allowUid.length > 0 ? (peer) => args.allowUid.includes(peer.uid) : undefined,
  })
  logger.log(
    'info',
    `listening on ${args.socket} (memory file ${args.memFile}, ${mib(handler.source.size)} MiB, on remove: ${args.onRemove})`,
    { event: 'listening', socket: args.socket, memFile: args.memFile, memFileBytes: handler.source.size },
  )
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
        logger.log(
          'info',
          `connection ${c.id} (pid ${c.peer.pid}): ${percent.toFixed(1)}% of ${mib(vm.totalBytes)} MiB served, ${mib(perSecond)} MiB/s, ETA ${formatDuration(etaSeconds)}`,
          {
            event: 'progress',
            connection: c.id,
            pid: c.peer.pid,
            servedBytes: bytes,
            totalBytes: vm.totalBytes,
            percent: Number(percent.toFixed(3)),
            bytesPerSecond: Math.round(perSecond),
            etaSeconds: etaSeconds === undefined ? null : Number(etaSeconds.toFixed(1)),
          },
        )
      }
    }, args.progressIntervalMs)
    timer.unref()
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
  await handler.close()
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
