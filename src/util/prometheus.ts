// The Prometheus text exposition format (version 0.0.4), written by hand: metric families with
// HELP and TYPE lines, samples with escaped labels, and histograms from the package's own
// latency histograms (src/util/histogram.ts buckets, folded into a few `le` bounds). No
// dependency: the engine keeps its histograms pre-bucketed, which prom-client's Histogram (fed
// by observe()) cannot take, and the text concatenates with any other registry's output.

export type Labels = Record<string, string>

export interface Sample {
  labels: Labels
  value: number
}

/** A histogram's samples: cumulative counts per upper bound (seconds), sum (seconds), count. */
export interface HistogramSample {
  labels: Labels
  /** [upper bound in seconds, cumulative count], ascending; +Inf is added */
  buckets: Array<[number, number]>
  sum: number
  count: number
}

export type Family =
  | { name: string; help: string; type: 'counter' | 'gauge'; samples: Sample[] }
  | { name: string; help: string; type: 'histogram'; samples: HistogramSample[] }

/** Bucket bounds (seconds) for fault latencies: 1 µs to 10 s. */
export const LATENCY_BOUNDS_S = [
  1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1, 10,
]

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"')
}

function labelText(labels: Labels, extra?: [string, string]): string {
  const pairs = Object.entries(labels)
  if (extra) pairs.push(extra)
  if (pairs.length === 0) return ''
  return `{${pairs.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}`
}

function num(v: number): string {
  if (v === Number.POSITIVE_INFINITY) return '+Inf'
  if (v === Number.NEGATIVE_INFINITY) return '-Inf'
  return Number.isNaN(v) ? 'NaN' : String(v)
}

/** The text of `families` (families without samples are left out). */
export function exposition(families: Family[]): string {
  const lines: string[] = []
  for (const f of families) {
    if (f.samples.length === 0) continue
    lines.push(`# HELP ${f.name} ${f.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`)
    lines.push(`# TYPE ${f.name} ${f.type}`)
    if (f.type === 'histogram') {
      for (const s of f.samples) {
        for (const [le, n] of s.buckets) lines.push(`${f.name}_bucket${labelText(s.labels, ['le', num(le)])} ${n}`)
        lines.push(`${f.name}_bucket${labelText(s.labels, ['le', '+Inf'])} ${s.count}`)
        lines.push(`${f.name}_sum${labelText(s.labels)} ${num(s.sum)}`)
        lines.push(`${f.name}_count${labelText(s.labels)} ${s.count}`)
      }
    } else {
      for (const s of f.samples) lines.push(`${f.name}${labelText(s.labels)} ${num(s.value)}`)
    }
  }
  return lines.length === 0 ? '' : `${lines.join('\n')}\n`
}
