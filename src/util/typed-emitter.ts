// An EventEmitter whose events are typed by a map of event name -> listener arguments, so that
// `on('progres', ...)` does not compile and listeners get their argument types. At run time it
// is Node's EventEmitter itself (instanceof EventEmitter, events.once() and every method work);
// only the types differ. Written out rather than using @types/node's generic EventEmitter<T>,
// so that consumers on any @types/node version see the same types.
import { EventEmitter } from 'node:events'

/** Event name -> the listener's arguments, e.g. `{ end: [stats: Stats, error: Error | undefined] }`. */
export type EventMap<E> = { [K in keyof E]: unknown[] }

type Name<E> = keyof E & (string | symbol)
type Listener<E, K extends keyof E> = E[K] extends unknown[] ? (...args: E[K]) => void : never

/** The typed methods; the others are EventEmitter's own. */
export interface TypedEvents<E extends EventMap<E>> {
  on<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  once<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  off<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  addListener<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  removeListener<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  prependListener<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  prependOnceListener<K extends Name<E>>(event: K, listener: Listener<E, K>): this
  emit<K extends Name<E>>(event: K, ...args: E[K]): boolean
  listeners<K extends Name<E>>(event: K): Array<Listener<E, K>>
  rawListeners<K extends Name<E>>(event: K): Array<Listener<E, K>>
  listenerCount<K extends Name<E>>(event: K): number
  removeAllListeners(event?: Name<E>): this
  setMaxListeners(n: number): this
  eventNames(): Array<Name<E>>
}

export type TypedEmitter<E extends EventMap<E>> = TypedEvents<E> & Omit<EventEmitter, keyof TypedEvents<E>>

/** `class X extends TypedEmitter<XEvents>`: Node's EventEmitter with typed events. */
export const TypedEmitter = EventEmitter as unknown as new <E extends EventMap<E>>() => TypedEmitter<E>
