// Fd passing over Unix sockets: SCM_RIGHTS with payloads, close-on-exec on arrival, MSG_CTRUNC
// and extra fds closed (nothing leaks), peer credentials, net.Socket and raw socketpairs.
import { afterEach, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import {
  FdChannel,
  Mapping,
  Userfaultfd,
  fdFlags,
  peerCredentials,
  receiveFds,
  receiveUffd,
  sendFds,
  sendUffd,
  socketPair,
} from '../src'
import { native } from '../src/addon/native'
import { timeScale } from './helpers/children'

const openFds = (): number => fs.readdirSync('/proc/self/fd').length
const cleanup: Array<() => void> = []
afterEach(() => {
  for (const f of cleanup.splice(0).reverse()) {
    try {
      f()
    } catch {
      /* already closed */
    }
  }
})

function pair(type: 'stream' | 'seqpacket' | 'dgram' = 'stream'): [number, number] {
  const [a, b] = socketPair(type)
  cleanup.push(
    () => native.close(a),
    () => native.close(b),
  )
  return [a, b]
}

function memfdWith(text: string): Mapping {
  const m = Mapping.memfd(4096, { name: 'fd-passing-test' })
  m.write(0, Buffer.from(text))
  cleanup.push(() => m.unmap())
  return m
}

function readFdText(fd: number, length: number): string {
  const buf = Buffer.alloc(length)
  fs.readSync(fd, buf, 0, length, 0)
  return buf.toString()
}

describe('fd passing over a socketpair', () => {
  it('sends a memfd with a payload; the received fd is a new, close-on-exec fd on the same file', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    const m = memfdWith('hello through SCM_RIGHTS')
    await sendFds(a, 'payload-1', [m.fd])
    const msg = await receiveFds(b)
    cleanup.push(() => {
      for (const fd of msg.fds) native.close(fd)
    })
    expect(msg.data.toString()).toBe('payload-1')
    expect(msg.fds).toHaveLength(1)
    expect(msg.fds[0]).not.toBe(m.fd)
    expect(fdFlags(msg.fds[0]).cloexec).toBe(true)
    expect(readFdText(msg.fds[0], 24)).toBe('hello through SCM_RIGHTS')
    expect(msg.peer).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() })
  })

  it('waits on the event loop for data that arrives later (no busy wait)', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    // Longer where everything runs slower (emulation): the process's own background work grows too.
    const waitMs = 200 * timeScale
    const started = process.cpuUsage()
    const pending = receiveFds(b, { maxFds: 0 })
    await new Promise((r) => setTimeout(r, waitMs))
    await sendFds(a, 'late', [])
    const msg = await pending
    const used = process.cpuUsage(started)
    expect(msg.data.toString()).toBe('late')
    // The wait must not have burned the CPU time it lasted (a busy wait would burn all of it).
    expect(used.user + used.system).toBeLessThan(waitMs * 750)
  })

  it('MSG_CTRUNC: more fds than the control buffer holds is an error, and every fd that arrived is closed', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    const m = memfdWith('x')
    const before = openFds()
    await sendFds(a, 'five', [m.fd, m.fd, m.fd, m.fd, m.fd])
    await expect(receiveFds(b, { maxFds: 1 })).rejects.toMatchObject({
      code: 'EPROTO',
      syscall: 'recvmsg',
      message: expect.stringMatching(/MSG_CTRUNC/),
    })
    expect(openFds()).toBe(before)
  })

  it('extra fds that fit the rounded-up control buffer are an error too, and are closed', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    const m = memfdWith('x')
    const before = openFds()
    // CMSG_SPACE(4) is 24 bytes on 64-bit: room for two fds although one was asked for.
    await sendFds(a, 'two', [m.fd, m.fd])
    await expect(receiveFds(b, { maxFds: 1 })).rejects.toMatchObject({
      code: 'EPROTO',
      message: expect.stringMatching(/2 fds, at most 1/),
    })
    expect(openFds()).toBe(before)
  })

  it('an fd where none is expected is closed and reported', { timeout: 10_000 * timeScale }, async () => {
    const [a, b] = pair()
    const m = memfdWith('x')
    const before = openFds()
    await sendFds(a, 'sneaky', [m.fd])
    await expect(receiveFds(b, { maxFds: 0 })).rejects.toMatchObject({ code: 'EPROTO' })
    expect(openFds()).toBe(before)
  })

  it('a missing fd fails with minFds, a too-large message with EMSGSIZE (its fds closed)', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair('seqpacket')
    const m = memfdWith('x')
    const before = openFds()
    await sendFds(a, 'no fd', [])
    await expect(receiveFds(b, { minFds: 1 })).rejects.toMatchObject({
      code: 'EPROTO',
      message: expect.stringMatching(/expected an fd/),
    })
    await sendFds(a, Buffer.alloc(5000, 0x41), [m.fd])
    await expect(receiveFds(b, { maxBytes: 4096 })).rejects.toMatchObject({ code: 'EMSGSIZE' })
    expect(openFds()).toBe(before)
  })

  it('end of stream: end is true; with minFds it is an error', { timeout: 10_000 * timeScale }, async () => {
    const [a, b] = socketPair()
    cleanup.push(() => native.close(b))
    native.close(a)
    const msg = await receiveFds(b, { maxFds: 0 })
    expect(msg.end).toBe(true)
    await expect(receiveFds(b, { minFds: 1 })).rejects.toMatchObject({
      code: 'EPROTO',
      message: expect.stringMatching(/closed the connection/),
    })
  })

  it('send to a closed peer is EPIPE, not SIGPIPE', { timeout: 10_000 * timeScale }, async () => {
    const [a, b] = socketPair()
    cleanup.push(() => native.close(a))
    native.close(b)
    await expect(sendFds(a, 'x', [])).rejects.toMatchObject({ code: 'EPIPE', syscall: 'sendmsg' })
  })

  it('an AbortSignal ends a pending receive; a closed channel rejects', { timeout: 10_000 * timeScale }, async () => {
    const [, b] = pair()
    const ac = new AbortController()
    const pending = receiveFds(b, { signal: ac.signal })
    setTimeout(() => ac.abort(), 20)
    await expect(pending).rejects.toMatchObject({ name: 'AbortError' })
    const channel = new FdChannel(b)
    const p2 = channel.receive()
    channel.close()
    await expect(p2).rejects.toMatchObject({ code: 'EBADF' })
  })

  it('rejects bad arguments with TypeError/RangeError', async () => {
    const [a] = pair()
    expect(() => new FdChannel(-1 as number)).toThrow(TypeError)
    expect(() => new FdChannel({} as net.Socket)).toThrow(TypeError)
    await expect(sendFds(a, 'x', Array(300).fill(0))).rejects.toThrow(RangeError)
    await expect(sendFds(a, '', [0])).rejects.toThrow(RangeError)
    await expect(receiveFds(a, { maxFds: 999 })).rejects.toThrow(RangeError)
  })

  it('a long payload on a stream socket is sent completely (short sends continued)', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    const m = memfdWith('big')
    const big = Buffer.alloc(4 << 20, 0x5a)
    const sending = sendFds(a, big, [m.fd])
    let got = 0
    let fds: number[] = []
    const channel = new FdChannel(b)
    cleanup.push(() => channel.close())
    while (got < big.length) {
      const msg = await channel.receive({ maxBytes: 1 << 20, maxFds: 1 })
      fds = fds.concat(msg.fds)
      got += msg.data.length
    }
    await sending
    cleanup.push(() => {
      for (const fd of fds) native.close(fd)
    })
    expect(got).toBe(big.length)
    expect(fds).toHaveLength(1)
  })
})

