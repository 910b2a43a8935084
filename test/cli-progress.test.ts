// serve's progress output (a TTY line or JSON lines) and --mem-file locations (paths or URLs).
import { PassThrough } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { formatProgress, ProgressReporter } from '../src/cli/progress'
import { parseLocation } from '../src/sources/location'

const sample = { bytesPresent: 512 * 1048576, bytesTotal: 1024 * 1048576, faultsWaiting: 3, connections: 1 }

describe('serve progress', () => {
  it('formats a TTY line: present / total, rate, faults waiting', () => {
    const line = formatProgress(sample, 100 * 1048576, 'line', new Date(0))
    expect(line).toMatch(/^\r512\.0 \/ 1024\.0 MiB present \(50\.0%\), 100\.0 MiB\/s, 3 faults waiting, 1 VM/)
  })

  it('formats one JSON object per line otherwise', () => {
    const o = JSON.parse(formatProgress(sample, 2e6, 'json', new Date(1000)))
    expect(o).toEqual({
      time: '1970-01-01T00:00:01.000Z',
      event: 'progress',
      bytesPresent: sample.bytesPresent,
      bytesTotal: sample.bytesTotal,
      percent: 50,
      bytesPerSecond: 2000000,
      faultsWaiting: 3,
      connections: 1,
    })
  })

  it('reports the rate between reports, JSON when the stream is no TTY, and ends a TTY line on stop', () => {
    let t = 0
    let present = 0
    const out = new PassThrough()
    const chunks: string[] = []
    out.on('data', (d) => chunks.push(String(d)))
    const r = new ProgressReporter(() => ({ ...sample, bytesPresent: present }), out, { now: () => t, interval: 1e6 })
    expect(r.format).toBe('json')
    r.tick()
    t = 2000
    present = 4 * 1048576
    r.tick()
    r.stop()
    const lines = chunks
      .join('')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
    expect(lines.map((l) => l.bytesPerSecond)).toEqual([0, 2 * 1048576])
    const tty = Object.assign(new PassThrough(), { isTTY: true })
    const ttyOut: string[] = []
    tty.on('data', (d) => ttyOut.push(String(d)))
    const r2 = new ProgressReporter(() => sample, tty, { interval: 1e6 })
    r2.tick()
    r2.stop()
    expect(ttyOut.join('')).toMatch(/^\r.*\n$/s)
    expect(() => new ProgressReporter(() => sample, out, { interval: 0 })).toThrow(RangeError)
  })
})

describe('--mem-file locations', () => {
  it('tells paths from URLs', () => {
    expect(parseLocation('/snap/mem')).toEqual({ kind: 'file', path: '/snap/mem' })
    expect(parseLocation('snap.mem')).toEqual({ kind: 'file', path: 'snap.mem' })
    expect(parseLocation('weird:name')).toEqual({ kind: 'file', path: 'weird:name' })
    expect(parseLocation('file:///snap/m%20em')).toEqual({ kind: 'file', path: '/snap/m em' })
    expect(parseLocation('nbd://h:10809/e')).toEqual({ kind: 'nbd', url: 'nbd://h:10809/e' })
    expect(parseLocation('nbd+unix:///e?socket=/s')).toEqual({ kind: 'nbd', url: 'nbd+unix:///e?socket=/s' })
    expect(parseLocation('https://b/k?sig=1')).toEqual({ kind: 'http', url: 'https://b/k?sig=1' })
    expect(() => parseLocation('ftp://h/x')).toThrow(/unsupported snapshot URL/)
    expect(() => parseLocation('')).toThrow(TypeError)
    expect(() => parseLocation('file://host/x')).toThrow(/file: URL/)
  })
})
