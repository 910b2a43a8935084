// Consumer type tests for the typed event maps (see types-events.mts): unknown event names do
// not compile, listeners get their argument types. Never run, only type-checked.
import { once } from 'node:events'
import type { ConnectionStats, FirecrackerHandler, GuestRegion } from 'userfaultfd'

declare const handler: FirecrackerHandler

handler.on('ready', (connection, regions) => {
  connection satisfies ConnectionStats
  regions satisfies GuestRegion[]
  connection.peer.pid satisfies number
})
handler.once('end', (connection, error) => {
  connection.pagesServed satisfies number
  error satisfies Error | undefined
  // @ts-expect-error the error may be undefined
  error.message
})
handler.on('connection', (connection) => connection.id satisfies number)
handler.off('serverError', (error: Error) => error.message)

// @ts-expect-error a misspelt event name does not compile
handler.on('raedy', () => {})
// @ts-expect-error nor does an event the handler never emits
handler.on('progress', () => {})
// @ts-expect-error listener arguments are checked
handler.on('ready', (connection: string) => connection)
// @ts-expect-error emit's arguments too
handler.emit('end', 'not stats', undefined)

// Still a Node EventEmitter: events.once() and the untyped methods work.
const [connection] = await once(handler, 'connection')
void connection
handler.setMaxListeners(20) satisfies FirecrackerHandler
handler.listenerCount('ready') satisfies number
