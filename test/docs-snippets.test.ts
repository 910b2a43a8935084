// Every TypeScript/JavaScript snippet of README.md and docs/*.md type-checks as a consumer's
// code would: in a project of its own that installs this package (node_modules/userfaultfd),
// `import ... from 'userfaultfd'` or `require('userfaultfd')`, tsc --strict, checkJs for JS. So
// the docs cannot drift from the API. Also the consumer-facing type tests in test/types/.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { root, runNode } from './helpers/children'
import { timeScale } from './helpers/children'

interface Snippet {
  /** where it is: docs/api.md:52 */
  where: string
  lang: string
  code: string
  file: string
}

const CODE = new Set(['js', 'javascript', 'mjs', 'cjs', 'ts', 'typescript', 'mts', 'cts'])

/** The fenced code blocks of `doc` in a language tsc checks. */
function snippetsOf(doc: string): Array<Omit<Snippet, 'file'>> {
  const text = fs.readFileSync(path.join(root, doc), 'utf8')
  const out: Array<Omit<Snippet, 'file'>> = []
  for (const m of text.matchAll(/^```(\w*)[^\n]*\n([\s\S]*?)^```/gm)) {
    if (!CODE.has(m[1])) continue
    const line = text.slice(0, m.index).split('\n').length + 1
    out.push({ where: `${doc}:${line}`, lang: m[1], code: m[2] })
  }
  return out
}

/** .mts/.cts/.mjs/.cjs: ES module syntax or CommonJS, TypeScript or JavaScript. */
function extension(s: Omit<Snippet, 'file'>): string {
  const ts = ['ts', 'typescript', 'mts', 'cts'].includes(s.lang)
  const esm = /^\s*(import|export)\s/m.test(s.code) || s.lang === 'mjs' || s.lang === 'mts'
  return `.${esm ? 'm' : 'c'}${ts ? 'ts' : 'js'}`
}

const docs = [
  'README.md',
  ...fs
    .readdirSync(path.join(root, 'docs'))
    .filter((f) => f.endsWith('.md'))
    .map((f) => `docs/${f}`),
]
let project: string
let snippets: Snippet[]
let output = ''

/** tsc's error lines as { file (base name), line, message }. */
function errors(): Array<{ file: string; line: number; message: string }> {
  return [...output.matchAll(/^(.+?)\((\d+),\d+\): (error .*)$/gm)].map((m) => ({
    file: path.basename(m[1]),
    line: Number(m[2]),
    message: m[3],
  }))
}

beforeAll(async () => {
  // A consumer project: the package as a dependency (a link to this checkout, built), and
  // Node's types.
  project = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-docs-'))
  fs.mkdirSync(path.join(project, 'node_modules', '@types'), { recursive: true })
  fs.symlinkSync(root, path.join(project, 'node_modules', 'userfaultfd'))
  fs.symlinkSync(
    path.join(root, 'node_modules', '@types', 'node'),
    path.join(project, 'node_modules', '@types', 'node'),
  )
  fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true }))
  snippets = docs.flatMap((doc) =>
    snippetsOf(doc).map((s, i) => ({ ...s, file: `${doc.replace(/[/.]/g, '_')}_${i}${extension(s)}` })),
  )
  for (const s of snippets) fs.writeFileSync(path.join(project, s.file), s.code)
  for (const f of fs.readdirSync(path.join(root, 'test', 'types')))
    fs.copyFileSync(path.join(root, 'test', 'types', f), path.join(project, f))
  fs.writeFileSync(
    path.join(project, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        strict: true,
        noEmit: true,
        allowJs: true,
        checkJs: true,
        target: 'ES2022',
        lib: ['ES2022', 'ESNext.Disposable'],
        module: 'NodeNext',
        moduleResolution: 'NodeNext',
        types: ['node'],
        skipLibCheck: false,
      },
      include: ['*.mts', '*.cts', '*.mjs', '*.cjs'],
    }),
  )
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  const r = await runNode([tsc, '-p', path.join(project, 'tsconfig.json'), '--pretty', 'false'], 120_000)
  output = r.stdout + r.stderr
}, 150_000 * timeScale)

afterAll(() => fs.rmSync(project, { recursive: true, force: true }))

describe('docs snippets type-check as consumer code (tsc --strict, checkJs)', () => {
  it('finds the snippets', () => {
    expect(snippets.length).toBeGreaterThanOrEqual(10)
    expect(snippets.some((s) => s.where.startsWith('README.md'))).toBe(true)
  })

  it.each(docs)('%s', (doc) => {
    const found: string[] = []
    for (const s of snippets.filter((x) => x.where.startsWith(`${doc}:`))) {
      const start = Number(s.where.split(':')[1])
      for (const e of errors().filter((x) => x.file === s.file))
        found.push(`${doc}:${start + e.line - 1}: ${e.message}`)
    }
    expect(found).toEqual([])
  })

  it('the type tests of test/types/ (exact event types, typed event maps), and nothing else fails', () => {
    const known = new Set(snippets.map((s) => s.file))
    expect(
      errors()
        .filter((e) => !known.has(e.file))
        .map((e) => `${e.file}:${e.line}: ${e.message}`),
    ).toEqual([])
    expect(output).not.toMatch(/error TS/)
  })
})
