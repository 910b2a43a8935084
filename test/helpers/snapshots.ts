// Snapshot files for the remote-source tests: random pages whose first u64 is the page's index
// + 1, so a wrong or misplaced page is seen at once.
import * as crypto from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { PAGE_SIZE } from '../../src/index'
import { tempDir } from './servers'

/** A snapshot file of random pages, each page's first u64 its index + 1. */
export function snapshot(size: number): { file: string; bytes: Buffer; dir: string } {
  const dir = tempDir()
  const bytes = crypto.randomBytes(size)
  for (let p = 0; p * PAGE_SIZE < size; p++) bytes.writeBigUInt64LE(BigInt(p + 1), p * PAGE_SIZE)
  const file = path.join(dir, 'snap.mem')
  fs.writeFileSync(file, bytes)
  return { file, bytes, dir }
}
