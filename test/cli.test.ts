// The `userfaultfd` command, run as the real binary (node dist/cli/index.js ...): help for every
// command, --version, and usage errors that name the flag and exit 2.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { execFileSync } from 'node:child_process'
import { commands } from '../src/cli/commands'
import { dist, killChildren, root, runNode } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')
let dir: string

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cli-'))
})
afterEach(() => killChildren())
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

describe('userfaultfd CLI: help and version', () => {
  it('has a shebang and is the package bin', () => {
    expect(fs.readFileSync(cli, 'utf8').startsWith('#!/usr/bin/env node\n')).toBe(true)
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))
    expect(pkg.bin).toEqual({ userfaultfd: 'dist/cli/index.js' })
  })

  it('--version prints the package version; -V too', async () => {
    const { version } = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))
    for (const flag of ['--version', '-V']) {
      const r = await runNode([cli, flag])
      expect(r).toMatchObject({ code: 0, stdout: `${version}\n`, stderr: '' })
    }
  })

  it('--help lists every command; no command at all prints it on stderr and exits 2', async () => {
    const help = await runNode([cli, '--help'])
    expect(help.code).toBe(0)
    expect(help.stdout).toMatch(/^usage: userfaultfd <command> \[options\]/)
    for (const c of commands) expect(help.stdout).toMatch(new RegExp(`^  ${c.name} +\\S`, 'm'))
    const none = await runNode([cli])
    expect(none.code).toBe(2)
    expect(none.stdout).toBe('')
    expect(none.stderr).toBe(help.stdout)
  })

  it.each(commands.map((c) => c.name))('%s --help (and -h, and `help %s`) describes every option', async (name) => {
    const command = commands.find((c) => c.name === name)!
    const long = await runNode([cli, name, '--help'])
    expect(long.code).toBe(0)
    expect(long.stderr).toBe('')
    expect(long.stdout).toMatch(new RegExp(`^usage: userfaultfd ${name} `))
    for (const option of Object.keys(command.options)) expect(long.stdout).toMatch(new RegExp(`--${option}\\b`))
    expect(long.stdout).toMatch(/^exit status:/m)
    expect(long.stdout).toMatch(/^examples:/m)
    expect((await runNode([cli, name, '-h'])).stdout).toBe(long.stdout)
    expect((await runNode([cli, 'help', name])).stdout).toBe(long.stdout)
    // --help wins over anything else on the line, even bad options
    expect((await runNode([cli, name, '--bogus', 'x', '--help'])).code).toBe(2)
    expect((await runNode([cli, name, '--help', '--bogus'])).stdout).toBe(long.stdout)
  })
})

