// The memory snapshot file a handler serves from: only a regular file or a block device will do.
// Opened non-blocking, so that a FIFO given by mistake is refused at once instead of blocking the
// thread forever in open(2) waiting for a writer (regular files and block devices ignore
// O_NONBLOCK).
import * as fs from 'node:fs'

/** What a stat says the path is, for error messages: 'a FIFO (named pipe)', 'a directory'... */
export function fileTypeOf(stat: fs.Stats): string {
  if (stat.isFile()) return 'a regular file'
  if (stat.isBlockDevice()) return 'a block device'
  if (stat.isFIFO()) return 'a FIFO (named pipe)'
  if (stat.isDirectory()) return 'a directory'
  if (stat.isCharacterDevice()) return 'a character device'
  if (stat.isSocket()) return 'a socket'
  return 'not a file'
}

/** Why `stat` cannot be a memory file, or undefined if it can. */
export function memFileProblem(path: string, stat: fs.Stats): string | undefined {
  if (stat.isFile() || stat.isBlockDevice()) return undefined
  return `memory file ${path} is ${fileTypeOf(stat)}: it must be a regular file or a block device`
}

// A block device's stat size is 0: its size is in /sys/dev/block/MAJOR:MINOR/size (512-byte
// sectors). rdev is glibc's dev_t encoding.
function blockDeviceSize(rdev: number): number {
  const dev = BigInt(rdev)
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn)
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn)
  const sectors = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim()
  return Number(sectors) * 512
}

/** Opens `path` read-only (close-on-exec) after checking what it is; returns the fd and size. */
export function openMemFile(path: string): { fd: number; size: number } {
  const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK)
  try {
    const stat = fs.fstatSync(fd)
    const problem = memFileProblem(path, stat)
    if (problem !== undefined) throw new TypeError(problem)
    const size = stat.isBlockDevice() ? blockDeviceSize(stat.rdev) : stat.size
    if (size === 0) throw new RangeError(`memory file ${path} is empty`)
    return { fd, size }
  } catch (err) {
    fs.closeSync(fd)
    throw err
  }
}
