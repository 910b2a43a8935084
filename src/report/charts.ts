// The report's three charts as inline SVG (no script, no network): memory present over time by
// kind, the histogram of fault waits, and a heat map of fault addresses over time. Each chart is
// an <svg data-chart="..."> whose data marks carry class "datum" (what the browser test counts)
// and a <title> (the browser's tooltip).
import type { FaultKind } from '../engines/fault-trace'
import type { TracedFault } from './trace-file'

export const KIND_COLORS: Record<FaultKind, string> = {
  demand: '#d1495b',
  around: '#edae49',
  prefetch: '#00798c',
  zero: '#8d8d8d',
}

const W = 760
const H = 300
const M = { left: 64, right: 16, top: 16, bottom: 40 }
const PW = W - M.left - M.right
const PH = H - M.top - M.bottom

export function escapeXml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`)
}

const fmt = (v: number): string =>
  Number.isInteger(v) || Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2)

/** "Nice" tick values over [0, max]. */
function ticks(max: number, count = 5): number[] {
  if (!(max > 0)) return [0]
  const raw = max / count
  const mag = 10 ** Math.floor(Math.log10(raw))
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw) ?? raw
  const out: number[] = []
  for (let v = 0; v <= max * 1.0001; v += step) out.push(v)
  return out
}

function frame(chart: string, label: string, body: string, xLabel: string, yLabel: string): string {
  return `<svg data-chart="${chart}" role="img" aria-label="${escapeXml(label)}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg">