describe('userfaultfd CLI: usage errors exit 2 and name the flag', () => {
  const long = `/tmp/${'s'.repeat(110)}.sock`
  const cases: Array<[string, string[], RegExp]> = [
    ['an unknown command, with a suggestion', ['serv'], /unknown command 'serv' \(did you mean serve\?\)/],
    ['an option before the command', ['--json'], /unknown option --json \(options go after the command\)/],
    [
      'an unknown option, with a suggestion',
      ['serve', '--soket', 'x'],
      /unknown option --soket \(did you mean --socket\?\)/,
    ],
    ['a missing required option', ['serve', '--mem-file', 'x'], /missing --socket PATH/],
    ['a value missing at the end', ['serve', '--socket'], /--socket needs a value \(PATH\)/],
    [
      'an option where a value belongs',
      ['serve', '--socket', '--mem-file', 'x'],
      /--socket needs a value, got the option '--mem-file'/,
    ],
    ['an empty value', ['serve', '--socket=', '--mem-file', 'x'], /--socket needs a value, not an empty string/],
    [
      'an empty file name',
      ['serve', '--socket', 'a.sock', '--mem-file='],
      /--mem-file needs a value, not an empty string/,
    ],
    ['a value for a switch', ['doctor', '--json=yes'], /--json takes no value/],
    ['an option given twice', ['serve', '--socket', 'a', '--socket', 'b', '--mem-file', 'x'], /--socket given twice/],
    ['a positional argument', ['doctor', 'now'], /unexpected argument 'now'/],
    [
      'a bad choice',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--on-remove', 'maybe'],
      /--on-remove must be zero or unregister or source \(got 'maybe'\)/,
    ],
    [
      'a bad read method',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--read-method', 'mmapp'],
      /--read-method must be mmap or pread \(got 'mmapp'\)/,
    ],
    [
      'a bad read method under its old name',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--source', 'x'],
      /--source must be mmap or pread \(got 'x'\)/,
    ],
    [
      'a bad integer',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--handshake-timeout', '5s'],
      /--handshake-timeout must be an integer 1\.\.3600000 \(got '5s'\)/,
    ],
    [
      'an out-of-range integer',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--handshake-timeout', '5000000000'],
      /--handshake-timeout must be an integer/,
    ],
    [
      'a bad uid',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--allow-uid', '-1'],
      /--allow-uid needs a value, got the option '-1'/,
    ],
    [
      'a bad uid (inline)',
      ['serve', '--socket', 'a', '--mem-file', '/etc/hostname', '--allow-uid=root'],
      /--allow-uid must be an integer 0\.\.4294967294 \(got 'root'\)/,
    ],
    ['a bad size', ['demo', '--size', '12x'], /--size must be a size from 1 to 16777216 MiB/],
    ['a zero size', ['demo', '--size', '0'], /--size must be a size/],
    ['a size beyond the memory available', ['demo', '--size', '16T'], /--size must be a size/],
    [
      'a size beyond MemAvailable',
      ['demo', '--size', `${Math.ceil(os.totalmem() / 1048576) + 1024}`],
      /--size \d+ MiB: this machine has \d+ MiB available/,
    ],
    ['zero threads', ['demo', '--threads', '0'], /--threads must be an integer 1\.\.64/],
    [
      'a socket path longer than sun_path',
      ['serve', '--socket', long, '--mem-file', 'x'],
      /--socket is 120 bytes long; a Unix socket path holds at most 107/,
    ],
    [
      'a socket in a missing directory',
      ['serve', '--socket', '/nonexistent-dir/x.sock', '--mem-file', 'x'],
      /--socket: the directory \/nonexistent-dir does not exist/,
    ],
    [
      'a socket path that is a regular file',
      ['serve', '--socket', '/etc/hostname', '--mem-file', 'x'],
      /--socket: \/etc\/hostname exists and is not a socket/,
    ],
    [
      'a memory file that does not exist',
      ['serve', '--socket', 'a.sock', '--mem-file', '/nonexistent-file'],
      /--mem-file \/nonexistent-file: no such file/,
    ],
  ]
  it.each(cases)('%s', async (_what, args, message) => {
    const r = await runNode([cli, ...args])
    expect(r.stdout).toBe('')
    expect(r.stderr).toMatch(message)
    expect(r.stderr).toMatch(/\nTry 'userfaultfd( \w+)? --help'\.\n$/)
    expect(r.code).toBe(2)
  })

  it('a socket path past sun_path leaves no truncated socket behind', async () => {
    const deep = path.join(dir, 'd'.repeat(40), 'e'.repeat(40))
    fs.mkdirSync(deep, { recursive: true })
    const socket = path.join(deep, `${'f'.repeat(120 - deep.length)}.sock`)
    expect(Buffer.byteLength(socket)).toBeGreaterThan(107)
    const r = await runNode([cli, 'serve', '--socket', socket, '--mem-file', '/etc/hostname'])
    expect(r.code).toBe(2)
    expect(fs.readdirSync(deep)).toEqual([])
  })

  it('serve refuses a FIFO (it used to block forever in open(2)), a directory or a character device as --mem-file', async () => {
    const fifo = path.join(dir, 'fifo')
    execFileSync('mkfifo', [fifo])
    for (const [file, kind] of [
      [fifo, 'a FIFO \\(named pipe\\)'],
      [dir, 'a directory'],
      ['/dev/null', 'a character device'],
    ]) {
      const r = await runNode([cli, 'serve', '--socket', path.join(dir, 'f.sock'), '--mem-file', file], 10_000)
      expect({ code: r.code, signal: r.signal }).toEqual({ code: 2, signal: null })
      expect(r.stderr).toMatch(
        new RegExp(
          `^userfaultfd serve: --mem-file: memory file ${file} is ${kind}: it must be a regular file or a block device\\n`,
        ),
      )
      expect(fs.existsSync(path.join(dir, 'f.sock'))).toBe(false)
    }
  })
})
