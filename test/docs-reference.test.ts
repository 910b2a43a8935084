// The API reference generated from the JSDoc (TypeDoc, `npm run docs` into docs/reference/):
// it builds without a warning (every type the API names is exported, every link resolves), and
// documents the public classes.
import { afterAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { root, runNode } from './helpers/children'
import { timeScale } from './helpers/children'

const out = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-typedoc-'))
afterAll(() => fs.rmSync(out, { recursive: true, force: true }))

describe('API reference (TypeDoc)', () => {
  it('`npm run docs` is TypeDoc over the package entry, into docs/reference/ (not committed, not published)', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))
    expect(pkg.scripts.docs).toBe('typedoc')
    const config = JSON.parse(fs.readFileSync(path.join(root, 'typedoc.json'), 'utf8'))
    expect(config).toMatchObject({ entryPoints: ['src/index.ts'], out: 'docs/reference', treatWarningsAsErrors: true })
    expect(fs.readFileSync(path.join(root, '.gitignore'), 'utf8')).toMatch(/^\/docs\/reference\/$/m)
    expect(pkg.files).toContain('!docs/reference')
  })

  it('builds with no warning, and documents the public classes', { timeout: 120_000 * timeScale }, async () => {
    const typedoc = path.join(root, 'node_modules', 'typedoc', 'bin', 'typedoc')
    const r = await runNode([typedoc, '--options', path.join(root, 'typedoc.json'), '--out', out], 110_000)
    expect(r.stdout + r.stderr).not.toMatch(/warning|error/i)
    expect(r.code).toBe(0)
    for (const cls of ['Userfaultfd', 'Mapping', 'FaultServer', 'FirecrackerHandler', 'UffdError', 'EventStream'])
      expect(fs.readFileSync(path.join(out, 'classes', `${cls}.html`), 'utf8')).toMatch(
        /class="tsd-comment tsd-typography"/,
      )
    // The front page is the API overview (docs/api.md).
    expect(fs.readFileSync(path.join(out, 'index.html'), 'utf8')).toMatch(/API reference/)
  })
})
