// What this process may do, so that a test needing a permission it lacks skips with the reason
// (printed), and tests whose expectations depend on the environment (host, or a container run
// with --device /dev/userfaultfd, or with --cap-add SYS_PTRACE) expect the right thing.
//
// Docker's default seccomp profile blocks the userfaultfd syscall whatever the capabilities, and
// allows process_vm_readv/process_vm_writev, ptrace and kcmp only with CAP_SYS_PTRACE: tests
// that use those must check `env.capSysPtrace` (see `needs`).
import * as fs from 'node:fs'
import * as os from 'node:os'
import { native } from '../../src/addon/native'
import { OpenFlag } from '../../src/core/constants'

const CAP_SYS_PTRACE = 19n
const CAP_SYS_NICE = 23n

function capEff(): bigint {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))
  return m === null ? 0n : BigInt(`0x${m[1]}`)
}

function canOpen(open: () => number): boolean {
  try {
    native.close(open())
    return true
  } catch {
    return false
  }
}

const flags = OpenFlag.O_CLOEXEC | OpenFlag.O_NONBLOCK

export const env = {
  /** CAP_SYS_PTRACE: EVENT_FORK, and (in Docker) process_vm_readv, ptrace, kcmp */
  capSysPtrace: ((capEff() >> CAP_SYS_PTRACE) & 1n) === 1n,
  /** CAP_SYS_NICE: SCHED_FIFO threads and nice values below 0 (migration's postcopyPriority 'latency') */
  capSysNice: ((capEff() >> CAP_SYS_NICE) & 1n) === 1n,
  /** the userfaultfd(2) syscall opens a full uffd (not user-mode-only) */
  syscall: canOpen(() => native.openSyscall(flags)),
  /** the syscall with UFFD_USER_MODE_ONLY (always allowed, unless seccomp blocks the syscall) */
  syscallUserModeOnly: canOpen(() => native.openSyscall(flags | OpenFlag.UFFD_USER_MODE_ONLY)),
  /** /dev/userfaultfd exists (Linux 6.1+; in Docker only with --device /dev/userfaultfd) */
  deviceExists: fs.existsSync('/dev/userfaultfd'),
  /** this process can open /dev/userfaultfd */
  device: canOpen(() => native.openDevice(flags)),
  /** in a Docker (or similar) container */
  container: fs.existsSync('/.dockerenv') || fs.existsSync('/run/.containerenv'),
  /** a seccomp filter is active (Docker's default profile, say) */
  seccompFilter: /^Seccomp:\s*2$/m.test(fs.readFileSync('/proc/self/status', 'utf8')),
  /**
   * process_vm_readv(2) on this process is allowed: Docker's default seccomp profile permits it
   * only with CAP_SYS_PTRACE (a heuristic: any seccomp filter without CAP_SYS_PTRACE counts as no)
   */
  processVmReadv: false,
}
env.processVmReadv = !env.seccompFilter || env.capSysPtrace

/** The running kernel's version as [major, minor] (from uname -r: "6.12.57+deb12-arm64" -> [6, 12]). */
export function kernelVersion(): [number, number] {
  const m = /^(\d+)\.(\d+)/.exec(os.release())
  return m === null ? [0, 0] : [Number(m[1]), Number(m[2])]
}

/** The running kernel is at least major.minor. */
export function kernelAtLeast(major: number, minor: number): boolean {
  const [a, b] = kernelVersion()
  return a > major || (a === major && b >= minor)
}

/** Skips the test, saying why, unless `ok`. */
export function needs(ctx: { skip: (note?: string) => void }, ok: boolean, why: string): void {
  if (!ok) ctx.skip(why)
}
