// `userfaultfd migrate demo|send|receive`: the option tables, help and up-front checks; what
// they run is ../migrate/.
import { DEFAULT_POSTCOPY_PRIORITY, POSTCOPY_PRIORITIES } from '../../migration/common'
import { UsageError, defineCommand } from '../command'
import { bytes, choice, flag, int, text } from '../options'
import { checkEndpoint, checkSecret, runDemo, runReceive, runSend } from '../migrate'

const MODES = ['hybrid', 'precopy', 'postcopy'] as const
const MEMORY = ['anonymous', 'shmem', 'hugetlb'] as const
const POLICIES = ['wait', 'poison', 'zero'] as const
const HUGE = 2 << 20

function optional<const T extends string>(values: readonly T[], flagHelp: string, value: string) {
  return text({
    value,
    help: `${flagHelp} One of: ${values.join(', ')}.`,
    check: (v, f) => {
      if (!(values as readonly string[]).includes(v))
        throw new UsageError(`${f} must be ${values.join(' or ')} (got '${v}')`)
    },
  })
}

const common = {
  'secret-file': text({
    value: 'FILE',
    help: 'read the shared secret from FILE (its trailing newline dropped) instead of USERFAULTFD_MIGRATE_SECRET.',
  }),
  insecure: flag({ help: 'run without a shared secret: no authentication at all (trusted networks only).' }),
  json: flag({ help: 'print the result as one JSON object on stdout, and nothing else.' }),
  events: flag({ help: 'report as JSON lines on stdout (what `migrate demo` reads).' }),
}

const sizeOption = bytes({
  value: 'SIZE',
  min: 4096,
  max: 2 ** 44,
  default: 1 << 30,
  help: 'memory to migrate (a multiple of the page size: 2M for hugetlb).',
})
const modeOption = choice({
  value: 'MODE',
  values: MODES,
  default: 'hybrid',
  help: 'pre-copy rounds then post-copy (hybrid), pre-copy only, or post-copy only.',
})
const memoryOption = choice({
  value: 'KIND',
  values: MEMORY,
  default: 'anonymous',
  help: 'private anonymous memory, shmem (memfd), or hugetlbfs (memfd with 2 MiB pages).',
})
const dirtyRateOption = bytes({
  value: 'RATE',
  min: 0,
  max: 2 ** 40,
  default: 64 << 20,
  help: 'bytes of pages per second a writer dirties: on the source until the stop, on the target from its resume.',
})
const maxDowntimeOption = int({
  value: 'MS',
  min: 0,
  max: 3_600_000,
  default: 20,
  help: 'pre-copy ends when the dirty pages left would take at most this long to send.',
})

function checkSize(size: number, memory: string): void {
  if (size % (memory === 'hugetlb' ? HUGE : 4096) !== 0)
    throw new UsageError(`--size must be a multiple of ${memory === 'hugetlb' ? '2M (hugetlb pages)' : '4096'}`)
}

