// A FaultServer's metrics as Prometheus text (server.metrics(), `userfaultfd serve --metrics-port`):
// per served range, faults, the time faulting threads spent blocked (QEMU's postcopy blocktime),
// pages by class, pages present, and a latency histogram per stage of serving a fault; per
// server, what is not a range's (faults outside every range, errors, the spin budget).
import type { EngineRangeMetrics, FaultEngineStats, FaultStage } from '../addon/binding'
import { cumulativeCounts } from '../util/histogram'
import {
  type Family,
  type HistogramSample,
  LATENCY_BOUNDS_S,
  type Labels,
  type Sample,
  exposition,
} from '../util/prometheus'

export interface MetricsOptions {
  /** added to every sample, e.g. { vm: 'a' } */
  labels?: Record<string, string>
  /** metric name prefix (default 'userfaultfd') */
  prefix?: string
}

/** One server's raw figures, with labels of its own (several servers on one metrics page). */
export interface ServerMetricsSource {
  stats: FaultEngineStats
  ranges: EngineRangeMetrics[]
  labels?: Labels
}

const STAGES: readonly FaultStage[] = ['read', 'source', 'fill', 'wake']
const BOUNDS_NS = LATENCY_BOUNDS_S.map((s) => Math.round(s * 1e9))

function histogram(
  labels: Labels,
  h: { count: number; sum: number; buckets: Array<[number, number]> },
): HistogramSample {
  const counts = cumulativeCounts(h.buckets, BOUNDS_NS)
  return {
    labels,
    buckets: LATENCY_BOUNDS_S.map((le, i) => [le, counts[i]] as [number, number]),
    sum: h.sum / 1e9,
    count: h.count,
  }
}

/** The Prometheus text of `servers`' metrics. */
export function faultServerMetrics(servers: ServerMetricsSource[], options: MetricsOptions = {}): string {
  const p = options.prefix ?? 'userfaultfd'
  const base = options.labels ?? {}
  const counter = (name: string, help: string): Family & { samples: Sample[] } => ({
    name: `${p}_${name}`,
    help,
    type: 'counter',
    samples: [],
  })
  const gauge = (name: string, help: string): Family & { samples: Sample[] } => ({
    name: `${p}_${name}`,
    help,
    type: 'gauge',
    samples: [],
  })
  const faults = counter('range_faults_total', 'Fault messages in a served range (one per blocked thread).')
  const blocked = counter(
    'range_blocked_seconds_total',
    "Time the range's faulting threads spent blocked, fault read to resolved, summed (postcopy blocktime).",
  )
  const pages = counter(
    'range_pages_total',
    'Pages by class: demand, around and prefetch (source bytes, by why), zero, removed (by MADV_DONTNEED/REMOVE), poisoned.',
  )
  const cached = counter('range_cached_pages_total', "mode 'minor': pages this range put into the page cache.")
  const sourceErrors = counter('range_source_errors_total', 'Fills that failed (the source, or the fill ioctl).')
  const present = gauge('range_pages_present', 'Pages present (or settled) in a served range.')
  const total = gauge('range_pages', 'Pages in a served range (of its own page size).')
  const stages: Family & { samples: HistogramSample[] } = {
    name: `${p}_fault_stage_seconds`,
    help: 'Time per stage of serving a fault: read (read(2) to handling), source (getting the bytes), fill (the resolving ioctl), wake (an explicit UFFDIO_WAKE).',
    type: 'histogram',
    samples: [],
  }
  const resolved: Family & { samples: HistogramSample[] } = {
    name: `${p}_fault_seconds`,
    help: 'Time from reading a fault to resolving it (how long its thread was blocked, as the server sees it).',
    type: 'histogram',
    samples: [],
  }
  const serverFaults = counter('faults_total', 'Fault messages read by the server.')
  const unhandled = counter(
    'unhandled_faults_total',
    'Faults outside every served range, or WP faults left to their waiter.',
  )
  const errors = counter('errors_total', "'error' events of the server.")
  const spin = gauge('spin_budget_seconds', 'The adaptive spin budget of the demand thread now.')
  for (const server of servers) {
    const sl = { ...base, ...server.labels }
    serverFaults.samples.push({ labels: sl, value: server.stats.faults })
    unhandled.samples.push({ labels: sl, value: server.stats.unhandled })
    errors.samples.push({ labels: sl, value: server.stats.errors })
    spin.samples.push({ labels: sl, value: server.stats.spinBudgetUs / 1e6 })
    for (const r of server.ranges) {
      const rl = { ...sl, range: `0x${r.address.toString(16)}`, mode: r.mode }
      faults.samples.push({ labels: rl, value: r.faults })
      blocked.samples.push({ labels: rl, value: r.blockedNs / 1e9 })
      for (const [cls, n] of Object.entries(r.pages)) pages.samples.push({ labels: { ...rl, class: cls }, value: n })
      if (r.mode === 'minor') cached.samples.push({ labels: rl, value: r.cachedPages })
      sourceErrors.samples.push({ labels: rl, value: r.sourceErrors })
      present.samples.push({ labels: rl, value: r.pagesPresent })
      total.samples.push({ labels: rl, value: r.pagesTotal })
      for (const stage of STAGES) stages.samples.push(histogram({ ...rl, stage }, r.stages[stage]))
      resolved.samples.push(histogram(rl, r.stages.total))
    }
  }
  return exposition([
    faults,
    blocked,
    pages,
    cached,
    sourceErrors,
    present,
    total,
    stages,
    resolved,
    serverFaults,
    unhandled,
    errors,
    spin,
  ])
}
