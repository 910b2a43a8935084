// `userfaultfd serve`: the option table, help and up-front checks; the handler is ../serve.ts.
import { checkReadableFile, checkSocketFree, checkSocketPath } from '../checks'
import { defineCommand } from '../command'
import { choice, flag, int, ints, text } from '../options'
import { serve } from '../serve'

export const serveCommand = defineCommand({
  name: 'serve',
  summary: "Firecracker's external page-fault handler (mem_backend Uffd) for one snapshot file",
  synopsis: '--socket PATH --mem-file FILE [options]',
  description: `Listens on a Unix socket for Firecracker (or any peer speaking its protocol): each connection sends the guest's memory regions as JSON with its userfaultfd attached, and every page the guest touches is served from the memory snapshot file. Many VMs can connect; each is independent.

Logs go to stderr, one line per event with a timestamp (or JSON lines with --log-format json), with each VM's progress (percentage of its memory served, rate, ETA). SIGINT or SIGTERM closes every connection and removes the socket. A socket file left by a handler that is gone is replaced; a socket another handler serves is refused.`,
  options: {
    socket: text({
      value: 'PATH',
      required: true,
      help: "Unix socket to listen on (Firecracker's mem_backend.backend_path), at most 107 bytes, in an existing directory.",
      check: checkSocketPath,
    }),
    'mem-file': text({
      value: 'FILE',
      required: true,
      help: "the memory snapshot file (Firecracker's mem_file_path).",
      check: checkReadableFile,
    }),
    'on-remove': choice({
      value: 'POLICY',
      values: ['zero', 'unregister'] as const,
      default: 'zero',
      help: 'after UFFD_EVENT_REMOVE (balloon, MADV_DONTNEED): serve zero pages there, or unregister the range.',
    }),
    source: choice({
      value: 'KIND',
      values: ['mmap', 'pread'] as const,
      default: 'mmap',
      help: 'copy from a read-only mapping of the file, or pread(2) through a buffer.',
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
  ],
  async check(v) {
    await checkSocketFree(v.socket, '--socket')
  },
  run: (v) =>
    serve({
      socket: v.socket,
      memFile: v['mem-file'],
      onRemove: v['on-remove'],
      source: v.source,
      allowUid: v['allow-uid'],
      json: v.json,
      handshakeTimeout: v['handshake-timeout'],
      logFormat: v['log-format'],
      progressIntervalMs: v['progress-interval'],
    }),
})
