// Checking memory written by the native stamper (native/testing/stamper.cc) against a snapshot of it.
//
// Thread t writes its slots round-robin in order(t); its k-th write stores stamp(t, k) in 8
// words of slot order(t)[(k - 1) % n]. So memory "as of an instant" holds, for each thread, the
// stamps of a PREFIX of its writes: with M the last write before the instant, slot j holds the
// largest k <= M with (k - 1) % n == j (or its initial value if there is none). A snapshot is
// correct iff every thread's slots look exactly like that for one M, and M lies between the
// writes completed before the snapshot began and those completed when it had protected the
// range.
//
// A stamp carries its stamper's run number (stamper.run(), distinct for every stamper of the
// process), so that a slot's initial value, written by an earlier stamper on the same memory, is
// never mistaken for one of this stamper's writes: two stampers with the same order and seed
// used to write identical values to the same slots, and a slot holding write k of the second
// one read as "still its initial value" (k = 0).
import type { Stamper } from '../../src/testing'
import { stampOf } from '../../src/testing'

const SLOT = 4096
const WORDS = 8
const MASK = (1n << 40n) - 1n

export interface StampCheck {
  /** slots whose content differs from the memory as of the snapshot's start */
  mismatches: string[]
  /**
   * slots whose 8 words disagree, other than the one a thread was in the middle of writing at the
   * snapshot instant (the memory itself was torn then: its upper words already hold write M + 1)
   */
  torn: number
  /** each thread's last write included in the snapshot */
  cut: number[]
}

function word(bytes: Uint8Array, slot: number, w: number): bigint {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  return view.getBigUint64(slot * SLOT + w * (SLOT / WORDS), true)
}

/** The k of the write that put `value` into a slot of thread t of stamper `run` (0 for the slot's initial value). */
function decode(value: bigint, run: number, t: number, initial: bigint): number {
  if (value === initial) return 0
  if (value >> 40n !== ((BigInt(run) << 8n) | BigInt(t + 1))) return -1
  return Number(value & MASK)
}

/** Expected k in slot j of a thread with n slots after its writes 1..M. */
export function expectedK(j: number, n: number, M: number): number {
  if (M === 0) return 0
  const r = (M - 1) % n
  const k = j <= r ? M - (r - j) : M - (r - j + n)
  return k >= 1 ? k : 0
}

/**
 * Checks `snapshot` (bytes of the whole stamped range) against the stamper's writes; `before` and
 * `after` are stamper.counts() just before takeSnapshot() and just after it returned.
 */
export function checkStamps(
  snapshot: Uint8Array,
  stamper: Stamper,
  threads: number,
  before: Float64Array,
  after: Float64Array,
): StampCheck {
  const mismatches: string[] = []
  let torn = 0
  const cut: number[] = []
  const run = stamper.run()
  for (let t = 0; t < threads; t++) {
    const order = stamper.order(t)
    const initial = stamper.initial(t)
    const n = order.length
    const ks = new Array<number>(n)
    let M = 0
    const split: number[] = []
    for (let j = 0; j < n; j++) {
      const first = word(snapshot, order[j], 0)
      for (let w = 1; w < WORDS; w++)
        if (word(snapshot, order[j], w) !== first) {
          split.push(j)
          break
        }
      ks[j] = decode(first, run, t, initial[j])
      if (ks[j] > M) M = ks[j]
    }
    cut.push(M)
    for (const j of split) {
      // Words are stored last to first: a write in progress shows as new upper words over old lower ones.
      const inProgress = M % n === j
      const next = stampOf(run, t, M + 1)
      const old = word(snapshot, order[j], 0)
      let seenOld = false
      let ok = inProgress
      for (let w = WORDS - 1; w >= 0 && ok; w--) {
        const v = word(snapshot, order[j], w)
        if (v === next && !seenOld) continue
        if (v === old) seenOld = true
        else ok = false
      }
      if (!ok) {
        torn++
        const words = Array.from({ length: WORDS }, (_, w) => word(snapshot, order[j], w).toString(16))
        console.log(
          `torn: thread ${t} slot ${order[j]} j=${j} n=${n} M=${M} words=${words.join(',')} initial=${initial[j].toString(16)}`,
        )
      }
    }
    if (M < before[t] || M > after[t] + 1) {
      mismatches.push(
        `thread ${t}: the snapshot holds writes up to ${M}, outside [${before[t]}, ${after[t] + 1}] (writes done before it began / once protected)`,
      )
    }
    for (let j = 0; j < n; j++) {
      const want = expectedK(j, n, M)
      if (ks[j] !== want && mismatches.length < 20) {
        const got = word(snapshot, order[j], 0).toString(16)
        const wanted = (want === 0 ? initial[j] : stampOf(run, t, want)).toString(16)
        mismatches.push(
          `thread ${t} slot ${order[j]}: holds write ${ks[j]} (0x${got}), memory at the snapshot's start held write ${want} (0x${wanted}) (of ${M}; initial 0x${initial[j].toString(16)})`,
        )
      }
    }
  }
  return { mismatches, torn, cut }
}

/** After the stamper stopped: memory must hold every thread's last writes (no lost write). */
export function checkFinal(memory: Uint8Array, stamper: Stamper, threads: number, counts: Float64Array): string[] {
  const bad: string[] = []
  const run = stamper.run()
  for (let t = 0; t < threads; t++) {
    const order = stamper.order(t)
    const initial = stamper.initial(t)
    for (let j = 0; j < order.length; j++) {
      const k = expectedK(j, order.length, counts[t])
      const want = k === 0 ? initial[j] : stampOf(run, t, k)
      const got = word(memory, order[j], 0)
      if (got !== want && bad.length < 20)
        bad.push(`thread ${t} slot ${order[j]}: ${got.toString(16)} != ${want.toString(16)}`)
    }
  }
  return bad
}
