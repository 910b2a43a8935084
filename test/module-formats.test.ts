// The built package loads from both require() and import, as one instance.
import { spawnSync } from 'node:child_process'
import * as path from 'node:path'
import { describe, expect, it } from 'vitest'
import { timeScale } from './helpers/children'

const root = path.join(__dirname, '..')

describe('module formats', () => {
  it('import and require give the same classes, and the .d.ts ships', () => {
    const script = `
      import { createRequire } from 'module'
      import * as esm from ${JSON.stringify(path.join(root, 'dist', 'index.mjs'))}
      const cjs = createRequire(import.meta.url)(${JSON.stringify(path.join(root, 'dist', 'index.js'))})
      const uffd = esm.Userfaultfd.open()
      console.log(esm.Userfaultfd === cjs.Userfaultfd, uffd instanceof cjs.Userfaultfd, typeof esm.default.Mapping)
      uffd.close()
    `
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      encoding: 'utf8',
      timeout: 10_000 * timeScale,
    })
    expect(r.stderr).toBe('')
    expect(r.stdout).toBe('true true function\n')
  })

  it('package.json exports point at files that exist', () => {
    const pkg = require(path.join(root, 'package.json'))
    const entry = pkg.exports['.']
    for (const file of [entry.types, entry.import, entry.require, pkg.main, pkg.types]) {
      expect(require('node:fs').existsSync(path.join(root, file)), file).toBe(true)
    }
    expect(pkg.os).toEqual(['linux'])
    expect(pkg.engines.node).toMatch(/>=\s*20/)
  })
})
