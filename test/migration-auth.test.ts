// Who may migrate: the HMAC challenge-response over the shared secret (both ends prove it),
// what an unauthenticated peer sees (the protocol version and a random nonce, nothing about the
// memory), and TLS.
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as path from 'node:path'
import { hasFeature } from './helpers/kernel'
import { afterEach, describe, expect, it } from 'vitest'
import { Mapping } from '../src/core/mapping'
import { AuthError } from '../src/migration/auth'
import { MigrationSource } from '../src/migration/source'
import { MigrationTarget } from '../src/migration/target'
import { FrameConn, sourceHandshake, targetHandshake } from '../src/migration/transport'
import { encodeFrame, encodeHello, FrameParser, FrameType } from '../src/migration/wire'
import { killChildren } from './helpers/children'
import { fillRandom, SECRET, unmapAll, until } from './helpers/migration'
import { timeScale } from './helpers/children'

afterEach(() => killChildren())

const fixtures = path.join(__dirname, 'fixtures')

async function migrate(target: MigrationTarget, secret: string | undefined, extra: object = {}): Promise<unknown> {
  const memory = Mapping.anonymous(1 << 20)
  fillRandom(memory)
  const source = new MigrationSource({
    ranges: [memory],
    to: target.address,
    secret,
    insecure: secret === undefined,
    stop: () => {},
    verify: true,
    // Pre-copy rounds need write protection (arm64 before 6.10 has none): post-copy there.
    mode: hasFeature('PAGEFAULT_FLAG_WP') ? 'hybrid' : 'postcopy',
    ...extra,
  })
  try {
    return await source.start()
  } finally {
    source.close()
    memory.unmap()
  }
}

describe('authentication', () => {
  it('a source with the wrong secret fails with "authentication failed"; the target keeps listening and takes the right one', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const target = await MigrationTarget.listen({ secret: SECRET })
    const rejected: Error[] = []
    target.on('rejected', (e) => rejected.push(e))
    try {
      await expect(migrate(target, 'another-secret-of-enough-length')).rejects.toThrow(AuthError)
      await expect(migrate(target, 'another-secret-of-enough-length')).rejects.toThrow(/authentication failed/)
      expect(rejected.length).toBe(2)
      expect(rejected.every((e) => e instanceof AuthError)).toBe(true)
      expect(target.phase).toBe('listening')
      expect(target.mappings.length).toBe(0)
      const r = (await migrate(target, SECRET)) as { verified: boolean }
      expect(r.verified).toBe(true)
    } finally {
      target.close()
      unmapAll(target)
    }
  })

  it('a source without a secret is refused by a target that has one', { timeout: 30_000 * timeScale }, async () => {
    const target = await MigrationTarget.listen({ secret: SECRET })
    target.on('rejected', () => {})
    try {
      const env = process.env.USERFAULTFD_MIGRATE_SECRET
      delete process.env.USERFAULTFD_MIGRATE_SECRET
      try {
        await expect(migrate(target, undefined)).rejects.toThrow(/requires a shared secret/)
      } finally {
        if (env !== undefined) process.env.USERFAULTFD_MIGRATE_SECRET = env
      }
    } finally {
      target.close()
    }
  })

  it('a source never sends memory to a target that cannot prove the secret', {
    timeout: 30_000 * timeScale,
  }, async () => {
    // An impostor: speaks the protocol, has no secret (insecure), would accept anything.
    let setupSeen = false
    const server = net.createServer(async (socket) => {
      const conn = new FrameConn(socket)
      try {
        await targetHandshake(conn, null, 5000)
        setupSeen = true
      } catch {
        socket.destroy()
      }
    })
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    const port = (server.address() as net.AddressInfo).port
    const memory = Mapping.anonymous(65536)
    const source = new MigrationSource({
      ranges: [memory],
      to: { host: '127.0.0.1', port },
      secret: SECRET,
      stop: () => {},
    })
    try {
      await expect(source.start()).rejects.toThrow(/does not authenticate/)
      expect(setupSeen).toBe(false)
    } finally {
      source.close()
      server.close()
      memory.unmap()
    }
  })

  it('an unauthenticated peer learns only the protocol version and a nonce, and gets nothing', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const target = await MigrationTarget.listen({ secret: SECRET })
    target.on('rejected', () => {})
    try {
      const socket = net.connect(target.address.port, target.address.host)
      await new Promise((r) => socket.once('connect', r))
      const received: Buffer[] = []
      socket.on('data', (d) => received.push(d))
      socket.write(
        encodeFrame(FrameType.HELLO, encodeHello({ versionMin: 1, versionMax: 1, channel: 'main', auth: true })),
      )
      await until(() => Buffer.concat(received).length >= 64, 5000, 'the challenge')
      socket.write(encodeFrame(FrameType.AUTH, Buffer.alloc(64, 0x5a)))
      await new Promise((r) => socket.once('close', r))
      const parser = new FrameParser()
      parser.push(Buffer.concat(received))
      const frames = []
      for (let f = parser.next(); f !== undefined; f = parser.next()) frames.push(f)
      expect(frames.map((f) => f.type)).toEqual([FrameType.CHALLENGE, FrameType.REJECT])
      expect(frames[0].payload.subarray(0, 8).toString('latin1')).toBe('uffd-mig')
      expect(JSON.parse(frames[1].payload.toString())).toEqual({ code: 'EAUTH', message: 'authentication failed' })
      expect(parser.rest().length).toBe(0)
      expect(target.phase).toBe('listening')
    } finally {
      target.close()
    }
  })

  it('--insecure on both ends: no authentication at all', { timeout: 30_000 * timeScale }, async () => {
    const env = process.env.USERFAULTFD_MIGRATE_SECRET
    delete process.env.USERFAULTFD_MIGRATE_SECRET
    try {
      const target = await MigrationTarget.listen({ insecure: true })
      try {
        const r = (await migrate(target, undefined)) as { verified: boolean }
        expect(r.verified).toBe(true)
      } finally {
        target.close()
        unmapAll(target)
      }
    } finally {
      if (env !== undefined) process.env.USERFAULTFD_MIGRATE_SECRET = env
    }
  })

  it('a handshake checks the proof against the TLS session (channel binding) and the version', async () => {
    // sourceHandshake against a target speaking another version: a clear error.
    const server = net.createServer((socket) => {
      const conn = new FrameConn(socket)
      conn
        .expect([FrameType.HELLO], 5000)
        .then(() =>
          socket.write(
            encodeFrame(FrameType.REJECT, Buffer.from('{"code":"EVERSION","message":"version 1 is not in 2..2"}')),
          ),
        )
        .catch(() => socket.destroy())
    })
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    const socket = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1')
    await new Promise((r) => socket.once('connect', r))
    await expect(
      sourceHandshake(new FrameConn(socket), {
        secret: Buffer.from(SECRET),
        channel: 'main',
        timeoutMs: 5000,
        setup: { session: '0'.repeat(32), resume: false, mode: 'hybrid', ranges: [], verify: false, metadata: null },
      }),
    ).rejects.toThrow(/version 1 is not in 2..2/)
    socket.destroy()
    server.close()
  })
})