<rect x="${M.left}" y="${M.top}" width="${PW}" height="${PH}" fill="#fbfbfb" stroke="#ccc"/>
${body}
<text x="${M.left + PW / 2}" y="${H - 6}" text-anchor="middle" class="axis-label">${escapeXml(xLabel)}</text>
<text transform="translate(14 ${M.top + PH / 2}) rotate(-90)" text-anchor="middle" class="axis-label">${escapeXml(yLabel)}</text>
</svg>`
}

function xAxis(maxS: number, x: (s: number) => number): string {
  return ticks(maxS)
    .map(
      (t) =>
        `<line x1="${x(t)}" x2="${x(t)}" y1="${M.top + PH}" y2="${M.top + PH + 4}" stroke="#666"/><text x="${x(t)}" y="${M.top + PH + 16}" text-anchor="middle" class="tick">${fmt(t)}</text>`,
    )
    .join('')
}

/** Memory put in place over time: one cumulative line per kind, and their total. */
export function presentChart(faults: TracedFault[], t0: number, spanS: number): string {
  const kinds = (['demand', 'around', 'prefetch', 'zero'] as const).filter((k) => faults.some((f) => f.kind === k))
  // Points at each fill's end, bucketed to at most 600 steps per line.
  const ends = faults
    .map((f) => ({ s: (f.ts + f.dur - t0) / 1e6, kind: f.kind, bytes: f.bytes }))
    .sort((a, b) => a.s - b.s)
  const total = ends.reduce((n, e) => n + e.bytes, 0)
  const maxMiB = Math.max(total / 2 ** 20, 1e-6)
  const span = Math.max(spanS, ends[ends.length - 1]?.s ?? 0, 1e-6)
  const x = (s: number): number => M.left + (s / span) * PW
  const y = (mib: number): number => M.top + PH - (mib / maxMiB) * PH
  const steps = 600
  const series: Array<{ name: string; color: string; pick: (k: FaultKind) => boolean }> = [
    ...kinds.map((k) => ({ name: k, color: KIND_COLORS[k], pick: (kind: FaultKind) => kind === k })),
    { name: 'total', color: '#222', pick: () => true },
  ]
  const lines = series.map(({ name, color, pick }) => {
    let sum = 0
    let at = 0
    const pts: string[] = [`${x(0).toFixed(1)},${y(0).toFixed(1)}`]
    for (let i = 1; i <= steps; i++) {
      const until = (span * i) / steps
      while (at < ends.length && ends[at].s <= until) {
        if (pick(ends[at].kind)) sum += ends[at].bytes
        at++
      }
      pts.push(`${x(until).toFixed(1)},${y(sum / 2 ** 20).toFixed(1)}`)
    }
    const width = name === 'total' ? 2.5 : 1.5
    return `<path class="datum" data-series="${name}" d="M${pts.join('L')}" fill="none" stroke="${color}" stroke-width="${width}"><title>${name}: ${fmt(sum / 2 ** 20)} MiB</title></path>`
  })
  const yTicks = ticks(maxMiB)
    .map(
      (t) =>
        `<line x1="${M.left - 4}" x2="${M.left + PW}" y1="${y(t)}" y2="${y(t)}" stroke="#eee"/><text x="${M.left - 6}" y="${y(t) + 4}" text-anchor="end" class="tick">${fmt(t)}</text>`,
    )
    .join('')
  const legend = series
    .map(
      (s, i) =>
        `<g transform="translate(${M.left + 10 + i * 90} ${M.top + 12})"><rect width="12" height="4" y="-4" fill="${s.color}"/><text x="16" y="0" class="tick">${s.name}</text></g>`,
    )
    .join('')
  return frame(
    'present',
    'Memory present over time',
    `${yTicks}${xAxis(span, x)}${lines.join('\n')}${legend}`,
    'seconds since the first fault',
    'MiB present (put in place by the server)',
  )
}

/** Bucket edges in µs: 4 per power of two from 1 µs. */
function latencyEdges(max: number): number[] {
  const edges = [0, 1]
  while (edges[edges.length - 1] < max) edges.push(edges[edges.length - 1] * 2 ** 0.25)
  return edges
}

export function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0
  return sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1) + 0.5))]
}

/** Histogram of the waits of faults (demand, zero): log-scaled buckets, a bar per bucket. */
export function latencyChart(waitsUs: number[]): string {
  const sorted = [...waitsUs].sort((a, b) => a - b)
  const edges = latencyEdges(Math.max(sorted[sorted.length - 1] ?? 1, 2))
  const counts = new Array<number>(edges.length - 1).fill(0)
  let b = 0
  for (const v of sorted) {
    while (b < counts.length - 1 && v >= edges[b + 1]) b++
    counts[b]++
  }
  const maxCount = Math.max(...counts, 1) * 1.1 // headroom for the quantile labels
  const bw = PW / counts.length
  const y = (c: number): number => M.top + PH - (c / maxCount) * PH
  const bars = counts
    .map((c, i) =>
      c === 0
        ? ''
        : `<rect class="datum" x="${(M.left + i * bw + 0.5).toFixed(1)}" y="${y(c).toFixed(1)}" width="${Math.max(bw - 1, 1).toFixed(1)}" height="${(M.top + PH - y(c)).toFixed(1)}" fill="${KIND_COLORS.demand}"><title>${fmt(edges[i])}–${fmt(edges[i + 1])} µs: ${c} fault(s)</title></rect>`,
    )
    .join('')
  const xTicks: string[] = []
  for (let i = 1; i < edges.length; i += 4) {
    const xx = M.left + i * bw
    xTicks.push(
      `<line x1="${xx}" x2="${xx}" y1="${M.top + PH}" y2="${M.top + PH + 4}" stroke="#666"/><text x="${xx}" y="${M.top + PH + 16}" text-anchor="middle" class="tick">${fmt(edges[i])}</text>`,
    )
  }
  const yTicks = ticks(maxCount)
    .map((t) => `<text x="${M.left - 6}" y="${y(t) + 4}" text-anchor="end" class="tick">${t}</text>`)
    .join('')
  const marks = (
    [
      ['p50', 0.5],
      ['p99', 0.99],
    ] as const
  )
    .map(([name, q], k) => {
      const v = quantile(sorted, q)
      const i = edges.findIndex((_e, j) => j + 1 < edges.length && v < edges[j + 1])
      const xx = M.left + (Math.max(i, 0) + 0.5) * bw
      return `<line x1="${xx}" x2="${xx}" y1="${M.top}" y2="${M.top + PH}" stroke="#333" stroke-dasharray="4 3"/><text x="${xx + 3}" y="${M.top + 12 + k * 14}" class="tick">${name} ${fmt(v)} µs</text>`
    })
    .join('')
  return frame(
    'latency',
    'Fault wait histogram',
    `${yTicks}${xTicks.join('')}${bars}${sorted.length > 0 ? marks : ''}`,
    'wait from the fault read to its page in place, µs (log scale)',
    'faults',
  )
}

// Address space is mostly empty between mappings: the heat map's rows cover only the spans
// where faults are, stacked, so that two mappings far apart both get rows.
const GAP = 64n << 20n

interface Span {
  start: bigint
  end: bigint
  /** rows before this span */
  offset: number
}

function addressSpans(addresses: bigint[], pageBytes: bigint): { spans: Span[]; total: number } {
  const sorted = [...new Set(addresses)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
  const spans: Span[] = []
  let total = 0
  for (const a of sorted) {
    const last = spans[spans.length - 1]
    if (last !== undefined && a - last.end <= GAP) last.end = a + pageBytes
    else spans.push({ start: a, end: a + pageBytes, offset: 0 })
  }
  for (const s of spans) {
    s.offset = total
    total += Number(s.end - s.start)
  }
  return { spans, total }
}

/** Fault addresses (rows) over time (columns); a cell's color is how many faults it holds. */
export function heatmapChart(faults: TracedFault[], t0: number, spanS: number): string {
  const points = faults.filter((f) => f.kind === 'demand' || f.kind === 'zero')
  const cols = 80
  const rows = 48
  const { spans, total } = addressSpans(
    points.map((f) => f.address),
    4096n,
  )
  const span = Math.max(spanS, 1e-6)
  const grid = new Map<number, number>()
  for (const f of points) {
    const s = spans.find((sp) => f.address >= sp.start && f.address < sp.end)
    if (s === undefined) continue
    const pos = s.offset + Number(f.address - s.start)
    const r = Math.min(rows - 1, Math.floor((pos / Math.max(total, 1)) * rows))
    const c = Math.min(cols - 1, Math.floor(((f.ts - t0) / 1e6 / span) * cols))
    grid.set(r * cols + c, (grid.get(r * cols + c) ?? 0) + 1)
  }
  const max = Math.max(...grid.values(), 1)
  const cw = PW / cols
  const rh = PH / rows
  const cells = [...grid]
    .map(([k, n]) => {
      const r = Math.floor(k / cols)
      const c = k % cols
      const heat = Math.log1p(n) / Math.log1p(max) // 0..1
      const light = Math.round(92 - heat * 62)
      return `<rect class="datum" x="${(M.left + c * cw).toFixed(1)}" y="${(M.top + PH - (r + 1) * rh).toFixed(1)}" width="${cw.toFixed(2)}" height="${rh.toFixed(2)}" fill="hsl(${Math.round(45 - heat * 45)} 90% ${light}%)"><title>${n} fault(s)</title></rect>`
    })
    .join('')
  const labels = spans
    .slice(0, 8)
    .map((s) => {
      const yy = M.top + PH - (s.offset / Math.max(total, 1)) * PH
      return `<line x1="${M.left}" x2="${M.left + PW}" y1="${yy}" y2="${yy}" stroke="#bbb" stroke-dasharray="2 2"/><text x="${M.left + PW - 4}" y="${yy - 3}" text-anchor="end" class="tick small">0x${s.start.toString(16)}</text>`
    })
    .join('')
  const x = (s: number): number => M.left + (s / span) * PW
  return frame(
    'heatmap',
    'Fault addresses over time',
    `${cells}${labels}${xAxis(span, x)}`,
    'seconds since the first fault',
    'address (gaps between mappings removed)',
  )
}
