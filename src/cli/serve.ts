// `userfaultfd serve --socket PATH --mem-file FILE`: the Firecracker-compatible page-fault
// handler as a process. Progress on stderr when it is a TTY; SIGINT/SIGTERM close every
// connection and the socket; --json prints the final stats on stdout.
import * as fs from 'node:fs'
import { FirecrackerHandler, checkHandshakeLimits, type RemovePolicy } from '../firecracker/handler'
import { memFileProblem } from '../firecracker/mem-file'

export interface ServeArgs {
  socket: string
  memFile: string
  onRemove: RemovePolicy
  source: 'mmap' | 'pread'
  allowUid: number[]
  json: boolean
  handshakeTimeout: number
}

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1)
}

/**
 * Checks what the flags name before anything starts: the memory file must exist and be a regular
 * file or a block device (a FIFO would block open(2) forever), the handshake timeout must be one
 * a timer can wait. Returns the message to print, or undefined.
 */
export function checkServeArgs(args: Pick<ServeArgs, 'memFile' | 'handshakeTimeout'>): string | undefined {
  let stat: fs.Stats
  try {
    stat = fs.statSync(args.memFile)
  } catch (err) {
    return `--mem-file ${args.memFile}: ${(err as Error).message}`
  }
  const problem = memFileProblem(args.memFile, stat)
  if (problem !== undefined) return `--mem-file: ${problem}`
  try {
    checkHandshakeLimits({ handshakeTimeout: args.handshakeTimeout })
  } catch (err) {
    return `--handshake-timeout: ${(err as Error).message}`
  }
  return undefined
}

export async function serve(args: ServeArgs): Promise<number> {
  const problem = checkServeArgs(args)
  if (problem !== undefined) {
    process.stderr.write(`userfaultfd: ${problem}\n`)
    return 2
  }
  const handler = await FirecrackerHandler.listen({
    socketPath: args.socket,
    memFile: args.memFile,
    onRemove: args.onRemove,
    source: args.source,
    handshakeTimeout: args.handshakeTimeout,
    allow: args.allowUid.length > 0 ? (peer) => args.allowUid.includes(peer.uid) : undefined,
  })
  const log = (msg: string): void => {
    process.stderr.write(`${msg}\n`)
  }
  log(
    `userfaultfd serve: listening on ${args.socket} (memory file ${args.memFile}, ${mib(handler.source.size)} MiB, on remove: ${args.onRemove})`,
  )
  handler.on('ready', (c) => log(`connection ${c.id}: pid ${c.peer.pid} uid ${c.peer.uid}, ${c.regions} region(s)`))
  handler.on('end', (c, err?: Error) =>
    log(
      `connection ${c.id} ended${err ? `: ${err.message}` : ''} (${c.pagesServed} pages served, ${c.zeroPages} zero, ${c.removes} removes)`,
    ),
  )

  const started = Date.now()
  let timer: NodeJS.Timeout | undefined
  if (process.stderr.isTTY) {
    let last = { t: Date.now(), bytes: 0 }
    timer = setInterval(() => {
      const s = handler.stats()
      const now = Date.now()
      const rate = (s.bytesServed - last.bytes) / 1048576 / ((now - last.t) / 1000)
      last = { t: now, bytes: s.bytesServed }
      process.stderr.write(
        `\r${s.pagesServed} pages served (${mib(s.bytesServed)} MiB, ${rate.toFixed(1)} MiB/s), ${s.connections.active} VM(s) connected   `,
      )
    }, 1000)
    timer.unref()
  }

  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop)
      process.off('SIGTERM', stop)
      resolve()
    }
    process.on('SIGINT', stop)
    process.on('SIGTERM', stop)
  })
  if (timer) clearInterval(timer)
  if (process.stderr.isTTY) process.stderr.write('\n')
  await handler.close()
  const stats = { ...handler.stats(), uptimeMs: Date.now() - started }
  if (args.json) process.stdout.write(`${JSON.stringify(stats)}\n`)
  else log(`userfaultfd serve: stopped; ${stats.pagesServed} pages served to ${stats.connections.total} connection(s)`)
  return 0
}
