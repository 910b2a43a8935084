// The CLI's building blocks, in process: option tables and their parser, help rendering, the
// latency histogram the demo sends instead of raw samples, and progress lines.
import { describe, expect, it } from 'vitest'
import { PassThrough } from 'node:stream'
import { UsageError, commandHelp, defineCommand, parseCommand, suggest } from '../src/cli/command'
import { choice, flag, int, ints, mebibytes, text } from '../src/cli/options'
import { Progress, formatDuration, rateAndEta } from '../src/cli/progress'
import { createLogger } from '../src/cli/log'
import { LatencyHistogram } from '../src/util/histogram'

const command = defineCommand({
  name: 'try',
  summary: 'a command for tests',
  synopsis: '--name NAME [options]',
  description: 'First paragraph.\n\nSecond paragraph.',
  options: {
    name: text({ value: 'NAME', required: true, help: 'a name.' }),
    label: text({ value: 'TEXT', help: 'an optional label.', short: 'l' }),
    count: int({ value: 'N', min: 1, max: 10, default: 3, help: 'how many.' }),
    limit: int({ value: 'N', min: 0, max: 5, help: 'an optional limit.' }),
    mode: choice({ value: 'MODE', values: ['fast', 'slow'] as const, default: 'fast', help: 'how.' }),
    uid: ints({ value: 'UID', min: 0, max: 100, help: 'uids.' }),
    size: mebibytes({ value: 'MIB', min: 1, max: 4096, default: 64, help: 'a size.' }),
    verbose: flag({ help: 'say more.', short: 'v' }),
  },
  run: () => 0,
})

function parse(args: string[]) {
  const r = parseCommand(command, args)
  if (r.help) throw new Error('help')
  return r.values
}

describe('option tables', () => {
  it('converts every kind of value, with defaults', () => {
    expect(parse(['--name', 'x'])).toEqual({
      name: 'x',
      label: undefined,
      count: 3,
      limit: undefined,
      mode: 'fast',
      uid: [],
      size: 64,
      verbose: false,
    })
    expect(
      parse([
        '--name=y',
        '-l',
        'lab',
        '--count',
        '10',
        '--limit=0',
        '--mode',
        'slow',
        '--uid',
        '1',
        '--uid=2',
        '--size',
        '2G',
        '-v',
        '--',
      ]),
    ).toEqual({ name: 'y', label: 'lab', count: 10, limit: 0, mode: 'slow', uid: [1, 2], size: 2048, verbose: true })
    for (const [raw, mib] of [
      ['512', 512],
      ['512M', 512],
      ['512MiB', 512],
      ['1g', 1024],
      ['4GiB', 4096],
    ] as const)
      expect(parse(['--name', 'x', '--size', raw]).size).toBe(mib)
  })

  it('--help and -h win over everything after them', () => {
    expect(parseCommand(command, ['--help'])).toEqual({ help: true })
    expect(parseCommand(command, ['-h', '--nonsense'])).toEqual({ help: true })
  })

  it.each([
    [['--name', 'x', '--count', '11'], /^--count must be an integer 1\.\.10 \(got '11'\)$/],
    [['--name', 'x', '--count', '1.5'], /^--count must be an integer/],
    [['--name', 'x', '--count', '0x3'], /^--count must be an integer/],
    [['--name', 'x', '--count', ' 3'], /^--count must be an integer/],
    [['--name', 'x', '--count', '99999999999999999999'], /^--count must be an integer/],
    [['--name', 'x', '--mode', 'medium'], /^--mode must be fast or slow \(got 'medium'\)$/],
    [['--name', 'x', '--uid', '1', '--uid', 'x'], /^--uid must be an integer 0\.\.100 \(got 'x'\)$/],
    [['--name', 'x', '--uid='], /^--uid needs a value, not an empty string$/],
    [['--name', 'x', '--size', '5G'], /^--size must be a size from 1 to 4096 MiB/],
    [['--name', 'x', '--size', '1.5G'], /^--size must be a size/],
    [['--name', 'x', '--verbose=no'], /^--verbose takes no value \(got 'no'\)$/],
    [['--name', 'x', '-x'], /^unknown option -x$/],
    [['--name', 'x', '--cont', '2'], /^unknown option --cont \(did you mean --count\?\)$/],
    [['--name', 'x', 'extra'], /^unexpected argument 'extra' \(try takes only options\)$/],
    [['--name', 'x', '--', 'extra'], /^unexpected argument 'extra'/],
    [['--label', 'x'], /^missing --name NAME \(required\)$/],
    [['--name'], /^--name needs a value \(NAME\)$/],
    [['--name', '-v'], /^--name needs a value, got the option '-v' \(write --name=-v if that is the value\)$/],
    [['--name', 'a', '--name', 'b'], /^--name given twice \('a', then 'b'\)$/],
  ])('%j: %s', (args, message) => {
    expect(() => parse(args)).toThrow(UsageError)
    expect(() => parse(args)).toThrow(message)
  })

  it('a value starting with a dash is taken inline', () => {
    expect(parse(['--name=-v']).name).toBe('-v')
  })

  it('suggests only close names', () => {
    expect(suggest('socet', ['socket', 'source'])).toBe(' (did you mean --socket?)')
    expect(suggest('mem', ['mem-file', 'json'])).toBe(' (did you mean --mem-file?)')
    expect(suggest('zzz', ['socket', 'json'])).toBe('')
  })

  it('help shows the synopsis, every paragraph, each option with its value, default and kind', () => {
    const help = commandHelp('prog', command)
    expect(help).toMatch(
      /^usage: prog try --name NAME \[options\]\n\nFirst paragraph\.\n\nSecond paragraph\.\n\noptions:\n/,
    )
    expect(help).toMatch(/^ {2}--name NAME +a name\. \(required\)$/m)
    expect(help).toMatch(/^ {2}-l, --label TEXT +an optional label\.$/m)
    expect(help).toMatch(/^ {2}--count N +how many\. \(default: 3\)$/m)
    expect(help).toMatch(/^ {2}--mode MODE +how\. One of: fast, slow\. \(default: fast\)$/m)
    expect(help).toMatch(/^ {2}--uid UID +uids\. \(repeatable\)$/m)
    expect(help).toMatch(/^ {2}-h, --help +show this help$/m)
    for (const line of help.split('\n')) expect(line.length).toBeLessThanOrEqual(100)
  })
})

