// A "guest": a child process whose memory this process serves, as a VMM's guest or clone is.
// The child maps memory (private anonymous, or a memfd this process hands it as its fd 4), opens
// its own uffd and sends it here over a socket pair (its fd 3) with the memory's address; then,
// told to, it reads the first u64 of the given pages on its main thread and prints them as JSON
// ({ values: [...] }). A page it cannot read kills it (SIGBUS, say): the test sees the signal.
// Killed when its test ends (test/helpers/children.ts).
import * as path from 'node:path'
import { type ReceivedUffd, PAGE_SIZE, receiveUffd, sendFds, socketPair } from '../../src/index'
import { native } from '../../src/addon/native'
import { type ChildResult, dist, runNode } from './children'

export interface Guest {
  uffd: ReceivedUffd['uffd']
  /** the guest's memory, in its address space */
  address: bigint
  length: number
  /** tells it to read `pages` (each page's first u64), in order */
  go(pages: number[]): Promise<void>
  /** its exit: code or signal, and what it printed */
  result: Promise<ChildResult>
}

export interface GuestOptions {
  /** bytes of private anonymous memory (default), or ... */
  length?: number
  /** ... a memfd of this process (shared memory: a clone of one guest's memory) */
  memfd?: number
  /** its page size, for page numbers (default PAGE_SIZE) */
  pageSize?: number
  /** print per-read latencies (ns) too, as `ns` */
  timings?: boolean
  timeoutMs?: number
}

const SCRIPT = `
const uffd = require(${JSON.stringify(path.join(dist, 'index.js'))})
const options = JSON.parse(process.argv[1])
const m = options.memfd ? uffd.Mapping.fromFd(4) : uffd.Mapping.anonymous(options.length)
const u = uffd.Userfaultfd.open()
;(async () => {
  const meta = { features: u.features.toString(), ioctls: u.ioctls.toString(), address: m.address.toString(), length: m.length }
  await uffd.sendUffd(3, u, JSON.stringify(meta))
  const go = await uffd.receiveFds(3, { maxFds: 0 })
  const pages = JSON.parse(go.data.toString())
  const view = new BigUint64Array(m.buffer)
  const values = []
  const ns = []
  for (const p of pages) {
    const t0 = process.hrtime.bigint()
    values.push(String(view[(p * options.pageSize) / 8]))
    ns.push(Number(process.hrtime.bigint() - t0))
  }
  console.log(JSON.stringify(options.timings ? { values, ns } : { values }))
  process.exit(0)
})().catch((e) => { console.error(e); process.exit(3) })
`

/** Starts a guest and receives its uffd. */
export async function startGuest(options: GuestOptions = {}): Promise<Guest> {
  const [mine, theirs] = socketPair()
  const fds = options.memfd === undefined ? [theirs] : [theirs, options.memfd]
  const config = {
    length: options.length ?? 16 * PAGE_SIZE,
    memfd: options.memfd !== undefined,
    pageSize: options.pageSize ?? PAGE_SIZE,
    timings: options.timings ?? false,
  }
  const result = runNode(['-e', SCRIPT, JSON.stringify(config)], options.timeoutMs ?? 20_000, undefined, fds)
  native.close(theirs)
  try {
    const received = await Promise.race([
      receiveUffd(mine),
      result.then((r) => {
        throw new Error(`the guest exited before sending its uffd: ${r.code ?? r.signal} ${r.stderr}`)
      }),
    ])
    const meta = JSON.parse(received.data.toString()) as { address: string; length: number }
    return {
      uffd: received.uffd,
      address: BigInt(meta.address),
      length: meta.length,
      go: async (pages) => {
        await sendFds(mine, JSON.stringify(pages), [])
      },
      result: result.finally(() => native.close(mine)),
    }
  } catch (err) {
    native.close(mine)
    throw err
  }
}

/** The guest's printed values (as bigints), or an Error saying how it ended. */
export function guestValues(r: ChildResult): bigint[] {
  const line = r.stdout.trim().split('\n').pop() ?? ''
  try {
    return (JSON.parse(line) as { values: string[] }).values.map(BigInt)
  } catch {
    throw new Error(`guest printed no values (code ${r.code}, signal ${r.signal}): ${r.stdout} ${r.stderr}`)
  }
}
