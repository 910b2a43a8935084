// `userfaultfd doctor [--json]`: can this machine (this user, this container) use userfaultfd,
// and if not, what would fix it. Exit code: 0 usable, 1 not usable, 3 only UFFD_USER_MODE_ONLY
// (faults raised inside syscalls or by KVM are not delivered: not enough for Firecracker).
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { fork } from 'node:child_process'
import { Userfaultfd } from '../core/userfaultfd'
import { type MissingFeature, missingFeatures } from '../core/kernel-features'
import { DirtyTracker } from '../engines/dirty-tracker'
import type { FeatureCheck, FeatureCheckOptions, FeatureReport } from './doctor-features'

export interface DoctorReport {
  usable: boolean
  status: 'usable' | 'user-mode-only' | 'unusable'
  kernel: string
  arch: string
  uid: number
  syscall: { ok: boolean; code?: string }
  device: { present: boolean; ok: boolean; code?: string; mode?: string }
  unprivilegedUserfaultfd: number | null
  capSysPtrace: boolean
  seccomp: 'disabled' | 'strict' | 'filter' | 'unknown'
  via: string | null
  /** features the kernel offers (UFFDIO_API) */
  features: string[]
  /** features newer than this kernel, each with the release that brought it (see the README's table) */
  missing: MissingFeature[]
  /** how DirtyTracker tracks here: 'async' (WP_ASYNC + PAGEMAP_SCAN), 'sync', or null (neither) */
  dirtyTracking: 'async' | 'sync' | null
  /** takeSnapshot() populates ranges before protecting them (no WP_UNPOPULATED) */
  snapshotPopulates: boolean
  /** ioctls of the uffd itself, from the UFFDIO_API handshake (API, REGISTER, UNREGISTER) */
  ioctls: string[]
  /** ioctls UFFDIO_REGISTER reports for a registered range of each memory kind (null: not registered) */
  rangeIoctls: FeatureReport['rangeIoctls']
  /** each of the package's features, tried on a small mapping */
  checks: FeatureCheck[]
  hugePages: { size: number; total: number; free: number; nrHugepages: number | null }
  container: { detected: boolean; kind: string | null; evidence: string[] }
  reason?: string
  fixes: string[]
}

function read(path: string): string | null {
  try {
    return fs.readFileSync(path, 'utf8')
  } catch {
    return null
  }
}

function statusField(name: string): string | null {
  const m = new RegExp(`^${name}:\\s*(\\S+)`, 'm').exec(read('/proc/self/status') ?? '')
  return m ? m[1] : null
}

function detectContainer(): DoctorReport['container'] {
  const evidence: string[] = []
  let kind: string | null = null
  if (fs.existsSync('/.dockerenv')) {
    evidence.push('/.dockerenv exists')
    kind = 'docker'
  }
  if (fs.existsSync('/run/.containerenv')) {
    evidence.push('/run/.containerenv exists')
    kind ??= 'podman'
  }
  const cgroup = read('/proc/1/cgroup') ?? ''
  const m = /(docker|kubepods|containerd|libpod|lxc)/.exec(cgroup)
  if (m) {
    evidence.push(`/proc/1/cgroup mentions ${m[1]}`)
    kind ??= m[1] === 'kubepods' ? 'kubernetes' : m[1]
  }
  const env = process.env.container
  if (env) {
    evidence.push(`$container=${env}`)
    kind ??= env
  }
  return { detected: evidence.length > 0, kind, evidence }
}

const CHECK_TIMEOUT_MS = 20_000

/** Runs the feature checks in a child process (a check stuck in a fault cannot hang doctor). */
function runFeatureChecks(options: FeatureCheckOptions): Promise<FeatureReport> {
  return new Promise((resolve) => {
    const child = fork(path.join(__dirname, 'doctor-features.js'), [JSON.stringify(options)], {
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      execArgv: [],
    })
    let stderr = ''
    let answer: { report?: FeatureReport; error?: string } | undefined
    child.stderr!.on('data', (d) => {
      stderr += d
    })
    child.on('message', (m: { report?: FeatureReport; error?: string }) => {
      answer = m
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), CHECK_TIMEOUT_MS)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      if (answer?.report) return resolve(answer.report)
      const why =
        answer?.error ??
        (signal === 'SIGKILL'
          ? `the checks did not finish within ${CHECK_TIMEOUT_MS / 1000} s`
          : `the checks exited (${signal ?? `code ${code}`}) ${stderr.trim()}`)
      resolve({
        checks: [{ id: 'checks', name: 'feature checks', ok: false, detail: why }],
        rangeIoctls: { anonymous: null, shmem: null, hugetlb: null },
      })
    })
  })
}

