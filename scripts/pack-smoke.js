#!/usr/bin/env node
// Smoke test of an installed userfaultfd (run in the project that installed it, by test:pack):
// loads it from require and import, checks which addon file loaded, then opens a uffd, registers
// memory, faults on it from native threads (the internal toucher) and serves the faults with
// UFFDIO_COPY, checking every byte that came back.
//   node pack-smoke.js prebuild|build
'use strict'
const path = require('node:path')
const { createRequire } = require('node:module')

const expected = process.argv[2]
const req = createRequire(path.join(process.cwd(), 'package.json'))
const pkgDir = path.dirname(req.resolve('userfaultfd/package.json'))
const fail = (msg) => {
  console.error(`pack-smoke: FAIL: ${msg}`)
  process.exit(1)
}
setTimeout(() => fail('timed out after 20 s'), 20_000).unref()

async function main() {
  const { Userfaultfd, Mapping, PAGE_SIZE } = req('userfaultfd')
  const esm = await import(req.resolve('userfaultfd').replace(/index\.js$/, 'index.mjs'))
  if (esm.Userfaultfd !== Userfaultfd) fail('import and require give different Userfaultfd classes')
  const { nativePath } = req(path.join(pkgDir, 'dist', 'addon', 'native.js'))
  const { touch, pages } = req(path.join(pkgDir, 'dist', 'testing', 'index.js'))
  const loaded = path.relative(pkgDir, nativePath)
  const want =
    expected === 'build'
      ? path.join('build', 'Release', 'userfaultfd.node')
      : path.join('prebuilds', `linux-${process.arch}`, 'userfaultfd.glibc.node')
  if (loaded !== want) fail(`loaded ${loaded}, expected ${want}`)

  const n = 8
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(n * PAGE_SIZE)
  uffd.register(m)
  const touched = touch(pages(m), { threads: 2 })
  let served = 0
  for await (const e of uffd.events()) {
    if (e.type !== 'pagefault') continue
    const start = e.address & ~BigInt(PAGE_SIZE - 1)
    const index = (start - m.address) / BigInt(PAGE_SIZE)
    uffd.copy(start, new BigUint64Array(PAGE_SIZE / 8).fill(0xfeed0000n + index))
    if (++served === n) break
  }
  const { values } = await touched
  for (let i = 0; i < n; i++) if (values[i] !== 0xfeed0000n + BigInt(i)) fail(`page ${i} read ${values[i]}`)
  uffd.close()
  m.unmap()
  console.log(
    `pack-smoke: ok: ${loaded} (${process.arch}, node ${process.version}), opened via ${uffd.via}, served ${served} faults by UFFDIO_COPY, every value checked`,
  )
}
main().catch((err) => fail(err.stack))