describe('uffd passing over net sockets', () => {
  it('a uffd sent by a net client arrives at a pauseOnConnect server, with features and peer credentials', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-pass-'))
    cleanup.push(() => fs.rmSync(dir, { recursive: true, force: true }))
    const sock = path.join(dir, 's')
    const received = new Promise<Awaited<ReturnType<typeof receiveUffd>>>((resolve, reject) => {
      const server = net.createServer({ pauseOnConnect: true }, (s) => {
        receiveUffd(s)
          .then(resolve, reject)
          .finally(() => {
            s.destroy()
            server.close()
          })
      })
      server.listen(sock)
    })
    const uffd = Userfaultfd.open()
    cleanup.push(() => uffd.close())
    const client = net.connect(sock)
    client.pause()
    await new Promise((r) => client.once('connect', r))
    expect(peerCredentials(client).pid).toBe(process.pid)
    await sendUffd(client, uffd)
    const got = await received
    cleanup.push(() => got.uffd.close())
    client.destroy()
    expect(got.uffd.fd).not.toBe(uffd.fd)
    expect(got.uffd.features).toBe(uffd.features)
    expect(got.uffd.ioctls).toBe(uffd.ioctls)
    expect(fdFlags(got.uffd.fd)).toEqual({ cloexec: true, nonblock: true })
    expect(got.peer.uid).toBe(process.getuid!())
    // The received fd is the same uffd: a range registered through one is known to the other.
    const m = Mapping.anonymous(4096)
    cleanup.push(() => m.unmap())
    got.uffd.register(m)
    expect(() => uffd.register(m)).not.toThrow() // same context: re-registering is allowed
  })

  it('receiveUffd rejects an fd that is not a userfaultfd, and closes it', {
    timeout: 10_000 * timeScale,
  }, async () => {
    const [a, b] = pair()
    const m = memfdWith('not a uffd')
    const before = openFds()
    await sendFds(a, '{}', [m.fd])
    await expect(receiveUffd(b)).rejects.toMatchObject({
      code: 'EPROTO',
      message: expect.stringMatching(/not a userfaultfd/),
    })
    expect(openFds()).toBe(before)
  })
})
