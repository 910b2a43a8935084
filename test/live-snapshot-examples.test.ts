// The live-snapshot and pre-copy examples run as users would run them (against dist/).
import { describe, expect, it } from 'vitest'
import { timeScale } from './helpers/children'
import { spawnSync } from 'node:child_process'
import * as path from 'node:path'
import { DirtyTracker, Userfaultfd } from '../src/index'
import { hasFeature, kernelRelease } from './helpers/kernel'

const root = path.join(__dirname, '..')
const probe = Userfaultfd.probe()
if (!probe.supported) console.log(`live-snapshot example tests skipped: userfaultfd unavailable: ${probe.reason}`)

function run(example: string, ...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [path.join(root, 'examples', example), ...args], {
    encoding: 'utf8',
    timeout: 60_000 * timeScale,
    killSignal: 'SIGKILL',
  })
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

describe('examples', () => {
  it.skipIf(!probe.supported)(
    'examples/live-snapshot.js: the copy equals memory as of its start while the program writes',
    { timeout: 90_000 * timeScale },
    () => {
      const r = run('live-snapshot.js', '32')
      if (!hasFeature('PAGEFAULT_FLAG_WP')) {
        // No write protection (arm64 before 6.10): the example fails with the package's refusal.
        expect(r.status).toBe(1)
        expect(r.stderr).toMatch(
          `UnsupportedError: takeSnapshot() needs UFFD_FEATURE_PAGEFAULT_FLAG_WP (Linux ${kernelRelease('PAGEFAULT_FLAG_WP')}+)`,
        )
        console.log(
          `kernel ${probe.kernel} lacks PAGEFAULT_FLAG_WP: the example's UnsupportedError was checked instead`,
        )
        return
      }
      expect(r.stderr).toBe('')
      expect(r.status).toBe(0)
      expect(r.stdout).toMatch(/snapshot equals memory as of its start: yes; cells newer than the snapshot in it: 0/)
      expect(r.stdout).toMatch(/while the program made [1-9]\d* more writes/)
    },
  )

  it('examples/precopy.js: converges, then stop-and-copy leaves an identical destination', {
    timeout: 90_000 * timeScale,
  }, () => {
    const r = run('precopy.js', '128')
    expect(r.stderr).toBe('')
    expect(r.status).toBe(0)
    const support = DirtyTracker.support()
    if (!support.supported) {
      // No userfaultfd write protection (arm64 before 6.10): the example says why.
      expect(r.stdout).toMatch(/^skipped: dirty tracking needs UFFD_FEATURE_PAGEFAULT_FLAG_WP/)
      return
    }
    expect(r.stdout).toContain(`tracking mode: ${support.mode}`)
    expect(r.stdout).toMatch(/round 0: sent all 128 MiB/)
    expect(r.stdout).toMatch(/small enough, pausing the program/)
    expect(r.stdout).toMatch(/destination identical: yes/)
  })
})
