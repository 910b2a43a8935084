// A clone for bench/clones.js: maps its memory (the memfd it got as fd 4, or private anonymous
// memory), opens its own uffd and sends it to the bench over the socket it got as fd 3, then,
// told to, reads one u64 per page in the given order and reports how long that took (and its
// pid, for /proc/PID/smaps). Stays alive until told to exit, so that its memory can be measured.
'use strict'
const { Mapping, PAGE_SIZE, Userfaultfd, receiveFds, sendFds, sendUffd } = require('../dist')

const options = JSON.parse(process.argv[2])
const m = options.shared ? Mapping.fromFd(4) : Mapping.anonymous(options.length)
const uffd = Userfaultfd.open()

async function main() {
  const meta = { features: uffd.features.toString(), ioctls: uffd.ioctls.toString(), address: m.address.toString() }
  await sendUffd(3, uffd, JSON.stringify(meta))
  const go = await receiveFds(3, { maxFds: 0 })
  const { order } = JSON.parse(go.data.toString())
  const view = new BigUint64Array(m.buffer)
  const pages = m.length / PAGE_SIZE
  const perm = new Uint32Array(pages)
  for (let i = 0; i < pages; i++) perm[i] = i
  if (order === 'random') {
    let seed = 12345
    for (let i = pages - 1; i > 0; i--) {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff
      const j = seed % (i + 1)
      const t = perm[i]
      perm[i] = perm[j]
      perm[j] = t
    }
  }
  let sum = 0n
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < pages; i++) sum += view[perm[i] * (PAGE_SIZE / 8)]
  const ns = Number(process.hrtime.bigint() - t0)
  await sendFds(3, JSON.stringify({ pid: process.pid, ns, sum: sum.toString() }), [])
  await receiveFds(3, { maxFds: 0 }) // exit
  process.exit(0)
}

main().catch((e) => {
  console.error(e)
  process.exit(3)
})
