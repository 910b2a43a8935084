// The /metrics endpoint of `userfaultfd serve --metrics-port`: GET (or HEAD) /metrics answers
// the Prometheus text of the moment; anything else is 404 or 405. No other routes, no state.
import * as http from 'node:http'
import type { AddressInfo } from 'node:net'

export const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'

/** Listens on `host`:`port` (0: any free port); resolves with the server once it listens. */
export function listenMetrics(port: number, host: string, render: () => string): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://metrics')
    if (url.pathname !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at /metrics\n')
      return
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n')
      return
    }
    let body: string
    try {
      body = render()
    } catch (err) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error).message}\n`)
      return
    }
    res.writeHead(200, { 'content-type': PROMETHEUS_CONTENT_TYPE, 'content-length': Buffer.byteLength(body) })
    res.end(req.method === 'HEAD' ? undefined : body)
  })
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => {
      server.off('error', reject)
      resolve(server)
    })
  })
}

/** The port a listening server got (the one asked for, or the one the kernel picked for 0). */
export function portOf(server: http.Server): number {
  return (server.address() as AddressInfo).port
}
