// FaultServer { trace }: every fault served from native threads is one event of a Chrome
// trace-event file (the shape Perfetto and chrome://tracing import), with its kind, address,
// wait and faulting thread; fills around faults and in the background are events too, and the
// bytes of all of them add up to what the engine counted.
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { FaultServer, FaultTrace, Feature, Mapping, PAGE_SIZE, Userfaultfd } from '../src/index'
import { native } from '../src/addon/native'
import { pages, touch } from '../src/testing'
import { closeAll, ENGINE_DEFAULTS, randomContent, setup, track, until, within } from './helpers/fault-server'

afterEach((ctx) => closeAll(ctx))

interface TraceEvent {
  name: string
  cat?: string
  ph: string
  ts?: number
  dur?: number
  pid: number
  tid: number
  args?: Record<string, unknown>
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-trace-'))
let n = 0
const tracePath = (): string => path.join(dir, `trace-${++n}.json`)

function readTrace(file: string): { traceEvents: TraceEvent[]; otherData: Record<string, number> } {
  return JSON.parse(fs.readFileSync(file, 'utf8'))
}

const faults = (events: TraceEvent[]): TraceEvent[] =>
  events.filter((e) => e.ph === 'X' && (e.name === 'demand' || e.name === 'zero'))

/** The trace-event format's requirements of a complete event and its metadata, as Perfetto reads them. */
function checkShape(events: TraceEvent[]): void {
  const named = new Set(events.filter((e) => e.ph === 'M' && e.name === 'thread_name').map((e) => e.tid))
  for (const e of events) {
    expect(Number.isInteger(e.pid) && Number.isInteger(e.tid)).toBe(true)
    if (e.ph !== 'X') continue
    expect(e.cat).toBe('userfaultfd')
    expect(['demand', 'around', 'prefetch', 'zero']).toContain(e.name)
    expect(e.args?.kind).toBe(e.name)
    expect(typeof e.ts === 'number' && e.ts > 0).toBe(true)
    expect(typeof e.dur === 'number' && e.dur >= 0).toBe(true)
    expect(String(e.args?.address)).toMatch(/^0x[0-9a-f]+$/)
    expect(Number.isInteger(e.args?.bytes)).toBe(true)
    expect(named.has(e.tid)).toBe(true) // every track has a name
  }
}

describe('FaultServer { trace }', () => {
  it('records every fault served to 2 native threads: kinds, addresses, waits, threads; bytes add up', async () => {
    const file = tracePath()
    const count = 256
    const { uffd, m, server, errors } = setup(count, { faultAround: 4 * PAGE_SIZE, trace: file }, Feature.THREAD_ID)
    const src = randomContent(count * PAGE_SIZE)
    server.serve(m, { buffer: src })
    // A prefetched range, and one registered but served by no range (its faults are zeros).
    const pre = track(Mapping.anonymous(64 * PAGE_SIZE))
    server.serve(pre, { buffer: randomContent(pre.length) }, { prefetch: true })
    const unserved = track(Mapping.anonymous(4 * PAGE_SIZE))
    uffd.register(unserved, { missing: true })
    // Backwards, so that each fault's window has pages before it to fill around.
    const list = pages(m).reverse()
    await within(touch(list, { threads: 2 }), 15_000, 'touch')
    await within(touch(pages(unserved), { threads: 1 }), 15_000, 'touch unserved')
    await within(server.drained(), 10_000, 'drained')
    await until(() => server.stats().zeroPages >= 4, 5000, 'zero pages counted')
    const stats = server.stats()
    server.close()
    expect(errors.map((e) => e.message).join()).toMatch(/outside every served range/)

    const trace = readTrace(file)
    const events = trace.traceEvents
    checkShape(events)
    const served = faults(events)
    expect(served.length).toBe(stats.faults)
    expect(trace.otherData).toMatchObject({ producer: 'userfaultfd', dropped: 0 })
    const kinds = new Set(events.filter((e) => e.ph === 'X').map((e) => e.name))
    expect([...kinds].sort()).toEqual(['around', 'demand', 'prefetch', 'zero'])
    // Each fault's address is one its threads touched; each zero one of the unserved range.
    const touched = new Set([...pages(m), ...pages(unserved)].map((a) => `0x${a.toString(16)}`))
    for (const e of served) expect(touched.has(String(e.args?.address))).toBe(true)
    for (const e of served.filter((f) => f.name === 'zero'))
      expect(BigInt(String(e.args?.address)) >= unserved.address).toBe(true)
    // Waits: read to resolved, in µs, as dur.
    for (const e of served) expect(e.args?.waitUs).toBe(e.dur)
    // THREAD_ID: the faulting threads' ids (native toucher threads of this process).
    const tids = new Set(served.map((e) => e.args?.tid))
    expect(tids.size).toBeGreaterThanOrEqual(1)
    for (const tid of tids) {
      expect(Number.isInteger(tid) && (tid as number) > 0 && tid !== process.pid).toBe(true)
      expect(fs.existsSync(`/proc/self/task/${tid}`)).toBe(false) // the toucher threads have exited
    }
    // The bytes of the source-fill events are the engine's `bytes`: every page put in place once.
    const filled = events
      .filter((e) => e.ph === 'X' && e.name !== 'zero')
      .reduce((sum, e) => sum + (e.args?.bytes as number), 0)
    expect(filled).toBe(stats.bytes)
    expect(filled).toBe(m.length + pre.length)
    const aroundBytes = events.filter((e) => e.name === 'around').reduce((s, e) => s + (e.args?.bytes as number), 0)
    expect(aroundBytes).toBeGreaterThan(0)
  })

  it('without Feature.THREAD_ID the faults share one track, named so', async () => {
    const file = tracePath()
    const { m, server } = setup(32, { faultAround: PAGE_SIZE, trace: file })
    server.serve(m, { buffer: randomContent(m.length) })
    await within(touch(pages(m), { threads: 1 }), 15_000, 'touch')
    await within(server.drained(), 10_000, 'drained')
    const faultCount = server.stats().faults
    server.close()
    const events = readTrace(file).traceEvents
    checkShape(events)
    const served = faults(events)
    expect(served.length).toBe(faultCount)
    expect(new Set(served.map((e) => e.tid)).size).toBe(1)
    expect(served.every((e) => e.args?.tid === undefined)).toBe(true)
    const track = events.find((e) => e.ph === 'M' && e.name === 'thread_name' && e.tid === served[0].tid)
    expect(track?.args?.name).toMatch(/no THREAD_ID/)
  })

  it('a { handler } fault: one event spanning the handler, demand kind', async () => {
    const file = tracePath()
    const { m, server } = setup(8, { faultAround: PAGE_SIZE, trace: file }, Feature.THREAD_ID)
    server.serve(m, {
      handler: async ({ length }) => {
        await new Promise((r) => setTimeout(r, 20))
        return new Uint8Array(length).fill(7)
      },
    })
    const { values } = await within(touch([m.address + 8n], { threads: 1 }), 15_000, 'touch')
    expect(values[0]).toBe(0x0707070707070707n)
    await until(() => server.stats().handlerPages >= 1, 5000, 'handler pages counted')
    server.close()
    const served = faults(readTrace(file).traceEvents)
    expect(served.length).toBe(1)
    // The kernel reports the page's address (Feature.EXACT_ADDRESS aside).
    expect(served[0]).toMatchObject({ name: 'demand', args: { address: `0x${m.address.toString(16)}` } })
    expect(served[0].dur as number).toBeGreaterThanOrEqual(15_000) // the handler's 20 ms are in the wait
    expect(served[0].args?.bytes).toBe(PAGE_SIZE)
  })

  it('one FaultTrace shared by two servers; the servers leave it open', async () => {
    const file = tracePath()
    const trace = new FaultTrace(file)
    const a = setup(16, { faultAround: PAGE_SIZE, trace })
    const b = setup(16, { faultAround: PAGE_SIZE, trace })
    a.server.serve(a.m, { buffer: randomContent(a.m.length) })
    b.server.serve(b.m, { buffer: randomContent(b.m.length) })
    await within(touch([...pages(a.m), ...pages(b.m)], { threads: 2 }), 15_000, 'touch')
    await within(Promise.all([a.server.drained(), b.server.drained()]), 10_000, 'drained')
    const total = a.server.stats().faults + b.server.stats().faults
    a.server.close()
    b.server.close()
    expect(trace.closed).toBe(false)
    expect(trace.records).toBe(total)
    trace.close()
    trace.close() // idempotent
    expect(faults(readTrace(file).traceEvents).length).toBe(total)
  })

  it('refuses a bad trace option before anything starts', () => {
    const uffd = track(Userfaultfd.open())
    expect(() => new FaultServer(uffd, { trace: 42 as never })).toThrow(/trace must be a file path or a FaultTrace/)
    expect(() => new FaultServer(uffd, { trace: '' })).toThrow(TypeError)
    const closed = new FaultTrace(tracePath())
    closed.close()
    expect(() => new FaultServer(uffd, { trace: closed })).toThrow(/closed/)
    expect(() => new FaultServer(uffd, { trace: path.join(dir, 'no-such-dir', 't.json') })).toThrow(/ENOENT/)
    // None of these left a server behind: the uffd takes one now.
    track(new FaultServer(uffd)).close()
    expect(() => new FaultTrace(undefined as never)).toThrow(TypeError)
  })

  it('the engine without traceCapacity keeps no records (takeTrace() is null)', () => {
    const uffd = track(Userfaultfd.open())
    const options = { ...ENGINE_DEFAULTS, hugePageSize: 2 << 20 }
    const plain = new native.FaultEngine(uffd.fd, options, () => {})
    expect(plain.takeTrace()).toBeNull()
    plain.close()
    const traced = new native.FaultEngine(uffd.fd, { ...options, traceCapacity: 16 }, () => {})
    expect(traced.takeTrace()).toEqual({ records: new ArrayBuffer(0), dropped: 0 })
    traced.close()
    expect(() => new native.FaultEngine(uffd.fd, { ...options, traceCapacity: 2 ** 25 }, () => {})).toThrow(RangeError)
  })
})
