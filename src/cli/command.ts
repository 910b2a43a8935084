// The CLI's shape: a command is a name, its help text and a table of options; each option row
// says how the flag is written, what it means, and how its value is checked and converted.
// Commands and options are data, so a new command or flag is a new row (see ./commands/).
// Parsing is node:util parseArgs (tokens), with our own messages: each names the flag.
import { parseArgs } from 'node:util'

/** A usage error: exit status 2, the message names the flag. */
export class UsageError extends Error {
  override readonly name = 'UsageError'
}

export type RawValue = string | boolean | string[] | undefined

export interface Option<T> {
  type: 'string' | 'boolean'
  /** may be given more than once (values collected in order) */
  multiple?: boolean
  /** one-letter alias, without the dash */
  short?: string
  /** the value's placeholder in help: --socket PATH */
  value?: string
  /** one or more sentences for --help */
  help: string
  /** what help shows as the default, if any */
  defaultText?: string
  required?: boolean
  /** checks and converts what was given (undefined: not given); throws UsageError naming `flag` */
  convert(raw: RawValue, flag: string): T
}

// biome-ignore lint/suspicious/noExplicitAny: a table of options of any value type
export type Options = Record<string, Option<any>>

export type Values<O extends Options> = { [K in keyof O]: O[K] extends Option<infer T> ? T : never }

export interface Command<O extends Options = Options> {
  name: string
  /** one line, for `userfaultfd --help` */
  summary: string
  /** the synopsis after the command's name, e.g. '--socket PATH --mem-file FILE [options]' */
  synopsis: string
  /** paragraphs for `userfaultfd <command> --help` */
  description: string
  options: O
  /** the one positional argument the command takes (required when declared), e.g. report's FILE */
  argument?: { value: string; help: string }
  examples?: string[]
  /** lines: '0  ...', '1  ...' */
  exitStatus?: string[]
  /**
   * Checks that need the values together or the outside world (a live socket, free memory),
   * after every option converted; throws UsageError (exit 2) or Error (exit 1).
   */
  check?(values: Values<O>): void | Promise<void>
  run(values: Values<O>, argument: string): number | Promise<number>
}

/** Declares a command with its values typed from its option table. */
export function defineCommand<O extends Options>(command: Command<O>): Command<O> {
  return command
}

const HELP: Option<boolean> = {
  type: 'boolean',
  short: 'h',
  help: 'show this help',
  convert: (raw) => raw === true,
}

/** Edit distance, for "did you mean". */
function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i)
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]
    row[0] = i
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j]
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1))
      prev = cur
    }
  }
  return row[b.length]
}

/** ' (did you mean --mem-file?)' when one known name is close to `name`. */
export function suggest(name: string, known: string[], prefix = '--'): string {
  const best = known
    .map((k) => ({ k, d: distance(name, k) }))
    .sort((x, y) => x.d - y.d)
    .find(({ k, d }) => d <= Math.max(1, Math.floor(k.length / 3)) || k.startsWith(name) || name.startsWith(k))
  return best ? ` (did you mean ${prefix}${best.k}?)` : ''
}

