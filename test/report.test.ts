// `userfaultfd report FILE`: a real fault trace (a FaultServer serving two native threads, a
// prefetched range and an unserved one) drawn as an HTML page, which Debian's headless Chromium
// then renders: its DOM has the three charts with data, and its pixels show them. Bad input:
// clear errors, exit 2.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { FaultServer, Feature, Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { KIND_COLORS } from '../src/report/charts'
import { parseFaultTrace } from '../src/report/trace-file'
import { pages, touch } from '../src/testing'
import { dist, killChildren, runCommand, runNode } from './helpers/children'
import { randomContent, until, within } from './helpers/fault-server'
import { countColor, countInk, readPng } from './helpers/png'
import { timeScale } from './helpers/children'

const cli = path.join(dist, 'cli', 'index.js')
let dir: string
let traceFile: string
let faults: number

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-report-'))
  traceFile = path.join(dir, 'restore.json')
  const m = Mapping.anonymous(1024 * PAGE_SIZE)
  const pre = Mapping.anonymous(256 * PAGE_SIZE)
  const unserved = Mapping.anonymous(8 * PAGE_SIZE)
  const uffd = Userfaultfd.open({ features: Feature.THREAD_ID })
  const server = new FaultServer(uffd, { faultAround: 4 * PAGE_SIZE, trace: traceFile })
  server.on('error', () => {}) // the unserved range's faults are reported (and served as zeros)
  try {
    server.serve(m, { buffer: randomContent(m.length) })
    server.serve(pre, { buffer: randomContent(pre.length) }, { prefetch: true })
    uffd.register(unserved, { missing: true })
    await within(touch(pages(m).reverse(), { threads: 2 }), 15_000, 'touch')
    await within(touch(pages(unserved), { threads: 1 }), 15_000, 'touch unserved')
    await within(server.drained(), 10_000, 'drained')
    await until(() => server.stats().zeroPages >= 8, 5000, 'zero pages counted')
    faults = server.stats().faults
  } finally {
    server.close()
    uffd.close()
    for (const x of [m, pre, unserved]) x.unmap()
  }
}, 60_000 * timeScale)
afterEach(() => killChildren())
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

/** The sum of the "N fault(s)" tooltips of one chart's data marks. */
function faultsIn(svg: string): number {
  return [...svg.matchAll(/class="datum"[^>]*>\s*<title>[^<]*?(\d+) fault\(s\)<\/title>/g)].reduce(
    (n, m) => n + Number(m[1]),
    0,
  )
}

function chart(html: string, name: string): string {
  const m = new RegExp(`<svg[^>]*data-chart="${name}"[\\s\\S]*?</svg>`).exec(html)
  if (m === null) throw new Error(`no ${name} chart in the page`)
  return m[0]
}

