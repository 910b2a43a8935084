// An EventEmitter whose events are typed by a map of event name -> listener arguments, so that
// `on('progres', ...)` does not compile and listeners get their argument types. At run time it
// is Node's EventEmitter itself (instanceof EventEmitter, events.once() and every method work);
// only the types differ. Written out rather than using @types/node's generic EventEmitter<T>,
// so that consumers on any @types/node version see the same types.
import { EventEmitter } from 'node:events'

/** Event name -> the listener's arguments, e.g. `{ end: [stats: Stats, error: Error | undefined] }`. */
export type EventMap<E> = { [K in keyof E]: unknown[] }

/** An event name of the map E. */
export type TypedEventName<E> = keyof E & (string | symbol)
/** The listener of event K of the map E. */
export type TypedListener<E, K extends keyof E> = E[K] extends unknown[] ? (...args: E[K]) => void : never

/** The typed methods; the others are EventEmitter's own. */
export interface TypedEvents<E extends EventMap<E>> {
  /** Adds `listener` for `event` (EventEmitter.on). */
  on<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Adds `listener` for the next `event` only. */
  once<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Removes `listener` (EventEmitter.off). */
  off<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Same as on(). */
  addListener<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Same as off(). */
  removeListener<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Adds `listener` before the others. */
  prependListener<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Adds `listener`, for the next `event` only, before the others. */
  prependOnceListener<K extends TypedEventName<E>>(event: K, listener: TypedListener<E, K>): this
  /** Calls the listeners of `event` with `args`. */
  emit<K extends TypedEventName<E>>(event: K, ...args: E[K]): boolean
  /** The listeners of `event`. */
  listeners<K extends TypedEventName<E>>(event: K): Array<TypedListener<E, K>>
  /** The listeners of `event`, once() wrappers included. */
  rawListeners<K extends TypedEventName<E>>(event: K): Array<TypedListener<E, K>>
  /** How many listeners `event` has. */
  listenerCount<K extends TypedEventName<E>>(event: K): number
  /** Removes every listener (of `event`, if given). */
  removeAllListeners(event?: TypedEventName<E>): this
  /** EventEmitter.setMaxListeners. */
  setMaxListeners(n: number): this
  /** The events that have listeners. */
  eventNames(): Array<TypedEventName<E>>
}

export type TypedEmitter<E extends EventMap<E>> = TypedEvents<E> & Omit<EventEmitter, keyof TypedEvents<E>>

/** `class X extends TypedEmitter<XEvents>`: Node's EventEmitter with typed events. */
export const TypedEmitter = EventEmitter as unknown as new <E extends EventMap<E>>() => TypedEmitter<E>
