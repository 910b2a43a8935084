// A Userfaultfd over a Unix socket: the fd travels with a small payload, the receiver adopts it
// (O_NONBLOCK + close-on-exec) and learns the sender's credentials.
import { uffdError } from '../core/errors'
import { Userfaultfd, isUserfaultfd } from '../core/userfaultfd'
import { FdChannel, closeFds, type PeerCredentials, type SocketLike } from './fd-passing'

/** Sends `uffd` with `payload` (default: its features and ioctls as JSON, which receiveUffd reads). */
export async function sendUffd(
  socket: SocketLike,
  uffd: Userfaultfd,
  payload?: string | ArrayBufferView,
  options: { signal?: AbortSignal } = {},
): Promise<void> {
  const body = payload ?? JSON.stringify({ features: uffd.features.toString(), ioctls: uffd.ioctls.toString() })
  const channel = new FdChannel(socket)
  try {
    await channel.send(body, [uffd.fd], options)
  } finally {
    channel.close()
  }
}

/** What receiveUffd() resolves with. */
export interface ReceivedUffd {
  /** The uffd received, adopted (yours to close). */
  uffd: Userfaultfd
  /** the payload that came with it */
  data: Buffer
  /** Who sent it (SO_PEERCRED: what the kernel recorded, not what the peer says). */
  peer: PeerCredentials
}

/**
 * Receives exactly one fd and adopts it as a Userfaultfd. If the payload is the JSON that
 * sendUffd writes by default, the uffd knows its features and ioctls. The fd is checked to be a
 * userfaultfd (else EPROTO, and it is closed).
 */
export async function receiveUffd(
  socket: SocketLike,
  options: { maxBytes?: number; signal?: AbortSignal } = {},
): Promise<ReceivedUffd> {
  const channel = new FdChannel(socket)
  try {
    const msg = await channel.receive({ ...options, maxFds: 1, minFds: 1 })
    const fd = msg.fds[0]
    try {
      const peer = channel.peer()
      if (!isUserfaultfd(fd)) throw uffdError('EPROTO', 'recvmsg', 'the fd received is not a userfaultfd')
      let features = 0n
      let ioctls = 0n
      try {
        const meta = JSON.parse(msg.data.toString('utf8')) as { features?: unknown; ioctls?: unknown }
        if (typeof meta?.features === 'string') features = BigInt(meta.features)
        if (typeof meta?.ioctls === 'string') ioctls = BigInt(meta.ioctls)
      } catch {
        /* a payload of the caller's own */
      }
      return { uffd: Userfaultfd.fromFd(fd, { features, ioctls }), data: msg.data, peer }
    } catch (err) {
      closeFds([fd])
      throw err
    }
  } finally {
    channel.close()
  }
}

/** True if `fd` is a userfaultfd (its /proc link is anon_inode:[userfaultfd]). */
export { isUserfaultfd } from '../core/userfaultfd'
