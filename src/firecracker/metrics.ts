// A FirecrackerHandler's metrics as Prometheus text (`userfaultfd serve --metrics-port`): the
// handler's totals, per connection (VM) what it was served, and, where the handler serves
// connections with FaultServers, their per-range metrics (blocked time, pages by class, stage
// histograms) labelled with the connection.
import { faultServerMetrics, type ServerMetricsSource } from '../engines/fault-metrics'
import { type Family, type Sample, exposition } from '../util/prometheus'

// What this needs of the handler, structurally (as observe.ts does: no cycle back to handler.ts).
interface Counts {
  faults: number
  pagesServed: number
  bytesServed: number
  zeroPages: number
  removes: number
}

export interface MetricsHandler {
  stats(): Counts & { connections: { active: number; total: number; failed: number } }
  connections(): Array<Counts & { id: number; peer: { pid: number } }>
  /** the FaultServers serving connections now, with labels naming their connection */
  metricsSources?(): ServerMetricsSource[]
}

/** The Prometheus text of `handler`'s metrics (metric names prefixed `prefix`, default 'userfaultfd'). */
export function handlerMetrics(handler: MetricsHandler, prefix = 'userfaultfd'): string {
  const fam = (name: string, type: 'counter' | 'gauge', help: string): Family & { samples: Sample[] } => ({
    name: `${prefix}_serve_${name}`,
    help,
    type,
    samples: [],
  })
  const active = fam('connections', 'gauge', 'Connections (VMs) served now.')
  const total = fam('connections_total', 'counter', 'Connections accepted since the start.')
  const failed = fam('connections_failed_total', 'counter', 'Connections ended by an error.')
  const faults = fam('faults_total', 'counter', 'Fault messages read, by connection (open ones) and in all.')
  const pages = fam('pages_served_total', 'counter', 'Pages copied from the memory file.')
  const bytes = fam('bytes_served_total', 'counter', 'Bytes copied from the memory file.')
  const zero = fam('zero_pages_total', 'counter', 'Zero pages served (after UFFD_EVENT_REMOVE).')
  const removes = fam('removes_total', 'counter', 'UFFD_EVENT_REMOVE events (balloon, MADV_DONTNEED).')
  const counts = (labels: Record<string, string>, c: Counts): void => {
    faults.samples.push({ labels, value: c.faults })
    pages.samples.push({ labels, value: c.pagesServed })
    bytes.samples.push({ labels, value: c.bytesServed })
    zero.samples.push({ labels, value: c.zeroPages })
    removes.samples.push({ labels, value: c.removes })
  }
  const st = handler.stats()
  active.samples.push({ labels: {}, value: st.connections.active })
  total.samples.push({ labels: {}, value: st.connections.total })
  failed.samples.push({ labels: {}, value: st.connections.failed })
  counts({ connection: 'all' }, st)
  for (const c of handler.connections()) counts({ connection: String(c.id), pid: String(c.peer.pid) }, c)
  const servers = handler.metricsSources?.() ?? []
  return (
    exposition([active, total, failed, faults, pages, bytes, zero, removes]) +
    (servers.length > 0 ? faultServerMetrics(servers, { prefix }) : '')
  )
}