describe('userfaultfd report', () => {
  it('writes a self-contained page whose three charts hold the trace', async () => {
    const out = path.join(dir, 'page.html')
    const r = await runNode([cli, 'report', traceFile, '-o', out])
    expect(r.stderr).toMatch(new RegExp(`page\\.html \\(${faults} fault\\(s\\)\\)`))
    expect(r.code).toBe(0)
    const html = fs.readFileSync(out, 'utf8')
    expect(html).not.toMatch(/<script|<link|src=|url\(/) // nothing to fetch, nothing to run
    expect(html).toContain(`<dd data-summary="faults">${faults}</dd>`)
    const present = chart(html, 'present')
    for (const s of ['demand', 'around', 'prefetch', 'zero', 'total'])
      expect(present).toMatch(new RegExp(`<path class="datum" data-series="${s}" d="M[^"]+"`))
    expect(faultsIn(chart(html, 'latency'))).toBe(faults)
    expect(faultsIn(chart(html, 'heatmap'))).toBe(faults)
    // The default output name, and stdout.
    const copy = path.join(dir, 'again.json')
    fs.copyFileSync(traceFile, copy)
    expect((await runNode([cli, 'report', copy])).code).toBe(0)
    expect(fs.existsSync(path.join(dir, 'again.html'))).toBe(true)
    const toStdout = await runNode([cli, 'report', traceFile, '-o', '-'])
    expect(toStdout.code).toBe(0)
    expect(toStdout.stdout).toBe(html)
  })

  it("renders in Debian's headless Chromium: the DOM has the charts, the pixels show their data", {
    timeout: 120_000 * timeScale,
  }, async (ctx) => {
    const chromium = ['chromium', 'chromium-browser', 'google-chrome']
      .flatMap((b) => process.env.PATH?.split(':').map((d) => path.join(d, b)) ?? [])
      .find((p) => fs.existsSync(p))
    if (chromium === undefined) {
      console.warn('report.test: no chromium in PATH (apt-get install chromium): the page is not rendered')
      ctx.skip()
      return
    }
    const out = path.join(dir, 'render.html')
    expect((await runNode([cli, 'report', traceFile, '-o', out])).code).toBe(0)
    const flags = [
      '--headless',
      '--no-sandbox', // root, and no user namespaces needed
      '--disable-gpu',
      '--hide-scrollbars',
      `--user-data-dir=${path.join(dir, 'chromium-profile')}`,
    ]
    // Chromium without what test:asan preloads into node and its children (libasan).
    const { LD_PRELOAD: _preload, ASAN_OPTIONS: _asan, UBSAN_OPTIONS: _ubsan, ...env } = process.env
    const dom = await runCommand(chromium, [...flags, '--dump-dom', `file://${out}`], 60_000, undefined, [], env)
    expect(dom.code, dom.stderr).toBe(0)
    for (const name of ['present', 'latency', 'heatmap']) {
      const svg = chart(dom.stdout, name)
      expect((svg.match(/class="datum"/g) ?? []).length, name).toBeGreaterThan(name === 'present' ? 4 : 10)
    }
    expect(faultsIn(chart(dom.stdout, 'latency'))).toBe(faults)
    expect(faultsIn(chart(dom.stdout, 'heatmap'))).toBe(faults)

    const png = path.join(dir, 'page.png')
    const shot = await runCommand(
      chromium,
      [...flags, '--window-size=840,1500', `--screenshot=${png}`, `file://${out}`],
      60_000,
      undefined,
      [],
      env,
    )
    expect(shot.code, shot.stderr).toBe(0)
    const img = readPng(fs.readFileSync(png))
    expect([img.width, img.height]).toEqual([840, 1500])
    expect(countInk(img)).toBeGreaterThan(20_000) // text, axes, lines, bars, cells
    // The wait histogram's bars (a 10x10 swatch aside): thousands of pixels of their color.
    expect(countColor(img, KIND_COLORS.demand)).toBeGreaterThan(2000)
    // The heat map's cells: reds to yellows (hsl 0-45, 90%) that nothing else on the page uses.
    let heat = 0
    for (let i = 0; i < img.rgba.length; i += 4) {
      const [r, g, b] = [img.rgba[i], img.rgba[i + 1], img.rgba[i + 2]]
      if (r > 120 && r - b > 90 && b < 60 && g < r) heat++
    }
    expect(heat).toBeGreaterThan(300)
  })

  it('refuses what is not a fault trace: the message says what it is, exit 2', async () => {
    const cases: Array<[string, string | null, RegExp]> = [
      ['missing.json', null, /no such file/],
      ['text.json', 'hello', /not a trace-event file: it is not JSON/],
      ['object.json', '{"a":1}', /JSON without a traceEvents array/],
      [
        'other.json',
        '{"traceEvents":[{"name":"x","ph":"X","ts":1,"dur":1,"pid":1,"tid":1}]}',
        /no userfaultfd fault events/,
      ],
    ]
    for (const [name, content, message] of cases) {
      const file = path.join(dir, name)
      if (content !== null) fs.writeFileSync(file, content)
      const r = await runNode([cli, 'report', file])
      expect(r.stderr, name).toMatch(message)
      expect(r.code, name).toBe(2)
    }
    const usage = [
      [[], /missing FILE/],
      [[traceFile, traceFile], /takes one FILE/],
      [[dir], /a directory, not a trace file/],
      [[traceFile, '-o', path.join(dir, 'no', 'such', 'dir.html')], /--output: the directory .* does not exist/],
      [[traceFile, '-o', dir], /exists and is not a regular file/],
    ] as const
    for (const [args, message] of usage) {
      const r = await runNode([cli, 'report', ...args])
      expect(r.stderr, args.join(' ')).toMatch(message)
      expect(r.code, args.join(' ')).toBe(2)
    }
  })

  it('reads a trace cut short (its writer killed) as far as it goes, and says so', () => {
    const text = fs.readFileSync(traceFile, 'utf8')
    const cut = text.slice(0, Math.floor(text.length / 2))
    const whole = parseFaultTrace(text, 'whole')
    const half = parseFaultTrace(cut, 'half')
    expect(whole.incomplete).toBe(false)
    expect(half.incomplete).toBe(true)
    expect(half.faults.length).toBeGreaterThan(0)
    expect(half.faults.length).toBeLessThan(whole.faults.length)
    // The bare-array form of the format is read too.
    const events = JSON.parse(text).traceEvents
    expect(parseFaultTrace(JSON.stringify(events), 'array').faults).toEqual(whole.faults)
  })
})
