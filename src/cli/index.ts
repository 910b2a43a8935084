#!/usr/bin/env node
// The `userfaultfd` command: doctor, serve, demo.
import { parseArgs } from 'node:util'
import { doctor } from './doctor'
import { serve } from './serve'
import { demo } from './demo'
import { MIGRATE_USAGE, migrate } from './migrate'

const USAGE = `usage: userfaultfd <command> [options]

commands:
  doctor [--json]        can this machine/user/container use userfaultfd? (exit 0 yes, 1 no,
                         3 only in user-mode-only form)
  serve --socket PATH --mem-file FILE [--on-remove zero|unregister] [--source mmap|pread]
        [--allow-uid UID]... [--handshake-timeout MS] [--json]
                         Firecracker-compatible page-fault handler (mem_backend "Uffd")
  demo [--size MIB] [--threads N] [--json]
                         lazy snapshot restore into a child process, verified page by page
${MIGRATE_USAGE}`

function fail(message: string): never {
  process.stderr.write(`userfaultfd: ${message}\n\n${USAGE}`)
  process.exit(2)
}

function positive(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback
  const n = Number(value)
  if (!Number.isSafeInteger(n) || n <= 0) fail(`${name} must be a positive integer (got ${value})`)
  return n
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
        source: { type: 'string' },
        'allow-uid': { type: 'string', multiple: true },
        json: { type: 'boolean' },
        'handshake-timeout': { type: 'string' },
      })
      if (typeof v.socket !== 'string') fail('serve needs --socket PATH')
      if (typeof v['mem-file'] !== 'string') fail('serve needs --mem-file FILE')
      const onRemove = (v['on-remove'] ?? 'zero') as string
      if (onRemove !== 'zero' && onRemove !== 'unregister')
        fail(`--on-remove must be zero or unregister (got ${onRemove})`)
      const source = (v.source ?? 'mmap') as string
      if (source !== 'mmap' && source !== 'pread') fail(`--source must be mmap or pread (got ${source})`)
      const allowUid = ((v['allow-uid'] ?? []) as string[]).map((u) => {
        const n = Number(u)
        if (!Number.isSafeInteger(n) || n < 0) fail(`--allow-uid must be a uid (got ${u})`)
        return n
      })
      return serve({
        socket: v.socket,
        memFile: v['mem-file'] as string,
        onRemove,
        source,
        allowUid,
        json: v.json === true,
        handshakeTimeout: positive(v['handshake-timeout'] as string | undefined, '--handshake-timeout', 5000),
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
    case 'migrate':
      return migrate(rest, () => process.stderr.write(USAGE))
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
