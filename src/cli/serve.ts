// `userfaultfd serve --socket PATH --mem-file FILE`: the Firecracker-compatible page-fault
// handler as a process. Progress on stderr when it is a TTY; SIGINT/SIGTERM close every
// connection and the socket; --json prints the final stats on stdout.
import { FirecrackerHandler, type ReadMethod, type RemovePolicy } from '../firecracker/handler'

export interface ServeArgs {
  socket: string
  memFile: string
  onRemove: RemovePolicy
  readMethod: ReadMethod
  allowUid: number[]
  json: boolean
  handshakeTimeout: number
}

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1)
}

export async function serve(args: ServeArgs): Promise<number> {
  const handler = await FirecrackerHandler.listen({
    socketPath: args.socket,
    memFile: args.memFile,
    onRemove: args.onRemove,
    readMethod: args.readMethod,
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
