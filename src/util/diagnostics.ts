// Observability without a logging dependency: NODE_DEBUG=userfaultfd prints lifecycle lines
// (util.debuglog), and diagnostics_channel channels carry what a service owner's metrics or
// tracing want: faults served (aggregated per progress tick, never one message per fault),
// errors, and connections. Publishing costs nothing while nobody subscribes.
import * as dc from 'node:diagnostics_channel'
import { debuglog } from 'node:util'

/** `NODE_DEBUG=userfaultfd node app.js` prints these lines on stderr (`debug.enabled` says whether). */
export const debug = debuglog('userfaultfd')

/** The channel names: a contract (documented in docs/api.md#observability). */
export const CHANNELS = Object.freeze({
  /** FaultsMessage: what was served since the previous message of the same server */
  faults: 'userfaultfd:faults',
  /** ErrorMessage: an error a server hit and kept going after (or that ended a connection) */
  error: 'userfaultfd:error',
  /** ConnectionMessage: a peer connected to a handler, completed its handshake, or left */
  connection: 'userfaultfd:connection',
})

/** Who published: the server object itself, and its kind. */
export interface Publisher {
  /** Which kind of server. */
  source: 'FaultServer' | 'FirecrackerHandler'
  /** the FaultServer or FirecrackerHandler instance */
  server: object
}

/** What `userfaultfd:faults` publishes: what one server served since its previous message. */
export interface FaultsMessage extends Publisher {
  /** FirecrackerHandler: the connection (one VM) these counts are of */
  connection?: number
  /** time the counts cover, ms */
  intervalMs: number
  /** fault messages read from the uffd in the interval */
  faults: number
  /** pages filled (copied, or zero pages) in the interval */
  pages: number
  /** bytes filled in the interval (copies and zero pages) */
  bytes: number
  /** of `pages`, zero pages */
  zeroPages: number
  /** the same since the server (or connection) started */
  total: { faults: number; pages: number; bytes: number; zeroPages: number }
}

/** What `userfaultfd:error` publishes. */
export interface ErrorMessage extends Publisher {
  /** The error (a UffdError, ProtocolError, or what a { handler } threw). */
  error: Error
  /** FirecrackerHandler: the connection it ended */
  connection?: number
}

/** What `userfaultfd:connection` publishes. */
export interface ConnectionMessage extends Publisher {
  /** 'open': a peer connected; 'ready': its handshake was valid; 'end': it is gone. */
  event: 'open' | 'ready' | 'end'
  /** The connection's id (ConnectionStats.id). */
  connection: number
  /** The peer (SO_PEERCRED). */
  peer: { pid: number; uid: number; gid: number }
  /** 'ready': the regions the peer declared */
  regions?: number
  /** 'end': why, when it was an error */
  error?: Error
}

export const faultsChannel = dc.channel(CHANNELS.faults)
export const errorChannel = dc.channel(CHANNELS.error)
export const connectionChannel = dc.channel(CHANNELS.connection)

export interface Counts {
  faults: number
  pages: number
  bytes: number
  zeroPages: number
}

/**
 * Turns running totals into per-tick messages: `tick(totals)` publishes what changed since the
 * last tick (nothing when nothing did, or when nobody subscribes).
 */
export class FaultsTicker {
  readonly #publisher: Publisher & { connection?: number }
  #last: Counts = { faults: 0, pages: 0, bytes: 0, zeroPages: 0 }
  #lastAt = performance.now()

  constructor(publisher: Publisher & { connection?: number }) {
    this.#publisher = publisher
  }

  tick(total: Counts): void {
    const now = performance.now()
    const last = this.#last
    if (total.faults === last.faults && total.pages === last.pages) {
      this.#lastAt = now
      return
    }
    if (faultsChannel.hasSubscribers) {
      faultsChannel.publish({
        ...this.#publisher,
        intervalMs: now - this.#lastAt,
        faults: total.faults - last.faults,
        pages: total.pages - last.pages,
        bytes: total.bytes - last.bytes,
        zeroPages: total.zeroPages - last.zeroPages,
        total: { ...total },
      } satisfies FaultsMessage)
    }
    this.#last = { ...total }
    this.#lastAt = now
  }
}
