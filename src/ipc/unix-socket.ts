// Unix socket paths: whether something listens on one.
import * as net from 'node:net'

/**
 * Whether something accepts connections on the Unix socket at `socketPath`. No answer within
 * `timeoutMs` counts as listening: something holds it (a stopped process, a full backlog).
 */
export function isListening(socketPath: string, timeoutMs = 2000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath)
    const done = (live: boolean): void => {
      clearTimeout(timer)
      s.destroy()
      resolve(live)
    }
    const timer = setTimeout(() => done(true), timeoutMs)
    s.once('connect', () => done(true))
    s.once('error', () => done(false))
  })
}
