// A small NBD server for tests of what real servers never do: it speaks the fixed newstyle
// handshake (OPT_STRUCTURED_REPLY refused, OPT_GO answered), then answers NBD_CMD_READ with simple
// replies from `bytes`, unless `answer` says otherwise for that read (an error, a malformed reply,
// a dropped connection). Listens on a Unix socket.
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as path from 'node:path'
import { tempDir } from './servers'

const NBDMAGIC = 0x4e42444d41474943n
const IHAVEOPT = 0x49484156454f5054n
const REPLY_MAGIC = 0x3e889045565a9n
const OPT_GO = 7
const REP_ACK = 1
const REP_INFO = 3
const REP_ERR_UNSUP = 0x80000001

export interface FakeRead {
  /** connection number (in accept order, from 0) and this connection's read number (from 0) */
  conn: number
  /** whether the connection asked for structured replies (the JS client's do) */
  structured: boolean
  /**
   * A read of the native client (native/engine/nbd_prefetch.cc: its cookies carry the top bit),
   * on a connection of its own or one it borrowed from the JS client; nativeIndex counts the
   * native reads on this connection (-1 for the JS client's).
   */
  native: boolean
  nativeIndex: number
  index: number
  offset: number
  length: number
}

/** What to send for a read: its bytes, an NBD error, or something malformed. */
export type FakeAnswer =
  | 'data'
  | { error: number }
  | 'bad-magic'
  | 'unknown-cookie'
  | 'structured'
  | 'close'
  | 'silence'

export interface FakeNbd {
  url: string
  reads: FakeRead[]
  /** per connection: whether it asked for structured replies (the JS client's do; native ones do not) */
  structured: boolean[]
  connections: number
  close(): Promise<void>
}

/**
 * `structured`: accept NBD_OPT_STRUCTURED_REPLY; reads on such connections are then answered in
 * chunks: an all-zero read as one hole, else its data in two chunks (halves) when it has two pages.
 * `greetLaterMs`: every connection but the first waits this long for the server's greeting.
 */
