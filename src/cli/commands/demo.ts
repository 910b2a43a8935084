// `userfaultfd demo`: the option table, help and up-front checks; the demo is ../demo/.
import * as os from 'node:os'
import { diskAvailable, memAvailable } from '../checks'
import { UsageError, defineCommand } from '../command'
import { demo } from '../demo'
import { flag, int, mebibytes } from '../options'

export const demoCommand = defineCommand({
  name: 'demo',
  summary: 'lazy snapshot restore into a child process, as Firecracker does it, verified page by page',
  synopsis: '[--size MIB] [--threads N] [--json]',
  description: `Writes a memory snapshot file, starts the Firecracker-compatible handler (as \`serve\` does), and forks a child process that maps guest memory, registers it (MISSING + EVENT_REMOVE) and hands its userfaultfd over the socket exactly as Firecracker does. The child touches every page (each first touch is a fault the handler serves), verifies every byte against the snapshot, then MADV_DONTNEEDs 1 MiB and checks that it reads zeros.

Prints progress while it runs, then the faults and pages served, the time, and a histogram of fault latencies. The temporary files go to $TMPDIR (or /tmp) and are removed at the end, also on Ctrl-C.`,
  options: {
    size: mebibytes({
      value: 'MIB',
      min: 1,
      max: 1 << 24,
      default: 64,
      help: 'guest memory size (and snapshot size); up to the memory this machine has available.',
    }),
    threads: int({
      value: 'N',
      min: 1,
      max: 64,
      default: 1,
      help: 'threads touching guest memory in the child (N > 1: worker threads, each owning whole regions).',
    }),
    timeout: int({
      value: 'MS',
      min: 1,
      max: 2 ** 31 - 1,
      help: 'give up after this long (default: no limit; the demo still gives up after 30 s without progress).',
    }),
    json: flag({ help: 'print the summary as one JSON object on stdout (no progress on stderr).' }),
  },
  exitStatus: [
    '0  every page matched',
    '1  a mismatch or a failure',
    '2  usage error',
    '130/143  stopped by SIGINT/SIGTERM',
  ],
  examples: ['userfaultfd demo', 'userfaultfd demo --size 2G --threads 2', 'userfaultfd demo --size 16 --json'],
  check(v) {
    const bytes = v.size * 1048576
    const available = memAvailable()
    // The child's memory is resident (every page is touched) and anonymous.
    if (available !== undefined && bytes > available - (256 << 20))
      throw new UsageError(
        `--size ${v.size} MiB: this machine has ${Math.floor(available / 1048576)} MiB available (MemAvailable), and the child needs all of its memory resident plus some room; choose at most ${Math.max(0, Math.floor(available / 1048576) - 256)}`,
      )
    const disk = diskAvailable(os.tmpdir())
    if (disk !== undefined && bytes > disk)
      throw new UsageError(
        `--size ${v.size} MiB: the snapshot file does not fit in ${os.tmpdir()} (${Math.floor(disk / 1048576)} MiB free); set TMPDIR to a larger file system`,
      )
  },
  run: (v) => demo({ sizeMiB: v.size, threads: v.threads, json: v.json, timeoutMs: v.timeout }),
})