/** Parses `args` against the command's table; `{ help: true }` when -h/--help was given. */
export function parseCommand<O extends Options>(
  command: Command<O>,
  args: string[],
): { help: true } | { help: false; values: Values<O>; argument: string } {
  const table: Options = { ...command.options, help: HELP }
  const config: Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }> = {}
  const byShort = new Map<string, string>()
  for (const [name, o] of Object.entries(table)) {
    config[name] = { type: o.type, ...(o.multiple ? { multiple: true } : {}), ...(o.short ? { short: o.short } : {}) }
    if (o.short) byShort.set(o.short, name)
  }
  const { tokens } = parseArgs({ args, options: config, strict: false, allowPositionals: true, tokens: true })
  const raw = new Map<string, string | boolean | string[]>()
  let argument: string | undefined
  for (const t of tokens) {
    if (t.kind === 'option-terminator') continue
    if (t.kind === 'positional') {
      if (command.argument === undefined)
        throw new UsageError(`unexpected argument '${t.value}' (${command.name} takes only options)`)
      if (argument !== undefined)
        throw new UsageError(`unexpected argument '${t.value}' (${command.name} takes one ${command.argument.value})`)
      argument = t.value
      continue
    }
    const name = t.rawName.startsWith('--') ? t.name : (byShort.get(t.name) ?? t.name)
    const o = table[name]
    if (o === undefined) throw new UsageError(`unknown option ${t.rawName}${suggest(t.name, Object.keys(table), '--')}`)
    const flag = `--${name}`
    if (name === 'help') return { help: true }
    if (o.type === 'boolean') {
      if (t.value !== undefined) throw new UsageError(`${flag} takes no value (got '${t.value}')`)
      raw.set(name, true)
      continue
    }
    if (t.value === undefined) throw new UsageError(`${flag} needs a value${o.value ? ` (${o.value})` : ''}`)
    if (!t.inlineValue && t.value.startsWith('-') && t.value !== '-')
      throw new UsageError(
        `${flag} needs a value, got the option '${t.value}' (write ${flag}=${t.value} if that is the value)`,
      )
    if (o.multiple) raw.set(name, [...((raw.get(name) as string[] | undefined) ?? []), t.value])
    else if (raw.has(name)) throw new UsageError(`${flag} given twice ('${raw.get(name)}', then '${t.value}')`)
    else raw.set(name, t.value)
  }
  if (command.argument !== undefined && (argument === undefined || argument === ''))
    throw new UsageError(`missing ${command.argument.value} (${command.argument.help})`)
  const values: Record<string, unknown> = {}
  for (const [name, o] of Object.entries(command.options)) {
    const flag = `--${name}`
    const given = raw.get(name)
    if (given === undefined && o.required)
      throw new UsageError(`missing ${flag}${o.value ? ` ${o.value}` : ''} (required)`)
    values[name] = o.convert(given, flag)
  }
  return { help: false, values: values as Values<O>, argument: argument ?? '' }
}

function wrap(text: string, width: number, indent: string): string[] {
  const lines: string[] = []
  for (const paragraph of text.split('\n')) {
    let line = ''
    for (const word of paragraph.split(/\s+/).filter(Boolean)) {
      if (line && line.length + 1 + word.length > width) {
        lines.push(line)
        line = word
      } else line = line ? `${line} ${word}` : word
    }
    lines.push(line)
  }
  return lines.map((l, i) => (i === 0 ? l : `${indent}${l}`))
}

/** `userfaultfd <command> --help`. */
export function commandHelp(program: string, command: Command): string {
  const out = [`usage: ${program} ${command.name} ${command.synopsis}`, '']
  for (const p of command.description.split('\n\n')) out.push(...wrap(p.replace(/\n/g, ' '), 78, ''), '')
  if (command.argument !== undefined) out.push('argument:', `  ${command.argument.value}  ${command.argument.help}`, '')
  out.push('options:')
  const rows = Object.entries({ ...command.options, help: HELP }).map(([name, o]) => {
    const left = `${o.short ? `-${o.short}, ` : ''}--${name}${o.value ? ` ${o.value}` : ''}`
    const notes = [
      o.required ? 'required' : '',
      o.multiple ? 'repeatable' : '',
      o.defaultText ? `default: ${o.defaultText}` : '',
    ]
      .filter(Boolean)
      .join('; ')
    return { left, right: `${o.help}${notes ? ` (${notes})` : ''}` }
  })
  const width = Math.min(28, Math.max(...rows.map((r) => r.left.length)) + 2)
  for (const { left, right } of rows) {
    const pad = ' '.repeat(2 + width)
    const text = wrap(right, 78 - pad.length, pad).join('\n')
    out.push(left.length + 2 > width ? `  ${left}\n${pad}${text}` : `  ${left.padEnd(width)}${text}`)
  }
  if (command.exitStatus?.length) out.push('', 'exit status:', ...command.exitStatus.map((l) => `  ${l}`))
  if (command.examples?.length) out.push('', 'examples:', ...command.examples.map((l) => `  ${l}`))
  return `${out.join('\n')}\n`
}

/** `userfaultfd --help`. */
export function programHelp(program: string, commands: Command[], blurb: string): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 2
  return `${[
    `usage: ${program} <command> [options]`,
    `       ${program} <command> --help`,
    `       ${program} --version`,
    '',
    ...wrap(blurb, 78, ''),
    '',
    'commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}${wrap(c.summary, 76 - width, ' '.repeat(width + 2)).join('\n')}`),
    '',
    'exit status: 0 success, 1 failure, 2 usage error (a bad or missing option); doctor adds 3.',
  ].join('\n')}\n`
}
