// What a FirecrackerHandler tells NODE_DEBUG=userfaultfd and the diagnostics channels: each
// connection's open, ready and end, errors, and per connection what was served, aggregated
// every TICK_MS while connections are being served (never one message per fault).
import {
  type ConnectionMessage,
  FaultsTicker,
  connectionChannel,
  debug,
  errorChannel,
  faultsChannel,
} from '../util/diagnostics'
import type { GuestRegion } from './protocol'

// What this needs of the handler, structurally (handler.ts imports this file: no cycle back).
interface ConnectionStats {
  id: number
  peer: { pid: number; uid: number; gid: number }
  faults: number
  pagesServed: number
  bytesServed: number
  zeroPages: number
}

interface FirecrackerHandler {
  readonly socketPath: string
  connections(): ConnectionStats[]
}

/** The events observed, as FirecrackerHandlerEvents declares them. */
interface FirecrackerHandlerEvents {
  connection: [connection: ConnectionStats]
  ready: [connection: ConnectionStats, regions: GuestRegion[]]
  end: [connection: ConnectionStats, error: Error | undefined]
  serverError: [error: Error]
}

const TICK_MS = 500

interface Served {
  ticker: FaultsTicker
  pageSize: number
}

interface State {
  timer: NodeJS.Timeout | undefined
  served: Map<number, Served>
}

const states = new WeakMap<FirecrackerHandler, State>()

function stateOf(handler: FirecrackerHandler): State {
  let s = states.get(handler)
  if (s === undefined) {
    s = { timer: undefined, served: new Map() }
    states.set(handler, s)
  }
  return s
}

function tick(handler: FirecrackerHandler, state: State, only?: ConnectionStats): void {
  if (!faultsChannel.hasSubscribers) return
  for (const c of only ? [only] : handler.connections()) {
    const served = state.served.get(c.id)
    served?.ticker.tick({
      faults: c.faults,
      pages: c.pagesServed + c.zeroPages,
      bytes: c.bytesServed + c.zeroPages * served.pageSize,
      zeroPages: c.zeroPages,
    })
  }
}

function publish(handler: FirecrackerHandler, event: ConnectionMessage['event'], c: ConnectionStats, extra = {}): void {
  if (connectionChannel.hasSubscribers)
    connectionChannel.publish({
      source: 'FirecrackerHandler',
      server: handler,
      event,
      connection: c.id,
      peer: c.peer,
      ...extra,
    } satisfies ConnectionMessage)
}

/** Called with every event the handler emits, before its listeners. */
export function observe(handler: FirecrackerHandler, event: string | symbol, args: unknown[]): void {
  const state = stateOf(handler)
  switch (event) {
    case 'connection': {
      const [c] = args as FirecrackerHandlerEvents['connection']
      if (debug.enabled) debug('FirecrackerHandler %s: connection %d', handler.socketPath, c.id)
      publish(handler, 'open', c)
      break
    }
    case 'ready': {
      const [c, regions] = args as FirecrackerHandlerEvents['ready']
      if (debug.enabled)
        debug(
          'FirecrackerHandler %s: connection %d ready: pid %d uid %d, %d region(s)',
          handler.socketPath,
          c.id,
          c.peer.pid,
          c.peer.uid,
          regions.length,
        )
      publish(handler, 'ready', c, { regions: regions.length })
      state.served.set(c.id, {
        ticker: new FaultsTicker({ source: 'FirecrackerHandler', server: handler, connection: c.id }),
        pageSize: regions[0]?.pageSize ?? 4096,
      })
      if (state.timer === undefined) {
        state.timer = setInterval(() => tick(handler, state), TICK_MS)
        state.timer.unref()
      }
      break
    }
    case 'end': {
      const [c, error] = args as FirecrackerHandlerEvents['end']
      if (debug.enabled)
        debug(
          'FirecrackerHandler %s: connection %d ended%s',
          handler.socketPath,
          c.id,
          error ? `: ${error.message}` : '',
        )
      tick(handler, state, c) // the last counts
      state.served.delete(c.id)
      if (state.served.size === 0 && state.timer !== undefined) {
        clearInterval(state.timer)
        state.timer = undefined
      }
      publish(handler, 'end', c, error ? { error } : {})
      if (error && errorChannel.hasSubscribers)
        errorChannel.publish({ source: 'FirecrackerHandler', server: handler, error, connection: c.id })
      break
    }
    case 'serverError': {
      const [error] = args as FirecrackerHandlerEvents['serverError']
      if (debug.enabled) debug('FirecrackerHandler %s: server error: %s', handler.socketPath, error.message)
      if (errorChannel.hasSubscribers) errorChannel.publish({ source: 'FirecrackerHandler', server: handler, error })
      break
    }
  }
}