export async function startFakeNbd(
  bytes: Buffer,
  answer: (r: FakeRead) => FakeAnswer = () => 'data',
  options: { structured?: boolean; greetLaterMs?: number } = {},
): Promise<FakeNbd> {
  const dir = tempDir('uffd-fakenbd-')
  const sock = path.join(dir, 'nbd.sock')
  const reads: FakeRead[] = []
  const structured: boolean[] = []
  const sockets = new Set<net.Socket>()
  let connections = 0
  const server = net.createServer((s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
    s.on('error', () => undefined)
    serve(s, connections++)
  })
  await new Promise<void>((resolve) => server.listen(sock, resolve))

  function serve(s: net.Socket, conn: number): void {
    let buf = Buffer.alloc(0)
    let stage: 'flags' | 'options' | 'requests' = 'flags'
    let index = 0
    let nativeIndex = 0
    structured[conn] = false
    const greeting = Buffer.alloc(18)
    greeting.writeBigUInt64BE(NBDMAGIC, 0)
    greeting.writeBigUInt64BE(IHAVEOPT, 8)
    greeting.writeUInt16BE(3, 16) // FIXED_NEWSTYLE | NO_ZEROES
    if (conn > 0 && options.greetLaterMs) setTimeout(() => s.write(greeting), options.greetLaterMs)
    else s.write(greeting)
    const optReply = (option: number, type: number, data: Buffer): void => {
      const h = Buffer.alloc(20)
      h.writeBigUInt64BE(REPLY_MAGIC, 0)
      h.writeUInt32BE(option, 8)
      h.writeUInt32BE(type, 12)
      h.writeUInt32BE(data.length, 16)
      s.write(Buffer.concat([h, data]))
    }
    s.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      for (;;) {
        if (stage === 'flags') {
          if (buf.length < 4) return
          buf = buf.subarray(4)
          stage = 'options'
        } else if (stage === 'options') {
          if (buf.length < 16) return
          const option = buf.readUInt32BE(8)
          const length = buf.readUInt32BE(12)
          if (buf.length < 16 + length) return
          buf = buf.subarray(16 + length)
          if (option === 8) {
            structured[conn] = true // asked
            if (options.structured) {
              optReply(option, REP_ACK, Buffer.alloc(0))
              continue
            }
          }
          if (option !== OPT_GO) {
            optReply(option, REP_ERR_UNSUP, Buffer.alloc(0))
            continue
          }
          const info = Buffer.alloc(12)
          info.writeUInt16BE(0, 0) // NBD_INFO_EXPORT
          info.writeBigUInt64BE(BigInt(bytes.length), 2)
          info.writeUInt16BE(1, 10) // HAS_FLAGS
          optReply(option, REP_INFO, info)
          optReply(option, REP_ACK, Buffer.alloc(0))
          stage = 'requests'
        } else {
          if (buf.length < 28) return
          const type = buf.readUInt16BE(6)
          const cookie = buf.subarray(8, 16)
          const offset = Number(buf.readBigUInt64BE(16))
          const length = buf.readUInt32BE(24)
          buf = buf.subarray(28)
          if (type !== 0) {
            s.end()
            return
          }
          const native = (cookie[0] & 0x80) !== 0
          const r = {
            conn,
            structured: structured[conn],
            native,
            nativeIndex: native ? nativeIndex++ : -1,
            index: index++,
            offset,
            length,
          }
          reads.push(r)
          reply(s, r, cookie, answer(r), options.structured === true && structured[conn])
        }
      }
    })
  }

  function chunk(cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer {
    const c = Buffer.alloc(20)
    c.writeUInt32BE(0x668e33ef, 0)
    c.writeUInt16BE(flags, 4)
    c.writeUInt16BE(type, 6)
    cookie.copy(c, 8)
    c.writeUInt32BE(payload.length, 16)
    return Buffer.concat([c, payload])
  }

  function reply(s: net.Socket, r: FakeRead, cookie: Buffer, a: FakeAnswer, chunked: boolean): void {
    if (chunked && a === 'data') {
      const data = bytes.subarray(r.offset, r.offset + r.length)
      const at = (off: number): Buffer => {
        const b = Buffer.alloc(8)
        b.writeBigUInt64BE(BigInt(off))
        return b
      }
      if (data.every((x) => x === 0)) {
        const hole = Buffer.alloc(12)
        hole.writeBigUInt64BE(BigInt(r.offset), 0)
        hole.writeUInt32BE(r.length, 8)
        s.write(chunk(cookie, 1, 2, hole))
      } else if (r.length >= 8192) {
        const half = r.length / 2
        s.write(chunk(cookie, 0, 1, Buffer.concat([at(r.offset), data.subarray(0, half)])))
        s.write(chunk(cookie, 1, 1, Buffer.concat([at(r.offset + half), data.subarray(half)])))
      } else {
        s.write(chunk(cookie, 1, 1, Buffer.concat([at(r.offset), data])))
      }
      return
    }
    const h = Buffer.alloc(16)
    h.writeUInt32BE(0x67446698, 0)
    cookie.copy(h, 8)
    if (a === 'close') {
      s.destroy()
      return
    }
    if (a === 'silence') return
    if (a === 'bad-magic') h.writeUInt32BE(0x12345678, 0)
    if (a === 'unknown-cookie') h.writeBigUInt64BE(0xfffffffffn, 8)
    if (a === 'structured') {
      const c = Buffer.alloc(20)
      c.writeUInt32BE(0x668e33ef, 0)
      c.writeUInt16BE(1, 4) // DONE
      cookie.copy(c, 8)
      s.write(c)
      return
    }
    if (typeof a === 'object') {
      h.writeUInt32BE(a.error, 4)
      s.write(h)
      return
    }
    s.write(Buffer.concat([h, bytes.subarray(r.offset, r.offset + r.length)]))
  }

  return {
    url: `nbd+unix:///snap?socket=${sock}`,
    reads,
    structured,
    get connections() {
      return connections
    },
    async close() {
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      fs.rmSync(dir, { recursive: true, force: true })
    },
  }
}