export const migrateDemoCommand = defineCommand({
  name: 'migrate demo',
  summary: 'live migration between two processes in two network namespaces, verified page by page',
  synopsis: '[--size 1G] [--mode hybrid] [--dirty-rate 64M] [--fault link-down:MS | source-dies] [--json]',
  description: `Makes two network namespaces joined by a veth pair (link-local 169.254.77.1 and .2; loopback, with the reason printed, where namespaces cannot be made), runs \`migrate receive\` in one and \`migrate send\` in the other, and migrates memory filled with random bytes while a writer dirties it (on the source until the stop, on the target from the moment it resumes, with a reader there too).

On a TTY it shows live progress (phase, round, pages sent, demanded and pushed, rate, ETA); then the timeline: pre-copy time, downtime, post-copy time, demand latency p50/p99, bytes on the wire / memory size, and the verdict of the page-by-page check. The namespaces are removed at the end, on failure and on Ctrl-C.

Faults: --fault link-down:MS takes the link down for MS ms the moment post-copy starts (the run still ends verified, reconnecting); --fault source-dies kills the source the moment post-copy starts, and --on-source-loss decides what the target does (poison: the workload gets SIGBUS instead of hanging).`,
  options: {
    size: sizeOption,
    mode: modeOption,
    memory: memoryOption,
    'dirty-rate': dirtyRateOption,
    'max-downtime': maxDowntimeOption,
    fault: text({ value: 'FAULT', help: 'link-down:MS or source-dies.' }),
    'on-source-loss': optional(POLICIES, "with --fault source-dies: the target's policy (default poison).", 'POLICY'),
    'source-loss-timeout': int({
      value: 'MS',
      min: 0,
      max: 3_600_000,
      help: 'how long the target waits for a lost source before its policy applies (default 3000; with link-down, MS + 10000).',
    }),
    timeout: int({ value: 'MS', min: 1, max: 2 ** 31 - 1, default: 300_000, help: 'give up after this long.' }),
    loopback: flag({ help: 'run over loopback, without network namespaces.' }),
    json: flag({
      help: 'end with one JSON line: { mode, bytes, totalMs, precopyMs, downtimeMs, postcopyMs, wireBytes, demandP50Us, demandP99Us, verified, reconnects, poisonedPages }.',
    }),
  },
  exitStatus: [
    '0  verified (or, with --fault source-dies, the policy did what it says)',
    '1  not verified, or a failure',
    '2  usage error',
    '3  --fault source-dies with --on-source-loss wait: the target still waits (the demo stops it)',
    '130  Ctrl-C (the namespaces are removed)',
  ],
  examples: [
    'userfaultfd migrate demo',
    'userfaultfd migrate demo --size 4G --mode postcopy --json',
    'userfaultfd migrate demo --size 256M --fault link-down:2000',
    'userfaultfd migrate demo --fault source-dies --on-source-loss poison',
  ],
  check(v) {
    checkSize(v.size, v.memory)
  },
  run: (v) =>
    runDemo({
      size: v.size,
      mode: v.mode,
      memory: v.memory,
      dirtyRate: v['dirty-rate'],
      maxDowntime: v['max-downtime'],
      fault: v.fault,
      onSourceLoss: v['on-source-loss'] as (typeof POLICIES)[number] | undefined,
      sourceLossTimeoutMs: v['source-loss-timeout'],
      timeout: v.timeout,
      loopback: v.loopback,
      json: v.json,
    }),
})

export const migrateSendCommand = defineCommand({
  name: 'migrate send',
  summary: "the demo's source half, for two real hosts: fill memory, dirty it, migrate it",
  synopsis: '--to HOST:PORT [--size 1G] [--mode M] [--dirty-rate R] [--secret-file F | --insecure] [--json]',
  description: `Fills memory with random bytes, runs a writer dirtying it, and migrates it to \`migrate receive\` at HOST:PORT. The shared secret comes from USERFAULTFD_MIGRATE_SECRET or --secret-file; without one it refuses to start unless --insecure. A target with another secret: exit 4, saying authentication failed.`,
  options: {
    to: text({
      value: 'HOST:PORT',
      required: true,
      help: 'the target (migrate receive --listen).',
      check: checkEndpoint,
    }),
    size: sizeOption,
    mode: modeOption,
    memory: memoryOption,
    'dirty-rate': dirtyRateOption,
    'max-downtime': maxDowntimeOption,
    'postcopy-priority': choice({
      value: 'P',
      values: POSTCOPY_PRIORITIES,
      default: DEFAULT_POSTCOPY_PRIORITY,
      help: 'post-copy: latency keeps demand faults from waiting behind the push (real-time demand threads where permitted); throughput pushes as fast as possible.',
    }),
    tls: flag({
      help: 'TLS (the target needs --tls-key and --tls-cert); the certificate is not checked, the shared secret authenticates.',
    }),
    fault: text({
      value: 'FAULT',
      help: 'source-dies: kill this process when post-copy starts; link-down:MS with --fault-device.',
    }),
    'fault-device': text({ value: 'DEV', help: 'the network interface --fault link-down takes down.' }),
    seed: int({ value: 'N', min: 0, max: 2 ** 31 - 1, default: 1, help: 'seed of the random bytes and writes.' }),
    'target-readers': int({
      value: 'N',
      min: 0,
      max: 8,
      default: 1,
      help: 'reader threads the target runs from its resume.',
    }),
    ...common,
  },
  exitStatus: [
    '0  migrated and verified',
    '1  failed or not verified',
    '2  usage error (no secret, say)',
    '4  authentication failed',
  ],
  examples: ['USERFAULTFD_MIGRATE_SECRET=... userfaultfd migrate send --to 10.0.0.2:7000 --size 4G'],
  check(v) {
    checkSize(v.size, v.memory)
    checkSecret(v['secret-file'], v.insecure)
  },
  run: (v) =>
    runSend({
      to: v.to,
      size: v.size,
      mode: v.mode,
      memory: v.memory,
      dirtyRate: v['dirty-rate'],
      maxDowntime: v['max-downtime'],
      secretFile: v['secret-file'],
      insecure: v.insecure,
      tls: v.tls,
      fault: v.fault,
      faultDevice: v['fault-device'],
      seed: v.seed,
      targetReaders: v['target-readers'],
      postcopyPriority: v['postcopy-priority'],
      json: v.json,
      events: v.events,
    }),
})