export async function diagnose(): Promise<DoctorReport> {
  const p = Userfaultfd.probe({ refresh: true })
  const capEff = statusField('CapEff')
  const capSysPtrace = capEff !== null && (BigInt(`0x${capEff}`) & (1n << 19n)) !== 0n
  const seccompField = statusField('Seccomp')
  const seccomp =
    seccompField === '0' ? 'disabled' : seccompField === '1' ? 'strict' : seccompField === '2' ? 'filter' : 'unknown'
  const devStat = (() => {
    try {
      return fs.statSync('/dev/userfaultfd')
    } catch {
      return null
    }
  })()
  const meminfo = read('/proc/meminfo') ?? ''
  const num = (re: RegExp): number => Number(re.exec(meminfo)?.[1] ?? 0)
  const nr = read('/proc/sys/vm/nr_hugepages')
  const container = detectContainer()
  const status: DoctorReport['status'] = !p.supported ? 'unusable' : p.userModeOnly ? 'user-mode-only' : 'usable'
  const fixes: string[] = []
  if (status !== 'usable') {
    if (devStat !== null && !p.device.ok)
      fixes.push(
        `give this user access to /dev/userfaultfd: sudo setfacl -m u:${os.userInfo().username}:rw /dev/userfaultfd (or a udev rule)`,
      )
    if (p.syscall.code === 'EPERM')
      fixes.push('sudo sysctl -w vm.unprivileged_userfaultfd=1 (or run with CAP_SYS_PTRACE)')
    if (container.detected) {
      // Docker: the default seccomp profile blocks the syscall (EPERM/ENOSYS) whatever the
      // capabilities; the device needs only to be passed in (and be accessible to this user).
      if (devStat === null)
        fixes.push(
          'docker run --device /dev/userfaultfd ... (the host needs Linux 6.1+; works with the default seccomp profile)',
        )
      if (seccomp === 'filter')
        fixes.push(
          "docker run --cap-add SYS_PTRACE --security-opt seccomp=unconfined ... (Docker's default seccomp profile blocks the userfaultfd syscall)",
        )
      else if (p.syscall.code === 'EPERM' && !capSysPtrace)
        fixes.push(
          'docker run --cap-add SYS_PTRACE ... (or run the container as a user allowed to open /dev/userfaultfd)',
        )
    } else if (seccomp === 'filter' && !p.syscall.ok) {
      fixes.push('a seccomp filter is active: allow the userfaultfd syscall in it, or use /dev/userfaultfd')
    }
    if (p.syscall.code === 'ENOSYS' && devStat === null && !container.detected)
      fixes.push('this kernel may lack CONFIG_USERFAULTFD, or a seccomp filter blocks the syscall')
  }
  const features: FeatureReport =
    status === 'unusable'
      ? { checks: [], rangeIoctls: { anonymous: null, shmem: null, hugetlb: null } }
      : await runFeatureChecks({
          userModeOnly: status === 'user-mode-only',
          hugePagesFree: num(/HugePages_Free:\s+(\d+)/),
        })
  // One fix list: each distinct fix once; what only a newer kernel brings, on one line.
  const kernel: string[] = []
  for (const c of features.checks) {
    if (c.ok === true || c.fix === undefined) continue
    if (c.fix.startsWith('Linux ')) kernel.includes(c.fix) || kernel.push(c.fix)
    else if (!fixes.includes(c.fix)) fixes.push(c.fix)
  }
  if (kernel.length > 0) fixes.push(`a newer kernel: ${kernel.join('; ')}`)
  return {
    usable: status === 'usable',
    status,
    kernel: p.kernel,
    arch: process.arch,
    uid: process.getuid?.() ?? -1,
    syscall: { ok: p.syscall.ok, code: p.syscall.code },
    device: {
      present: devStat !== null,
      ok: p.device.ok,
      code: p.device.code,
      mode: devStat ? `0${(devStat.mode & 0o777).toString(8)} uid=${devStat.uid} gid=${devStat.gid}` : undefined,
    },
    unprivilegedUserfaultfd: p.unprivilegedUserfaultfd,
    capSysPtrace,
    seccomp,
    via: p.via,
    features: p.featureNames,
    missing: missingFeatures(),
    dirtyTracking: DirtyTracker.support().mode ?? null,
    snapshotPopulates: p.supported && !p.featureNames.includes('WP_UNPOPULATED'),
    ioctls: p.ioctlNames,
    rangeIoctls: features.rangeIoctls,
    checks: features.checks,
    hugePages: {
      size: num(/Hugepagesize:\s+(\d+)/) * 1024,
      total: num(/HugePages_Total:\s+(\d+)/),
      free: num(/HugePages_Free:\s+(\d+)/),
      nrHugepages: nr === null ? null : Number(nr.trim()),
    },
    container,
    reason: p.reason,
    fixes,
  }
}

