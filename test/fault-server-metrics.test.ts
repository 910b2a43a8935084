// FaultServer metrics: per range, faults, the time faulting threads spent blocked (postcopy
// blocktime), pages by class and per-stage latencies in stats(), and the same figures in the
// Prometheus text format (server.metrics()), checked against each other and against what the
// faulting threads went through. Faults come from native threads.
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { handlerMetrics } from '../src/firecracker/metrics'
import { pages, touch } from '../src/testing'
import { closeAll, track, until, within } from './helpers/fault-server'
import { timeScale } from './helpers/children'

afterEach((ctx) => closeAll(ctx))

function setup(options: ConstructorParameters<typeof FaultServer>[1] = {}, length = 64 * PAGE_SIZE) {
  const uffd = track(Userfaultfd.open())
  const server = track(new FaultServer(uffd, options))
  const errors: Error[] = []
  server.on('error', (e) => errors.push(e))
  const m = track(Mapping.anonymous(length))
  return { uffd, server, errors, m }
}

/** The samples of `text`: metric name with labels -> value. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>()
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const at = line.lastIndexOf(' ')
    out.set(line.slice(0, at), Number(line.slice(at + 1)))
  }
  return out
}

describe('FaultServer metrics', () => {
  it('stats(): per range faults, blocked time, pages by class (demand, around), stage latencies', async () => {
    const { server, errors, m } = setup({ faultAround: 4 * PAGE_SIZE })
    server.serve(m, { buffer: new Uint8Array(m.length).fill(7) })
    // One fault per 4-page window: 16 demand pages, 48 brought around them.
    await within(touch(pages(m, 16, 4 * PAGE_SIZE), { threads: 1 }), 10_000, 'touch')
    // counters trail the wake-up of the faulting thread: wait for every one asserted below
    await until(
      () => {
        const r = server.stats().ranges[0]
        return r.faults === 16 && r.pages.demand === 16 && r.pages.around === 48 && r.stages.total.count === 16
      },
      5000,
      'faults counted',
    )
    const st = server.stats()
    expect(st.ranges).toHaveLength(1)
    const r = st.ranges[0]
    expect(r).toMatchObject({ address: m.address, length: m.length, pageSize: PAGE_SIZE, mode: 'missing' })
    expect(r.pages).toEqual({ demand: 16, around: 48, prefetch: 0, zero: 0, removed: 0, poisoned: 0 })
    expect(r.pagesPresent).toBe(64)
    expect(r.blockedUs).toBeGreaterThan(0)
    expect(r.stages.total.count).toBe(16)
    expect(r.stages.fill.count).toBe(16)
    // blocked time is the sum of the faults' read-to-resolved times
    expect(r.blockedUs).toBeGreaterThanOrEqual(r.stages.total.p50 * 8)
    expect(r.blockedUs).toBeLessThanOrEqual(r.stages.total.max * 16 * 1.1)
    expect(st.stages.total.count).toBe(16)
    expect(errors).toEqual([])
  })

  it('blocked time and the source stage show a slow source (a { handler } that takes 30 ms)', {
    timeout: 20_000 * timeScale,
  }, async () => {
    const { server, errors, m } = setup({ faultAround: PAGE_SIZE }, 4 * PAGE_SIZE)
    server.serve(m, {
      handler: async ({ length }) => {
        await new Promise((resolve) => setTimeout(resolve, 30))
        return new Uint8Array(length).fill(1)
      },
    })
    await within(touch(pages(m), { threads: 1 }), 10_000, 'touch')
    await until(
      () => server.stats().ranges[0].stages.total.count === 4 && server.stats().ranges[0].pages.demand === 4,
      5000,
      'faults counted',
    )
    const r = server.stats().ranges[0]
    expect(r.faults).toBe(4)
    expect(r.pages.demand).toBe(4)
    // 4 faults one after another, each blocked >= 30 ms (histogram buckets: ~9% resolution)
    expect(r.blockedUs).toBeGreaterThanOrEqual(4 * 30_000 * 0.9)
    expect(r.stages.source.p50).toBeGreaterThanOrEqual(30_000 * 0.9)
    expect(r.stages.total.p50).toBeGreaterThanOrEqual(r.stages.source.p50)
    expect(errors).toEqual([])
  })

  it('prefetched pages are counted as prefetch, not demand', async () => {
    const { server, m } = setup({ prefetch: true, faultAround: PAGE_SIZE })
    server.serve(m, { buffer: new Uint8Array(m.length).fill(3) })
    await within(server.drained(), 10_000, 'drained')
    await until(() => server.stats().ranges[0].pages.prefetch === 64, 5000, 'prefetch counted')
    expect(server.stats().ranges[0]).toMatchObject({ faults: 0, pagesPresent: 64 })
    expect(server.stats().ranges[0].pages.demand).toBe(0)
  })

  it('metrics(): Prometheus text with the same figures as stats(), per range and per stage', async () => {
    const { server, m } = setup({ faultAround: 2 * PAGE_SIZE })
    server.serve(m, { buffer: new Uint8Array(m.length).fill(9) })
    await within(touch(pages(m, 32, 2 * PAGE_SIZE), { threads: 2 }), 10_000, 'touch')
    await until(
      () => {
        const r = server.stats().ranges[0]
        return r.stages.total.count === 32 && r.pages.demand === 32 && r.pages.around === 32 && r.faults === 32
      },
      5000,
      'faults counted',
    )
    const text = server.metrics()
    const st = server.stats()
    const range = `range="0x${m.address.toString(16)}",mode="missing"`
    // Every family has HELP and TYPE lines before its samples.
    for (const name of [
      'userfaultfd_range_faults_total',
      'userfaultfd_range_blocked_seconds_total',
      'userfaultfd_range_pages_total',
      'userfaultfd_range_pages_present',
      'userfaultfd_fault_stage_seconds',
      'userfaultfd_fault_seconds',
      'userfaultfd_faults_total',
      'userfaultfd_spin_budget_seconds',
    ]) {
      expect(text).toMatch(new RegExp(`^# HELP ${name} .+\\n# TYPE ${name} (counter|gauge|histogram)$`, 'm'))
    }
    const s = samples(text)
    expect(s.get(`userfaultfd_range_faults_total{${range}}`)).toBe(32)
    expect(s.get(`userfaultfd_range_pages_total{${range},class="demand"}`)).toBe(32)
    expect(s.get(`userfaultfd_range_pages_total{${range},class="around"}`)).toBe(32)
    expect(s.get(`userfaultfd_range_pages_total{${range},class="poisoned"}`)).toBe(0)
    expect(s.get(`userfaultfd_range_pages_present{${range}}`)).toBe(64)
    expect(s.get(`userfaultfd_range_pages{${range}}`)).toBe(64)
    expect(s.get(`userfaultfd_range_blocked_seconds_total{${range}}`)).toBeCloseTo(st.ranges[0].blockedUs / 1e6, 9)
    expect(s.get('userfaultfd_faults_total')).toBe(st.faults)
    // Histograms: cumulative buckets, +Inf = count, and a sum in seconds.
    for (const stage of ['read', 'source', 'fill', 'wake']) {
      const prefix = `userfaultfd_fault_stage_seconds_bucket{${range},stage="${stage}",le="`
      const buckets = [...s].filter(([k]) => k.startsWith(prefix))
      expect(buckets.length).toBeGreaterThan(10)
      for (let i = 1; i < buckets.length; i++) expect(buckets[i][1]).toBeGreaterThanOrEqual(buckets[i - 1][1])
      expect(buckets.at(-1)![0]).toBe(`${prefix}+Inf"}`)
      expect(buckets.at(-1)![1]).toBe(s.get(`userfaultfd_fault_stage_seconds_count{${range},stage="${stage}"}`))
    }
    expect(s.get(`userfaultfd_fault_stage_seconds_count{${range},stage="fill"}`)).toBe(32)
    expect(s.get(`userfaultfd_fault_seconds_count{${range}}`)).toBe(32)
    expect(s.get(`userfaultfd_fault_seconds_bucket{${range},le="10"}`)).toBe(32)
    const sum = s.get(`userfaultfd_fault_seconds_sum{${range}}`)!
    expect(sum).toBeGreaterThan(0)
    expect(sum).toBeCloseTo(st.ranges[0].blockedUs / 1e6, 6)
  })

  it('metrics({ labels, prefix }): labels on every sample (escaped), another name prefix; closed: empty', () => {
    const { server, m } = setup()
    server.serve(m, { zero: true })
    const text = server.metrics({ labels: { vm: 'a "b"\\c\nd' }, prefix: 'fc' })
    const lines = text.split('\n').filter((l) => l !== '' && !l.startsWith('#'))
    expect(lines.length).toBeGreaterThan(20)
    for (const line of lines) {
      expect(line).toMatch(/^fc_/)
      expect(line).toContain('vm="a \\"b\\"\\\\c\\nd"')
    }
    server.close()
    expect(server.metrics()).toBe('')
  })

  it("serve's metrics page: handler totals, per connection, and its FaultServers' ranges labelled", async () => {
    const { server, m } = setup({ faultAround: PAGE_SIZE }, 8 * PAGE_SIZE)
    server.serve(m, { buffer: new Uint8Array(m.length).fill(5) })
    await within(touch(pages(m), { threads: 1 }), 10_000, 'touch')
    await until(
      () => server.stats().ranges[0].stages.total.count === 8 && server.stats().ranges[0].faults === 8,
      5000,
      'faults counted',
    )
    const counts = { faults: 8, pagesServed: 8, bytesServed: 8 * PAGE_SIZE, zeroPages: 0, removes: 0 }
    const text = handlerMetrics({
      stats: () => ({ ...counts, connections: { active: 1, total: 3, failed: 1 } }),
      connections: () => [{ ...counts, id: 3, peer: { pid: 42 } }],
      metricsSources: () => [{ ...server._metricsSource()!, labels: { connection: '3' } }],
    })
    const s = samples(text)
    expect(s.get('userfaultfd_serve_connections')).toBe(1)
    expect(s.get('userfaultfd_serve_connections_total')).toBe(3)
    expect(s.get('userfaultfd_serve_connections_failed_total')).toBe(1)
    expect(s.get('userfaultfd_serve_pages_served_total{connection="all"}')).toBe(8)
    expect(s.get('userfaultfd_serve_pages_served_total{connection="3",pid="42"}')).toBe(8)
    const range = `connection="3",range="0x${m.address.toString(16)}",mode="missing"`
    expect(s.get(`userfaultfd_range_faults_total{${range}}`)).toBe(8)
    expect(s.get(`userfaultfd_fault_seconds_count{${range}}`)).toBe(8)
    // one HELP/TYPE per family, even with several sources
    expect(text.match(/^# TYPE userfaultfd_range_faults_total /gm)).toHaveLength(1)
  })
})
