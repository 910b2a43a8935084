// Decoding uffd_msg records (32 bytes each, packed, little-endian on x86_64 and arm64).
import { EventType, PagefaultFlag, UFFD_MSG_SIZE } from './constants'

export interface PagefaultMessage {
  type: 'pagefault'
  address: bigint
  /** the raw UFFD_PAGEFAULT_FLAG_* bits */
  flags: bigint
  write: boolean
  wp: boolean
  minor: boolean
  /** the faulting thread's id (with Feature.THREAD_ID) */
  tid?: number
}
export interface ForkMessage {
  type: 'fork'
  fd: number
}
export interface RemapMessage {
  type: 'remap'
  from: bigint
  to: bigint
  length: number
}
export interface RemoveMessage {
  type: 'remove'
  start: bigint
  end: bigint
}
export interface UnmapMessage {
  type: 'unmap'
  start: bigint
  end: bigint
}
export interface UnknownMessage {
  type: 'unknown'
  event: number
}
export type UffdMessage = PagefaultMessage | ForkMessage | RemapMessage | RemoveMessage | UnmapMessage | UnknownMessage

const { WRITE, WP, MINOR } = PagefaultFlag

/** Decodes `count` messages from `view` (one read's worth). */
export function decodeMessages(view: DataView, count: number, threadId: boolean): UffdMessage[] {
  const out: UffdMessage[] = new Array(count)
  for (let i = 0; i < count; i++) out[i] = decodeMessage(view, i * UFFD_MSG_SIZE, threadId)
  return out
}

export function decodeMessage(view: DataView, at: number, threadId: boolean): UffdMessage {
  const event = view.getUint8(at)
  switch (event) {
    case EventType.PAGEFAULT: {
      const flags = view.getBigUint64(at + 8, true)
      const msg: PagefaultMessage = {
        type: 'pagefault',
        address: view.getBigUint64(at + 16, true),
        flags,
        write: (flags & WRITE) !== 0n,
        wp: (flags & WP) !== 0n,
        minor: (flags & MINOR) !== 0n,
      }
      if (threadId) msg.tid = view.getUint32(at + 24, true)
      return msg
    }
    case EventType.FORK:
      return { type: 'fork', fd: view.getUint32(at + 8, true) }
    case EventType.REMAP:
      return {
        type: 'remap',
        from: view.getBigUint64(at + 8, true),
        to: view.getBigUint64(at + 16, true),
        length: Number(view.getBigUint64(at + 24, true)),
      }
    case EventType.REMOVE:
    case EventType.UNMAP:
      return {
        type: event === EventType.REMOVE ? 'remove' : 'unmap',
        start: view.getBigUint64(at + 8, true),
        end: view.getBigUint64(at + 16, true),
      }
    default:
      return { type: 'unknown', event }
  }
}