describe('LatencyHistogram', () => {
  it('quantiles within one bucket (~9%) of the exact ones; merge and JSON keep every sample', () => {
    const samples = Array.from({ length: 10_000 }, (_, i) => 1000 + ((i * 7919) % 100_000) * 13)
    const a = new LatencyHistogram()
    const b = new LatencyHistogram()
    for (const [i, s] of samples.entries()) (i % 2 ? a : b).record(s)
    const all = LatencyHistogram.fromJSON(JSON.parse(JSON.stringify(a.toJSON()))).merge(b)
    expect(all.count).toBe(samples.length)
    const sorted = [...samples].sort((x, y) => x - y)
    for (const q of [0.5, 0.9, 0.99, 1]) {
      const exact = sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1)))]
      expect(all.quantile(q)).toBeGreaterThanOrEqual(exact)
      expect(all.quantile(q)).toBeLessThanOrEqual(exact * 1.13)
    }
    expect(all.powersOfTwoUs().reduce((n, [, c]) => n + c, 0)).toBe(samples.length)
    expect(all.toJSON().buckets.length).toBeLessThan(100) // a few hundred bytes, whatever the sample count
  })

  it('labels powers of two of microseconds; empty is 0', () => {
    const h = new LatencyHistogram()
    expect(h.quantile(0.5)).toBe(0)
    h.record(500) // 0.5 us
    h.record(1500) // 1.5 us
    h.record(40_000) // 40 us
    expect(h.powersOfTwoUs()).toEqual([
      ['<1', 1],
      ['1-2', 1],
      ['32-64', 1],
    ])
    expect(() => h.merge({ count: 1, buckets: [[9999, 1]] })).toThrow(RangeError)
  })
})

describe('progress and logs', () => {
  it('rate, ETA and durations', () => {
    expect(rateAndEta(0, 0, 50, 1000, 100)).toEqual({ perSecond: 50, etaSeconds: 1 })
    expect(rateAndEta(10, 0, 10, 1000, 100)).toEqual({ perSecond: 0, etaSeconds: undefined })
    expect(rateAndEta(0, 0, 100, 1000, 100).etaSeconds).toBe(0)
    expect(formatDuration(undefined)).toBe('?')
    expect(formatDuration(0.42)).toBe('0.4 s')
    expect(formatDuration(42)).toBe('42 s')
    expect(formatDuration(200)).toBe('3 min 20 s')
    expect(formatDuration(3900)).toBe('1 h 5 min')
  })

  it('without a terminal: the first line at once, then at most one per interval, and the last', () => {
    const out = new PassThrough()
    let text = ''
    out.on('data', (d) => {
      text += d
    })
    const p = new Progress(out, 'copying', 1000, { tty: false, intervalMs: 60_000, noun: 'pages' })
    p.update(0)
    p.update(10)
    p.update(20)
    p.end()
    p.end()
    const lines = text.trimEnd().split('\n')
    expect(lines).toHaveLength(2)
    expect(lines[0]).toMatch(/^copying: 0\.0% 0\/1000 pages, 0 pages\/s, ETA \?$/)
    expect(lines[1]).toMatch(/^copying: 100\.0% 1000\/1000 pages, \d+ pages\/s, in [\d.]+ s$/)
  })

  it('on a terminal: one line rewritten in place', () => {
    const out = new PassThrough()
    let text = ''
    out.on('data', (d) => {
      text += d
    })
    const p = new Progress(out, 'writing', 2 << 20, { tty: true, unit: 'bytes' })
    p.update(1 << 20)
    p.end()
    const [first, second] = text.split('\x1b[K')
    expect(first).toMatch(/^\rwriting: 50\.0% 1\.0\/2\.0 MiB, [\d.]+ MiB\/s, ETA .+$/)
    expect(second).toMatch(/^\rwriting: 100\.0% 2\.0\/2\.0 MiB/)
    expect(text.endsWith('\x1b[K\n')).toBe(true)
  })

  it('log lines: text with an ISO timestamp; JSON with time, level, scope, msg and fields', () => {
    const out = new PassThrough()
    let text = ''
    out.on('data', (d) => {
      text += d
    })
    const at = () => new Date('2025-01-02T03:04:05.678Z')
    createLogger('text', 'scope', out, at).log('info', 'hello', { n: 1 })
    createLogger('text', 'scope', out, at).log('warn', 'careful')
    createLogger('json', 'scope', out, at).log('error', 'broken', { event: 'x', address: 0x1000n })
    expect(text.split('\n')).toEqual([
      '2025-01-02T03:04:05.678Z scope: hello',
      '2025-01-02T03:04:05.678Z scope WARN: careful',
      '{"time":"2025-01-02T03:04:05.678Z","level":"error","scope":"scope","msg":"broken","event":"x","address":"0x1000"}',
      '',
    ])
  })
})
