// UffdError: every failed syscall, with Node's conventions (code = errno name).
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

const errnoOf: Record<string, number> = { EBADF: 9, EBUSY: 16, EINVAL: 22, ENOTSUP: 95 }

/** A UffdError raised by the TypeScript layer itself (e.g. use after close). */
export function uffdError(code: keyof typeof errnoOf, syscall: string, detail: string): UffdError {
  const err = new UffdError(`${code}: ${detail}, ${syscall}`)
  err.code = code
  err.errno = errnoOf[code]
  err.syscall = syscall
  return err
}

/** Thrown where the running kernel lacks a feature an API needs. */
export class UnsupportedError extends Error {
  /** Always 'ENOTSUP'. */
  code = 'ENOTSUP'
  constructor(message: string) {
    super(message)
    this.name = 'UnsupportedError'
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
