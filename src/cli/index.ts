#!/usr/bin/env node
// The `userfaultfd` command. Each command is a row of ./commands (its option table and help);
// this file only dispatches: --help, --version, usage errors (exit 2), failures (exit 1).
import * as fs from 'node:fs'
import * as path from 'node:path'
import { UsageError, commandHelp, parseCommand, programHelp, suggest } from './command'
import { commands } from './commands'

const PROGRAM = 'userfaultfd'
const BLURB =
  'Linux userfaultfd(2) for Node.js: check a machine, serve Firecracker snapshots, or watch a lazy restore. Documentation: https://github.com/userfaultfd/userfaultfd-node#readme'

function version(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as {
    version: string
  }
  return pkg.version
}

function usageError(message: string, command?: string): number {
  const help = command ? `${PROGRAM} ${command} --help` : `${PROGRAM} --help`
  process.stderr.write(`${PROGRAM}${command ? ` ${command}` : ''}: ${message}\nTry '${help}'.\n`)
  return 2
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined) {
    process.stderr.write(programHelp(PROGRAM, commands, BLURB))
    return 2
  }
  if (name === '--help' || name === '-h') {
    process.stdout.write(programHelp(PROGRAM, commands, BLURB))
    return 0
  }
  if (name === '--version' || name === '-V') {
    process.stdout.write(`${version()}\n`)
    return 0
  }
  // `userfaultfd help [command]` reads like `userfaultfd [command] --help`.
  if (name === 'help') {
    const target = rest[0] === undefined ? undefined : commands.find((c) => c.name === rest[0])
    if (rest[0] !== undefined && target === undefined)
      return usageError(
        `unknown command '${rest[0]}'${suggest(
          rest[0],
          commands.map((c) => c.name),
          '',
        )}`,
      )
    process.stdout.write(target ? commandHelp(PROGRAM, target) : programHelp(PROGRAM, commands, BLURB))
    return 0
  }
  const command = commands.find((c) => c.name === name)
  if (command === undefined) {
    const what = name.startsWith('-')
      ? `unknown option ${name} (options go after the command)`
      : `unknown command '${name}'`
    return usageError(
      `${what}${
        name.startsWith('-')
          ? ''
          : suggest(
              name,
              commands.map((c) => c.name),
              '',
            )
      }`,
    )
  }
  let values: Record<string, unknown>
  try {
    const parsed = parseCommand(command, rest)
    if (parsed.help) {
      process.stdout.write(commandHelp(PROGRAM, command))
      return 0
    }
    values = parsed.values
    await command.check?.(values)
    return await command.run(values, parsed.argument)
  } catch (err) {
    if (err instanceof UsageError) return usageError(err.message, command.name)
    process.stderr.write(`${PROGRAM} ${command.name}: ${(err as Error).message}\n`)
    return 1
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err: Error) => {
    process.stderr.write(`${PROGRAM}: ${err.message}\n`)
    process.exitCode = 1
  },
)
