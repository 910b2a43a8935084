// JS-handler benchmark: 4 KiB MISSING faults raised by native toucher threads, resolved by a
// JavaScript handler (events({ batch: true }) + uffd.copy), against the C reference handler
// bench/c/naive.c (poll + read + one UFFDIO_COPY per fault) in the same run.
//
//   npm run bench:js-handler [-- --pages 50000 --rounds 5]
//
// Prints a table, and JSON with --json. Ratios are medians over rounds, each round running the
// C and the JS handler back to back on the same workload.
'use strict'
const { spawnSync } = require('node:child_process')
const { buildC, median, parseArgs, percentile, shuffle } = require('./lib')
const { Userfaultfd, Mapping, PAGE_SIZE } = require('../dist')
const { touch, pages } = require('../dist/testing')

async function jsHandler(count, threads, order) {
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(count * PAGE_SIZE)
  try {
    uffd.register(m)
    const list = pages(m)
    if (order === 'random') shuffle(list)
    const page = new Uint8Array(PAGE_SIZE).fill(1)
    const mask = ~BigInt(PAGE_SIZE - 1)
    const t0 = process.hrtime.bigint()
    const touching = touch(list, { threads, timings: true })
    let served = 0
    for await (const batch of uffd.events({ batch: true })) {
      for (const e of batch) uffd.copy(e.address & mask, page)
      served += batch.length
      if (served === count) break
    }
    const { ns } = await touching
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9
    const sorted = Float64Array.from(ns).sort()
    return {
      faults: count,
      seconds,
      faultsPerSec: count / seconds,
      p50us: percentile(sorted, 0.5) / 1e3,
      p99us: percentile(sorted, 0.99) / 1e3,
    }
  } finally {
    uffd.close()
    m.unmap()
  }
}

function cHandler(binary, count, threads, order) {
  const r = spawnSync(binary, [String(count), String(threads), order], { encoding: 'utf8', timeout: 120_000 })
  if (r.status !== 0) throw new Error(`${binary} failed: ${r.stderr}`)
  return JSON.parse(r.stdout)
}

async function main() {
  const args = parseArgs(process.argv.slice(2), { pages: 50_000, rounds: 5, json: false })
  const naive = buildC('naive')
  const rows = []
  for (const threads of [1, 2]) {
    for (const order of ['seq', 'random']) {
      const c = []
      const js = []
      for (let r = 0; r < args.rounds; r++) {
        c.push(cHandler(naive, args.pages, threads, order))
        js.push(await jsHandler(args.pages, threads, order))
      }
      const pick = (list, key) => median(list.map((x) => x[key]))
      rows.push({
        workload: `${threads} thread${threads > 1 ? 's' : ''}, ${order}`,
        cFaultsPerSec: Math.round(pick(c, 'faultsPerSec')),
        jsFaultsPerSec: Math.round(pick(js, 'faultsPerSec')),
        ratio: +median(js.map((x, i) => x.faultsPerSec / c[i].faultsPerSec)).toFixed(2),
        ratioMin: +Math.min(...js.map((x, i) => x.faultsPerSec / c[i].faultsPerSec)).toFixed(2),
        ratioMax: +Math.max(...js.map((x, i) => x.faultsPerSec / c[i].faultsPerSec)).toFixed(2),
        cP50us: +pick(c, 'p50us').toFixed(1),
        jsP50us: +pick(js, 'p50us').toFixed(1),
        cP99us: +pick(c, 'p99us').toFixed(1),
        jsP99us: +pick(js, 'p99us').toFixed(1),
      })
    }
  }
  const load = require('node:os').loadavg()[0].toFixed(2)
  if (args.json) console.log(JSON.stringify({ load, rows }, null, 2))
  else {
    console.table(rows)
    console.log(`load average at the end: ${load} (ratios are per round, C and JS back to back)`)
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