function line(ok: boolean | null, text: string): string {
  return `${ok === null ? ' ' : ok ? '✓' : '✗'} ${text}`
}

export function formatReport(r: DoctorReport): string {
  const out = [
    `userfaultfd doctor: ${r.status.toUpperCase()}`,
    line(null, `kernel ${r.kernel} (${r.arch}), uid ${r.uid}`),
    line(r.syscall.ok, `userfaultfd(2) syscall: ${r.syscall.ok ? 'works' : r.syscall.code}`),
    line(
      r.device.ok,
      `/dev/userfaultfd: ${!r.device.present ? 'absent' : r.device.ok ? 'works' : r.device.code} ${r.device.mode ? `(${r.device.mode})` : ''}`.trimEnd(),
    ),
    line(
      null,
      `vm.unprivileged_userfaultfd = ${r.unprivilegedUserfaultfd ?? 'unreadable'}; CAP_SYS_PTRACE: ${r.capSysPtrace ? 'yes' : 'no'}; seccomp: ${r.seccomp}`,
    ),
    line(null, `features offered (UFFDIO_API, ${r.features.length}): ${r.features.join(' ') || '-'}`),
    line(
      r.missing.length === 0 ? null : false,
      `newer features this kernel lacks: ${r.missing.map((m) => `${m.feature} (${m.since})`).join(' ') || 'none'}`,
    ),
    line(
      null,
      `dirty tracking: ${r.dirtyTracking ?? 'unavailable'}; live snapshots ${r.snapshotPopulates ? 'populate ranges first (no WP_UNPOPULATED)' : 'protect unpopulated pages (WP_UNPOPULATED)'}`,
    ),
    line(null, `ioctls of the uffd itself (UFFDIO_API handshake): ${r.ioctls.join(' ') || '-'}`),
    ...(['anonymous', 'shmem', 'hugetlb'] as const).map((kind) =>
      line(
        null,
        `ioctls of a registered ${kind} range (UFFDIO_REGISTER ${r.rangeIoctls[kind]?.modes.join(' + ') ?? ''}): ${r.rangeIoctls[kind]?.ioctls.join(' ') ?? 'not registered (see below)'}`.replace(
          ' ):',
          '):',
        ),
      ),
    ),
    line(null, `huge pages: ${r.hugePages.total} x ${r.hugePages.size / 1024} KiB reserved, ${r.hugePages.free} free`),
    line(
      null,
      `container: ${r.container.detected ? `${r.container.kind} (${r.container.evidence.join('; ')})` : 'none detected'}`,
    ),
  ]
  if (r.checks.length > 0)
    out.push(
      '',
      'What works here (each tried on a small mapping):',
      ...r.checks.map((c) =>
        line(c.ok, `${c.name}: ${c.ok === true ? 'yes' : c.ok === false ? 'NO' : 'not tried'} (${c.detail})`),
      ),
    )
  if (r.reason) out.push('', r.reason)
  if (r.fixes.length > 0) out.push('', 'Fixes:', ...r.fixes.map((f) => `  - ${f}`))
  return out.join('\n')
}

export async function doctor(args: { json: boolean }): Promise<number> {
  const report = await diagnose()
  process.stdout.write(args.json ? `${JSON.stringify(report, null, 2)}\n` : `${formatReport(report)}\n`)
  return report.status === 'usable' ? 0 : report.status === 'user-mode-only' ? 3 : 1
}