export const migrateReceiveCommand = defineCommand({
  name: 'migrate receive',
  summary: "the demo's target half, for two real hosts: listen, receive, run, check every page",
  synopsis: '--listen HOST:PORT [--secret-file F | --insecure] [--on-source-loss P] [--json]',
  description: `Listens for \`migrate send\`, receives its memory, runs a writer and a reader on it from the moment it resumes, and checks every page against the source's (but the word its own writer stamps). A peer with the wrong secret is dropped and it keeps waiting; it exits after one migration. The shared secret comes from USERFAULTFD_MIGRATE_SECRET or --secret-file; without one it refuses to start unless --insecure.`,
  options: {
    listen: text({
      value: 'HOST:PORT',
      required: true,
      help: 'address to listen on (port 0: any).',
      check: checkEndpoint,
    }),
    'on-source-loss': choice({
      value: 'POLICY',
      values: POLICIES,
      default: 'wait',
      help: 'when the source is gone for good in post-copy: keep faulting threads waiting, poison the missing pages (SIGBUS), or fill them with zeros.',
    }),
    'source-loss-timeout': int({
      value: 'MS',
      min: 0,
      max: 86_400_000,
      default: 5000,
      help: 'how long a lost source may take to come back before the policy applies.',
    }),
    'tls-key': text({ value: 'FILE', help: 'TLS private key (PEM), with --tls-cert.' }),
    'tls-cert': text({ value: 'FILE', help: 'TLS certificate (PEM), with --tls-key.' }),
    fault: text({
      value: 'FAULT',
      help: 'link-down:MS: take --fault-device down for MS ms the moment post-copy starts.',
    }),
    'fault-device': text({ value: 'DEV', help: 'the network interface --fault link-down takes down.' }),
    prealloc: bytes({
      value: 'SIZE',
      min: 0,
      max: 2 ** 44,
      default: 0,
      help: 'allocate and touch this much memory before listening, and receive into it if it fits (benchmarks).',
    }),
    ...common,
  },
  exitStatus: [
    '0  migrated (and verified), or the source lost and the policy applied',
    '1  failed',
    '2  usage error (no secret, say)',
  ],
  examples: [
    'USERFAULTFD_MIGRATE_SECRET=... userfaultfd migrate receive --listen 0.0.0.0:7000 --on-source-loss poison',
  ],
  check(v) {
    checkSecret(v['secret-file'], v.insecure)
  },
  run: (v) =>
    runReceive({
      listen: v.listen,
      secretFile: v['secret-file'],
      insecure: v.insecure,
      onSourceLoss: v['on-source-loss'],
      sourceLossTimeoutMs: v['source-loss-timeout'],
      tlsKey: v['tls-key'],
      tlsCert: v['tls-cert'],
      fault: v.fault,
      faultDevice: v['fault-device'],
      prealloc: v.prealloc || undefined,
      json: v.json,
      events: v.events,
    }),
})
