// `userfaultfd serve`: the option table, help and up-front checks; the handler is ../serve.ts.
import { parseLocation } from '../../sources/location'
import { checkMemFile, checkReadableFile, checkSocketFree, checkSocketPath, checkWritableFile } from '../checks'
import { defineCommand, UsageError } from '../command'
import { choice, flag, int, ints, mebibytes, text, texts } from '../options'
import { serve } from '../serve'

/** A path (a readable regular file or block device) or a URL: file:, nbd://, nbd+unix://, http://, https://. */
function checkMemFileOrUrl(value: string, flag: string): void {
  let location: ReturnType<typeof parseLocation>
  try {
    location = parseLocation(value)
  } catch (err) {
    throw new UsageError(`${flag}: ${(err as Error).message}`)
  }
  if (location.kind === 'file') checkMemFile(location.path, flag)
}

function checkHeader(value: string, flag: string): void {
  if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+:/.test(value))
    throw new UsageError(`${flag} must be 'Name: value' (got '${value}')`)
}

export const serveCommand = defineCommand({
  name: 'serve',
  summary: "Firecracker's external page-fault handler (mem_backend Uffd) for one snapshot file or URL",
  synopsis: '--socket PATH --mem-file FILE|URL [options]',
  description: `Listens on a Unix socket for Firecracker (or any peer speaking its protocol): each connection sends the guest's memory regions as JSON with its userfaultfd attached, and every page the guest touches is served from the memory snapshot file. Many VMs can connect; each is independent.

The snapshot may be remote: --mem-file takes nbd://host:port/export, nbd+unix:///export?socket=PATH, http:// or https:// (or file:). Remote snapshots are read through one connection pool and local cache shared by every VM, demand reads first, the rest in the background. --record-working-set writes the pages each VM touches, in first-touch order, when its connection ends (and on SIGINT/SIGTERM); --working-set replays such a file first on the next restore.

Logs go to stderr, one line per event with a timestamp (or JSON lines with --log-format json), with each VM's progress (percentage of its memory served, rate, ETA). SIGINT or SIGTERM closes every connection and removes the socket. A socket file left by a handler that is gone is replaced; a socket another handler serves is refused.`,
  options: {
    socket: text({
      value: 'PATH',
      required: true,
      help: "Unix socket to listen on (Firecracker's mem_backend.backend_path), at most 107 bytes, in an existing directory.",
      check: checkSocketPath,
    }),
    'mem-file': text({
      value: 'FILE|URL',
      required: true,
      help: "the memory snapshot (Firecracker's mem_file_path): a path (a regular file or a block device), or file:, nbd://host:port/export, nbd+unix:///export?socket=PATH, http:// or https://.",
      check: checkMemFileOrUrl,
    }),
    'working-set': text({
      value: 'FILE',
      help: 'replay this working set for every VM: its pages first, in first-touch order (a file recorded on another snapshot version is refused).',
      check: checkReadableFile,
    }),
    'record-working-set': text({
      value: 'FILE',
      help: "record each VM's working set into FILE, written when its connection ends and on SIGINT/SIGTERM.",
    }),
    header: texts({
      value: "'NAME: VALUE'",
      help: 'an HTTP request header for a remote --mem-file (a bearer token); repeatable.',
      check: checkHeader,
    }),
    ca: text({
      value: 'FILE',
      help: 'trust this CA certificate (PEM) for an https:// --mem-file.',
      check: checkReadableFile,
    }),
    manifest: text({
      value: 'FILE',
      help: 'integrity manifest of the snapshot (per-chunk SHA-256): a chunk that does not match is never served.',
      check: checkReadableFile,
    }),
    'cache-dir': text({
      value: 'DIR',
      help: 'keep fetched pages of a remote snapshot here, so a second restore fetches nothing again.',
    }),
    'cache-size': mebibytes({
      value: 'SIZE',
      min: 1,
      max: 1 << 30,
      default: 8192,
      help: 'the cache directory holds at most this much (least recently used pages go first, down to 80%).',
    }),
    'cache-key': text({
      value: 'KEY',
      help: 'names the snapshot version in the cache (an NBD export has none of its own; HTTP uses its ETag).',
    }),
    'on-remove': choice({
      value: 'POLICY',
      values: ['zero', 'unregister', 'source'] as const,
      default: 'zero',
      help: 'after UFFD_EVENT_REMOVE (balloon, MADV_DONTNEED): serve zero pages there, unregister the range, or serve the memory file there again (the FaultServer onRemove values).',
    }),
    'on-source-error': choice({
      value: 'POLICY',
      values: ['retry', 'poison', 'zero'] as const,
      default: 'retry',
      help: 'where the memory file cannot give a page a vCPU waits on (truncated, EIO): retry with backoff until it can, poison it (the vCPU gets SIGBUS; Linux 6.6+) or serve zeros (the FaultServer onSourceError values).',
    }),
    'read-method': choice({
      value: 'METHOD',
      values: ['mmap', 'pread'] as const,
      defaultText: 'mmap',
      help: 'copy from a read-only mapping of the file, or pread(2) through a buffer.',
    }),
    source: choice({
      value: 'METHOD',
      values: ['mmap', 'pread'] as const,
      help: 'the old name of --read-method (before 0.2).',
    }),
    'allow-uid': ints({
      value: 'UID',
      min: 0,
      max: 4294967294,
      help: "also accept peers with this uid (default: only this process's uid and root).",
    }),
    'handshake-timeout': int({
      value: 'MS',
      min: 1,
      max: 3_600_000,
      default: 5000,
      help: 'time a peer has to send its complete handshake, in milliseconds.',
    }),
    'log-format': choice({
      value: 'FORMAT',
      values: ['text', 'json'] as const,
      default: 'text',
      help: 'stderr log lines: text with an ISO timestamp, or one JSON object per line.',
    }),
    'progress-interval': int({
      value: 'MS',
      min: 0,
      max: 3_600_000,
      default: 5000,
      help: "how often each VM's progress is logged while it is being served (0: never).",
    }),
    trace: text({
      value: 'FILE',
      help: 'record every fault (address, kind, wait, thread) in this Chrome trace-event file, which Perfetto (ui.perfetto.dev) opens and `userfaultfd report FILE` draws; written when stopped.',
      check: checkWritableFile,
    }),
    'metrics-port': int({
      value: 'PORT',
      min: 0,
      max: 65535,
      help: 'serve metrics in the Prometheus text format on http://HOST:PORT/metrics (0: any free port, logged).',
    }),
    'metrics-host': text({
      value: 'HOST',
      default: '127.0.0.1',
      help: 'the address --metrics-port listens on (e.g. 0.0.0.0 for every interface).',
    }),
    json: flag({ help: 'print the final stats as JSON on stdout when stopped.' }),
  },
  exitStatus: [
    '0  stopped by SIGINT or SIGTERM',
    '1  could not serve (the socket or the memory file)',
    '2  usage error',
  ],
  examples: [
    'userfaultfd serve --socket /run/fc/uffd.sock --mem-file /snapshots/vm1/mem',
    'userfaultfd serve --socket uffd.sock --mem-file mem --log-format json --json > stats.json',
    'userfaultfd serve --socket uffd.sock --mem-file nbd://10.0.0.5:10809/vm1 --record-working-set vm1.ws',
    "userfaultfd serve --socket uffd.sock --mem-file https://store/vm1.mem --header 'Authorization: Bearer T' --working-set vm1.ws --cache-dir /var/cache/uffd",
    'userfaultfd serve --socket uffd.sock --mem-file mem --trace restore.json  # then: userfaultfd report restore.json',
    'userfaultfd serve --socket uffd.sock --mem-file mem --metrics-port 9464   # then scrape http://127.0.0.1:9464/metrics',
  ],
  async check(v) {
    await checkSocketFree(v.socket, '--socket')
  },
  run: (v) =>
    serve({
      socket: v.socket,
      memFile: v['mem-file'],
      onRemove: v['on-remove'],
      onSourceError: v['on-source-error'],
      readMethod: v['read-method'] ?? v.source ?? 'mmap',
      allowUid: v['allow-uid'],
      json: v.json,
      handshakeTimeout: v['handshake-timeout'],
      logFormat: v['log-format'],
      progressIntervalMs: v['progress-interval'],
      workingSet: v['working-set'],
      recordWorkingSet: v['record-working-set'],
      headers: v.header,
      ca: v.ca,
      manifest: v.manifest,
      cacheDir: v['cache-dir'],
      cacheSizeMiB: v['cache-size'],
      cacheKey: v['cache-key'],
      trace: v.trace,
      metricsPort: v['metrics-port'],
      metricsHost: v['metrics-host'],
    }),
})
