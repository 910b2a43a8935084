// `userfaultfd report`'s page: one self-contained HTML file (inline CSS and SVG, no script, no
// network) with a summary of a fault trace and its three charts (./charts.ts).
import type { FaultKind } from '../engines/fault-trace'
import { KIND_COLORS, escapeXml, heatmapChart, latencyChart, presentChart, quantile } from './charts'
import type { FaultTraceData } from './trace-file'

const KIND_TEXT: Record<FaultKind, string> = {
  demand: 'faults served from the source (the page and the window after it)',
  around: 'pages filled before a faulting page, after its thread was woken',
  prefetch: 'pages filled in the background',
  zero: 'faults served as zeros (removed pages, or outside every served range)',
}

const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 3 : 1)

/** The report page for `data`; `title` names the trace (its file name). */
export function reportHtml(data: FaultTraceData, title: string): string {
  const { faults } = data
  const t0 = faults[0]?.ts ?? 0 // sorted by ts (no spread: a trace may hold millions)
  const tEnd = faults.reduce((m, f) => Math.max(m, f.ts + f.dur), t0)
  const spanS = (tEnd - t0) / 1e6
  const waits = faults.filter((f) => f.kind === 'demand' || f.kind === 'zero').map((f) => f.dur)
  const sortedWaits = [...waits].sort((a, b) => a - b)
  const threads = new Set(faults.filter((f) => f.tid !== 0).map((f) => f.tid))
  const rows = (['demand', 'around', 'prefetch', 'zero'] as const).map((k) => {
    const of = faults.filter((f) => f.kind === k)
    const bytes = of.reduce((n, f) => n + f.bytes, 0)
    return `<tr><td><span class="swatch" style="background:${KIND_COLORS[k]}"></span>${k}</td><td>${of.length}</td><td>${mib(bytes)}</td><td>${KIND_TEXT[k]}</td></tr>`
  })
  const totalBytes = faults.reduce((n, f) => n + f.bytes, 0)
  const warnings = [
    data.incomplete ? 'The trace file was cut short (its writer did not close it): this is what it holds.' : '',
    data.dropped > 0 ? `${data.dropped} record(s) were dropped (the server recorded faster than it drained).` : '',
    faults.length === 0 ? 'The trace holds no faults: nothing to draw.' : '',
  ].filter(Boolean)
  const q = (p: number): string => quantile(sortedWaits, p).toFixed(1)
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="userfaultfd report">
<title>Restore: ${escapeXml(title)}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 800px; color: #222; padding: 0 12px; }
h1 { font-size: 20px; margin-bottom: 4px; } h2 { font-size: 16px; margin: 28px 0 4px; }
p.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { font-weight: 600; border-bottom: 1px solid #ccc; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
.warn { background: #fff4d6; border: 1px solid #e8c66a; padding: 6px 10px; border-radius: 4px; }
svg { max-width: 100%; height: auto; }
svg .tick { font-size: 11px; fill: #444; } svg .small { font-size: 9px; } svg .axis-label { font-size: 12px; fill: #222; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; } dt { color: #666; } dd { margin: 0; }
</style>
</head>
<body>
<h1>Restore: ${escapeXml(title)}</h1>
<p class="sub">Every fault a userfaultfd server served, from its trace (open the same file in <a href="https://ui.perfetto.dev">Perfetto</a> for each event).</p>
${warnings.map((w) => `<p class="warn">${escapeXml(w)}</p>`).join('\n')}
<dl id="summary">
<dt>faults</dt><dd data-summary="faults">${waits.length}</dd>
<dt>memory put in place</dt><dd>${mib(totalBytes)} MiB</dd>
<dt>duration</dt><dd>${spanS.toFixed(3)} s</dd>
<dt>wait p50 / p90 / p99 / max</dt><dd>${q(0.5)} / ${q(0.9)} / ${q(0.99)} / ${(sortedWaits[sortedWaits.length - 1] ?? 0).toFixed(1)} µs</dd>
<dt>faulting threads</dt><dd>${threads.size > 0 ? threads.size : 'unknown (the uffd was opened without Feature.THREAD_ID)'}</dd>
</dl>
<table>
<tr><th>kind</th><th>events</th><th>MiB</th><th>what</th></tr>
${rows.join('\n')}
</table>
<h2>Memory present over time</h2>
${presentChart(faults, t0, spanS)}
<h2>Fault waits</h2>
${latencyChart(waits)}
<h2>Fault addresses over time</h2>
<p class="sub">Each cell: the faults at those addresses in that interval (darker: more).</p>
${heatmapChart(faults, t0, spanS)}
</body>
</html>
`
}