describe('TLS', () => {
  it('a migration over TLS (node:tls), authenticated inside it, verified page by page', {
    timeout: 30_000 * timeScale,
  }, async () => {
    const tls = {
      key: fs.readFileSync(path.join(fixtures, 'migration-tls.key')),
      cert: fs.readFileSync(path.join(fixtures, 'migration-tls.crt')),
    }
    const target = await MigrationTarget.listen({ secret: SECRET, tls })
    try {
      const r = (await migrate(target, SECRET, {
        tls: { ca: tls.cert, servername: undefined, checkServerIdentity: () => undefined },
      })) as {
        verified: boolean
      }
      expect(r.verified).toBe(true)
    } finally {
      target.close()
      unmapAll(target)
    }
    // A TLS target and a plain source do not get along: a clear failure, not a hang.
    const t2 = await MigrationTarget.listen({ secret: SECRET, tls, handshakeTimeoutMs: 1000 })
    t2.on('rejected', () => {})
    try {
      await expect(migrate(t2, SECRET, { connectTimeoutMs: 2000 })).rejects.toThrow()
    } finally {
      t2.close()
    }
  })

  it('post-copy over TLS with a workload on the target', { timeout: 30_000 * timeScale }, async () => {
    const { migrateHere } = await import('./helpers/migration')
    const tls = {
      key: fs.readFileSync(path.join(fixtures, 'migration-tls.key')),
      cert: fs.readFileSync(path.join(fixtures, 'migration-tls.crt')),
    }
    const r = await migrateHere({
      mode: 'postcopy',
      kind: 'anonymous',
      size: 4 << 20,
      dirtyRate: 4 << 20,
      target: { tls },
      source: { tls: { ca: tls.cert, checkServerIdentity: () => undefined } },
    })
    expect(r.mismatches).toBe(0)
    expect(r.lostStamps).toBe(0)
    expect(r.target.duplicatePages).toBe(0)
  })
})
