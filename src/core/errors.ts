// UffdError: every failed syscall, with Node's conventions (code = errno name), and the one
// factory for errors the TypeScript layer raises itself (uffdError).
import { constants } from 'node:os'
import { native } from '../addon/native'

/**
 * Every failed syscall, with Node's conventions: `code` is the errno name ('EEXIST'), `errno`
 * the number, `syscall` the call ('ioctl(UFFDIO_COPY)'); `bytes` for partial fills, `hint` where a
 * fix is known.
 */
export class UffdError extends Error {
  /** errno name, e.g. 'EEXIST' */
  declare code: string
  /** errno number */
  declare errno: number
  /** the call that failed, e.g. 'ioctl(UFFDIO_COPY)' */
  declare syscall: string
  /** bytes done before a partial failure (EAGAIN: > 0 partial progress, 0 event pending) */
  declare bytes?: number
  /** how to fix it, where there is a known fix */
  declare hint?: string

  constructor(message: string) {
    super(message)
    this.name = 'UffdError'
  }
}

native.setErrorClass(UffdError)

/** An errno name Node knows (os.constants.errno), e.g. 'EBADF'. */
export type ErrnoCode = keyof typeof constants.errno

/**
 * A UffdError raised by the TypeScript layer itself: use after close, a protocol violation, a
 * refused input that is not a type or range error. `code` is an errno name, `errno` its number
 * on this system (os.constants.errno), `syscall` the operation that failed.
 */
export function uffdError(code: ErrnoCode, syscall: string, detail: string): UffdError {
  const err = new UffdError(`${code}: ${detail}, ${syscall}`)
  err.code = code
  err.errno = constants.errno[code]
  err.syscall = syscall
  return err
}

/** What an UnsupportedError is about, where it is one kernel feature (see kernel-features.ts). */
export interface UnsupportedDetail {
  /** the API that needs the feature (default 'userfaultfd') */
  syscall?: string
  /** the feature the kernel lacks, e.g. 'MOVE' or 'PAGEMAP_SCAN' (several: comma-separated) */
  feature?: string
  /** the release that brought it, e.g. '6.8' (several: the newest) */
  since?: string
  /** the running kernel (uname -r) */
  kernel?: string
}

/**
 * Thrown where the running kernel lacks a feature an API needs: a UffdError with code 'ENOTSUP'
 * (errno 95), `syscall` the API that needs it, `feature` the kernel feature it lacks, `since` the
 * release that brought it and `kernel` the running one. It extends UffdError because it is one of
 * the ways a call into the kernel's userfaultfd fails, with the same fields: callers that catch
 * UffdError see it, and `instanceof UnsupportedError` (or code 'ENOTSUP') tells it apart.
 */
export class UnsupportedError extends UffdError {
  declare feature?: string
  declare since?: string
  declare kernel?: string

  constructor(message: string, detail: UnsupportedDetail = {}) {
    super(message)
    this.name = 'UnsupportedError'
    this.code = 'ENOTSUP'
    this.errno = constants.errno.ENOTSUP
    this.syscall = detail.syscall ?? 'userfaultfd'
    if (detail.feature !== undefined) this.feature = detail.feature
    if (detail.since !== undefined) this.since = detail.since
    if (detail.kernel !== undefined) this.kernel = detail.kernel
  }
}

/** The fixes listed when userfaultfd is not permitted (an open() error's `hint`). */
export const PERMISSION_HINT = [
  'userfaultfd is not permitted for this process. Fixes, any one of:',
  "  - give this user access to /dev/userfaultfd (e.g. 'setfacl -m u:$USER:rw /dev/userfaultfd',",
  '    or a udev rule setting its group/mode); the device needs no capability (Linux 6.1+);',
  "  - 'sysctl -w vm.unprivileged_userfaultfd=1' to allow the syscall for everyone;",
  '  - run with CAP_SYS_PTRACE;',
  '  - open with { userModeOnly: true } if faults only come from user space (not from syscalls such as read(2));',
  "  - in Docker: '--device /dev/userfaultfd' (works under the default seccomp profile), or",
  "    '--cap-add SYS_PTRACE --security-opt seccomp=unconfined' for the syscall.",
].join('\n')

export function isPermissionError(err: unknown): boolean {
  const code = (err as { code?: string })?.code
  return code === 'EPERM' || code === 'EACCES'
}
