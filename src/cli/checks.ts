// Up-front checks of CLI inputs that the kernel would otherwise refuse late, obscurely, or not
// at all (a socket path past sun_path is silently truncated by bind(2)'s callers).
import * as fs from 'node:fs'
import * as path from 'node:path'
import { memFileProblem } from '../firecracker/mem-file'
import { isListening } from '../ipc/unix-socket'
import { UsageError } from './command'

/** sun_path is 108 bytes on Linux, and holds the path with its terminating NUL. */
export const SOCKET_PATH_MAX = 107

/** A path a Unix socket can be bound at: short enough, in an existing directory we may write to. */
export function checkSocketPath(value: string, flag: string): void {
  const bytes = Buffer.byteLength(value)
  if (value.includes('\0')) throw new UsageError(`${flag} must not contain a NUL byte`)
  if (bytes > SOCKET_PATH_MAX)
    throw new UsageError(
      `${flag} is ${bytes} bytes long; a Unix socket path holds at most ${SOCKET_PATH_MAX} (sun_path is 108 bytes with its final NUL): use a shorter path (a relative path counts as written)`,
    )
  const dir = path.dirname(path.resolve(value))
  let stat: fs.Stats
  try {
    stat = fs.statSync(dir)
  } catch {
    throw new UsageError(`${flag}: the directory ${dir} does not exist (create it first)`)
  }
  if (!stat.isDirectory()) throw new UsageError(`${flag}: ${dir} is not a directory`)
  // Before the directory's permissions: whoever may write there, an existing file is not ours
  // to replace (and a read-only /etc says EROFS, which would hide that).
  let existing: fs.Stats | undefined
  try {
    existing = fs.lstatSync(value)
  } catch {
    /* absent: fine */
  }
  if (existing !== undefined && !existing.isSocket())
    throw new UsageError(`${flag}: ${value} exists and is not a socket (refusing to replace it)`)
  try {
    fs.accessSync(dir, fs.constants.W_OK | fs.constants.X_OK)
  } catch (err) {
    throw new UsageError(
      `${flag}: cannot create a socket in ${dir} (${(err as NodeJS.ErrnoException).code}: this user may not write there)`,
    )
  }
}

/**
 * Refuses a socket another process is serving (a second `serve` would take it over or fail
 * late). A socket file nobody listens on is stale: the handler replaces it.
 */
export async function checkSocketFree(socketPath: string, flag: string): Promise<'absent' | 'stale'> {
  if (!fs.existsSync(socketPath)) return 'absent'
  if (await isListening(socketPath))
    throw new Error(
      `${flag} ${socketPath}: another handler is serving this socket (a connection to it succeeded); stop it first or choose another path`,
    )
  return 'stale'
}

/** MemAvailable from /proc/meminfo, in bytes (undefined when unreadable). */
export function memAvailable(): number | undefined {
  try {
    const m = /^MemAvailable:\s+(\d+) kB/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'))
    return m ? Number(m[1]) * 1024 : undefined
  } catch {
    return undefined
  }
}

/** Bytes free to this user on the file system holding `dir` (undefined when unknown). */
export function diskAvailable(dir: string): number | undefined {
  try {
    const s = fs.statfsSync(dir)
    return s.bavail * s.bsize
  } catch {
    return undefined
  }
}

/** A file this user can read (what it must be besides, the command checks itself). */
export function checkReadableFile(value: string, flag: string): void {
  try {
    fs.accessSync(value, fs.constants.R_OK)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new UsageError(
      `${flag} ${value}: ${code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'this user may not read it' : code}`,
    )
  }
}

/** A file this user can create or overwrite: its directory exists and is writable, it is no directory. */
export function checkWritableFile(value: string, flag: string): void {
  if (value.includes('\0')) throw new UsageError(`${flag} must not contain a NUL byte`)
  const dir = path.dirname(path.resolve(value))
  if (!fs.existsSync(dir)) throw new UsageError(`${flag}: the directory ${dir} does not exist (create it first)`)
  const existing = fs.statSync(value, { throwIfNoEntry: false })
  if (existing !== undefined && !existing.isFile())
    throw new UsageError(`${flag} ${value}: exists and is not a regular file (refusing to overwrite it)`)
  try {
    fs.accessSync(existing === undefined ? dir : value, fs.constants.W_OK)
  } catch (err) {
    throw new UsageError(`${flag} ${value}: this user may not write it (${(err as NodeJS.ErrnoException).code})`)
  }
}

/**
 * A memory file `serve` can use: readable, and a regular file or a block device. Anything else
 * is refused here: a FIFO would block open(2) until some writer appeared (forever, usually).
 */
export function checkMemFile(value: string, flag: string): void {
  checkReadableFile(value, flag)
  const problem = memFileProblem(value, fs.statSync(value))
  if (problem !== undefined) throw new UsageError(`${flag}: ${problem}`)
}
