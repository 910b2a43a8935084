// Userfaultfd.probe(): what this kernel offers and whether this process may use it. Uses a
// throwaway fd (UFFDIO_API succeeds once per fd), never throws for lack of permission.
import * as os from 'node:os'
import * as fs from 'node:fs'
import { native } from '../addon/native'
import { OpenFlag, featureNames, ioctlNames } from './constants'
import { PERMISSION_HINT, isPermissionError } from './errors'

/** How a uffd was opened: /dev/userfaultfd or the userfaultfd(2) syscall. */
export type Via = 'device' | 'syscall'

/** Whether one way of opening works for this process. */
export interface AccessResult {
  /** It opened. */
  ok: boolean
  /** errno name of the failure, e.g. 'EPERM' */
  code?: string
  /** The error's message. */
  message?: string
}

/** What the kernel offers and what this process may do (Userfaultfd.probe()). */
export interface Probe {
  /** A uffd can be opened here, one way or the other. */
  supported: boolean
  /** the path that works: the syscall is preferred (no device permissions needed) */
  via: Via | null
  /** features the kernel offers (UFFDIO_API with features = 0) */
  features: bigint
  /** `features` as names. */
  featureNames: string[]
  /** ioctls the kernel offers on a uffd */
  ioctls: bigint
  /** `ioctls` as names. */
  ioctlNames: string[]
  /** uname -r */
  kernel: string
  /** true when only UFFD_USER_MODE_ONLY was permitted (faults from syscalls are not delivered) */
  userModeOnly: boolean
  /** The userfaultfd(2) syscall. */
  syscall: AccessResult
  /** /dev/userfaultfd. */
  device: AccessResult
  /** /proc/sys/vm/unprivileged_userfaultfd, or null when unreadable */
  unprivilegedUserfaultfd: number | null
  /** why unsupported, and how to fix it */
  reason?: string
}

let cached: Probe | undefined

function attempt(open: () => number): { fd: number; result: AccessResult } {
  try {
    return { fd: open(), result: { ok: true } }
  } catch (err) {
    const e = err as { code?: string; message?: string }
    return { fd: -1, result: { ok: false, code: e.code, message: e.message } }
  }
}

function readSysctl(): number | null {
  try {
    return Number(fs.readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim())
  } catch {
    return null
  }
}

/** Probes once per thread (cached); pass { refresh: true } to probe again. */
export function probe(options: { refresh?: boolean } = {}): Probe {
  if (cached !== undefined && options.refresh !== true) return cached
  const flags = OpenFlag.O_CLOEXEC | OpenFlag.O_NONBLOCK
  const sys = attempt(() => native.openSyscall(flags))
  const dev = attempt(() => native.openDevice(flags))
  let fd = sys.fd >= 0 ? sys.fd : dev.fd
  let userModeOnly = false
  if (fd < 0) {
    const umo = attempt(() => native.openSyscall(flags | OpenFlag.UFFD_USER_MODE_ONLY))
    if (umo.fd >= 0) {
      fd = umo.fd
      userModeOnly = true
    }
  } else if (sys.fd >= 0 && dev.fd >= 0) {
    native.close(dev.fd)
  }

  const result: Probe = {
    supported: false,
    via: sys.fd >= 0 || userModeOnly ? 'syscall' : dev.fd >= 0 ? 'device' : null,
    features: 0n,
    featureNames: [],
    ioctls: 0n,
    ioctlNames: [],
    kernel: os.release(),
    userModeOnly,
    syscall: sys.result,
    device: dev.result,
    unprivilegedUserfaultfd: readSysctl(),
  }
  if (fd >= 0) {
    try {
      const [features, ioctls] = native.api(fd, 0n)
      Object.assign(result, {
        supported: true,
        features,
        ioctls,
        featureNames: featureNames(features),
        ioctlNames: ioctlNames(ioctls),
      })
      if (userModeOnly) {
        result.reason = `only UFFD_USER_MODE_ONLY is permitted: faults raised inside syscalls are not delivered.\n${PERMISSION_HINT}`
      }
    } catch (err) {
      result.via = null
      result.reason = `UFFDIO_API failed: ${(err as Error).message}`
    } finally {
      native.close(fd)
    }
  } else {
    result.reason = explain(sys.result, dev.result)
  }
  cached = result
  return result
}

function explain(sys: AccessResult, dev: AccessResult): string {
  const lines = [`syscall: ${sys.message}`, `/dev/userfaultfd: ${dev.message}`]
  if (sys.code === 'ENOSYS' && dev.code === 'ENOENT') {
    lines.push(
      'This kernel has no userfaultfd (CONFIG_USERFAULTFD), or a seccomp filter blocks it and the device is absent.',
    )
  } else if (sys.code === 'ENOSYS' || isPermissionError(sys) || isPermissionError(dev)) {
    if (sys.code === 'ENOSYS')
      lines.push("The syscall is blocked (ENOSYS usually means a seccomp filter, e.g. Docker's default profile).")
    lines.push(PERMISSION_HINT)
  }
  return lines.join('\n')
}
