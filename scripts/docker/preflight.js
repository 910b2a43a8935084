// Opens a uffd the way users do (via: 'auto'). On failure prints the library's error (code,
// message, hint) and exits 2 at once: a container without permission must fail fast and say
// why, never run a suite that would fail test by test (or wait on faults nobody can serve).
'use strict'
const { Userfaultfd, Mapping, PAGE_SIZE } = require('../../dist/index.js')

try {
  const uffd = Userfaultfd.open()
  const m = Mapping.anonymous(PAGE_SIZE)
  uffd.register(m)
  console.log(`ok: opened via ${uffd.via}, features 0x${uffd.features.toString(16)}`)
  uffd.close()
  m.unmap()
} catch (err) {
  // the message ends with the hint (err.hint); err.code is the errno name
  console.error(`FAIL: userfaultfd is not usable here (${err.code}): ${err.message}`)
  process.exit(2)
}
