// Who may take part in a migration: both ends hold a shared secret and prove it to each other
// with an HMAC-SHA256 challenge-response, on every connection, before anything about the memory
// is said (docs/migration.md, "Trust model").
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import * as fs from 'node:fs'
import { describe } from '../util/validate'
import type { ChannelKind } from './wire'
import { MAC_SIZE, NONCE_SIZE } from './wire'

export const SECRET_ENV = 'USERFAULTFD_MIGRATE_SECRET'

/** Thrown when a peer fails to prove the shared secret (or refuses ours). */
export class AuthError extends Error {
  readonly code = 'EAUTH'
  constructor(message: string) {
    super(message)
    this.name = 'AuthError'
  }
}

export interface SecretOptions {
  /** the shared secret (at least 16 bytes); default: the USERFAULTFD_MIGRATE_SECRET environment variable */
  secret?: string | Uint8Array
  /** a file holding the secret (its trailing newline is dropped) */
  secretFile?: string
  /** allow running without a secret: no authentication at all (trusted networks and tests only) */
  insecure?: boolean
}

const MIN_SECRET = 16

/** The secret to use, or null with { insecure: true } and no secret. Throws when there is none. */
export function resolveSecret(options: SecretOptions): Buffer | null {
  const { secret, secretFile, insecure } = options
  if (insecure !== undefined && typeof insecure !== 'boolean')
    throw new TypeError(`insecure must be a boolean (got ${describe(insecure)})`)
  let value: Buffer | undefined
  if (secret !== undefined) {
    if (typeof secret === 'string') value = Buffer.from(secret, 'utf8')
    else if (secret instanceof Uint8Array) value = Buffer.from(secret)
    else throw new TypeError(`secret must be a string or a Uint8Array (got ${describe(secret)})`)
  } else if (secretFile !== undefined) {
    if (typeof secretFile !== 'string') throw new TypeError(`secretFile must be a path (got ${describe(secretFile)})`)
    value = Buffer.from(fs.readFileSync(secretFile, 'utf8').replace(/\r?\n$/, ''), 'utf8')
  } else if (process.env[SECRET_ENV]) {
    value = Buffer.from(process.env[SECRET_ENV] as string, 'utf8')
  }
  if (value === undefined) {
    if (insecure === true) return null
    throw new TypeError(
      `a shared secret is required: pass { secret }, or set ${SECRET_ENV}, or { insecure: true } to migrate without authentication`,
    )
  }
  if (value.length < MIN_SECRET)
    throw new RangeError(`the secret must be at least ${MIN_SECRET} bytes (got ${value.length})`)
  return value
}

export function nonce(): Buffer {
  return randomBytes(NONCE_SIZE)
}

/**
 * HMAC-SHA256(secret, label | version | channel | first nonce | second nonce | binding). Each side
 * proves with its own label and the nonces in its own order, so that neither proof can be replayed
 * as the other; `binding` (TLS keying material, where TLS is used) ties the proof to this TLS
 * session, so that a man in the middle cannot relay it.
 */
export function proof(
  secret: Buffer,
  role: 'source' | 'target',
  version: number,
  channel: ChannelKind,
  first: Buffer,
  second: Buffer,
  binding: Buffer = Buffer.alloc(0),
): Buffer {
  const head = Buffer.alloc(4)
  head.writeUInt16LE(version, 0)
  head.writeUInt8(channel === 'main' ? 0 : 1, 2)
  return createHmac('sha256', secret)
    .update(`userfaultfd-migrate ${role}`)
    .update(head)
    .update(first)
    .update(second)
    .update(binding)
    .digest()
}

export function sameMac(a: Buffer, b: Buffer): boolean {
  return a.length === MAC_SIZE && b.length === MAC_SIZE && timingSafeEqual(a, b)
}
