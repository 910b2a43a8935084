#!/usr/bin/env node
// The `userfaultfd` command: doctor, serve, demo.
import { parseArgs } from 'node:util'
import { choice, intArg } from '../util/validate'
import { demo } from './demo'
import { doctor } from './doctor'
import { serve } from './serve'

const USAGE = `usage: userfaultfd <command> [options]

commands:
  doctor [--json]        can this machine/user/container use userfaultfd? (exit 0 yes, 1 no,
                         3 only in user-mode-only form)
  serve --socket PATH --mem-file FILE [--on-remove zero|unregister|source]
        [--read-method mmap|pread] [--allow-uid UID]... [--handshake-timeout MS] [--json]
                         Firecracker-compatible page-fault handler (mem_backend "Uffd")
  demo [--size MIB] [--threads N] [--json]
                         lazy snapshot restore into a child process, verified page by page
`

function fail(message: string): never {
  process.stderr.write(`userfaultfd: ${message}\n\n${USAGE}`)
  process.exit(2)
}

// Checked by the package's validators; a bad value is a usage error (exit 2).
function checked<T>(check: () => T): T {
  try {
    return check()
  } catch (err) {
    fail((err as Error).message)
  }
}

function positive(value: string | undefined, name: string, fallback: number, max = Number.MAX_SAFE_INTEGER): number {
  return checked(() => intArg(value, name, fallback, 1, max))
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(USAGE)
    return command === undefined ? 2 : 0
  }
  type Values = Record<string, string | boolean | string[] | undefined>
  const parse = (options: NonNullable<Parameters<typeof parseArgs>[0]>['options']): Values => {
    try {
      return parseArgs({ args: rest, options, allowPositionals: false, strict: true }).values as Values
    } catch (err) {
      fail((err as Error).message)
    }
  }
  switch (command) {
    case 'doctor': {
      const v = parse({ json: { type: 'boolean' } })
      return doctor({ json: v.json === true })
    }
    case 'serve': {
      const v = parse({
        socket: { type: 'string' },
        'mem-file': { type: 'string' },
        'on-remove': { type: 'string' },
        'read-method': { type: 'string' },
        source: { type: 'string' }, // the old name of --read-method
        'allow-uid': { type: 'string', multiple: true },
        json: { type: 'boolean' },
        'handshake-timeout': { type: 'string' },
      })
      if (typeof v.socket !== 'string') fail('serve needs --socket PATH')
      if (typeof v['mem-file'] !== 'string') fail('serve needs --mem-file FILE')
      const onRemove = checked(() =>
        choice(v['on-remove'], '--on-remove', ['zero', 'unregister', 'source'] as const, 'zero'),
      )
      const readMethod = checked(() =>
        choice(v['read-method'] ?? v.source, '--read-method', ['mmap', 'pread'] as const, 'mmap'),
      )
      const allowUid = ((v['allow-uid'] ?? []) as string[]).map((u) => {
        const n = Number(u)
        if (!Number.isSafeInteger(n) || n < 0) fail(`--allow-uid must be a uid (got ${u})`)
        return n
      })
      return serve({
        socket: v.socket,
        memFile: v['mem-file'] as string,
        onRemove,
        readMethod,
        allowUid,
        json: v.json === true,
        // setTimeout's limit: a longer timeout would fire at once
        handshakeTimeout: positive(
          v['handshake-timeout'] as string | undefined,
          '--handshake-timeout',
          5000,
          2 ** 31 - 1,
        ),
      })
    }
    case 'demo': {
      const v = parse({
        size: { type: 'string' },
        threads: { type: 'string' },
        json: { type: 'boolean' },
        timeout: { type: 'string' },
      })
      return demo({
        sizeMiB: positive(v.size as string | undefined, '--size', 64),
        threads: positive(v.threads as string | undefined, '--threads', 1),
        json: v.json === true,
        timeoutMs: positive(v.timeout as string | undefined, '--timeout', 120_000),
      })
    }
    default:
      fail(`unknown command '${command}'`)
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err: Error & { code?: string }) => {
    process.stderr.write(`userfaultfd: ${err.message}\n`)
    process.exitCode = 1
  },
)
