// What the published package promises, checked fast: package.json fields, the package's own name
// from import and require, the prebuilt binaries (architecture read from the ELF header, symbol
// versions no newer than Debian bookworm's) and which addon the loader takes.
// The slow checks are scripts: test:pack (the packed tarball, without a compiler), test:docker,
// test:node-matrix, test:arm64.
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import { createRequire } from 'node:module'
import * as path from 'node:path'
import { describe, expect, it } from 'vitest'
import { candidates, nativePath } from '../src/addon/native'
import { timeScale } from './helpers/children'

const root = path.join(__dirname, '..')
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))
const check = createRequire(__filename)(path.join(root, 'scripts', 'prebuilds-check.js')) as {
  inspect(): {
    binaries: Record<string, { machine: number; arch: string; versions: Record<string, string> | null }>
    fresh: { fresh: boolean; changed: string[] }
  }
  TARGETS: Record<string, { machine: number; name: string }>
  MAX: Record<string, string>
}

function compareVersions(a: string, b: string): number {
  const [x, y] = [a, b].map((s) => s.split('.').map(Number))
  for (let i = 0; i < Math.max(x.length, y.length); i++)
    if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0)
  return 0
}

function node(args: string[], env: NodeJS.ProcessEnv = {}): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, args, {
    cwd: root,
    encoding: 'utf8',
    timeout: 15_000 * timeScale,
    env: { ...process.env, ...env },
  })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

describe('package.json', () => {
  it('installs with the prebuild-first install script and ships what it needs', () => {
    expect(pkg.scripts.install).toBe('node scripts/install.js')
    expect(pkg.gypfile).toBe(true)
    for (const f of ['dist', 'native', 'binding.gyp', 'prebuilds', 'scripts/install.js', 'README.md'])
      expect(pkg.files).toContain(f)
    expect(pkg.os).toEqual(['linux'])
    expect(pkg.cpu).toEqual(['x64', 'arm64'])
    expect(pkg.engines.node).toBe('>=20.0.0')
    expect(pkg.dependencies).toHaveProperty('bindings')
    expect(pkg.bin).toEqual({ userfaultfd: 'dist/cli/index.js' })
    for (const s of [
      'test:docker',
      'test:pack',
      'test:node-matrix',
      'test:vm',
      'test:arm64',
      'test:kernel61',
      'prebuilds',
    ])
      expect(pkg.scripts).toHaveProperty(s)
  })

  it('the package name resolves from require and from import, to one instance', () => {
    const r = node([
      '--input-type=module',
      '-e',
      `
      import { createRequire } from 'module'
      import * as esm from 'userfaultfd'
      const cjs = createRequire(import.meta.url)('userfaultfd')
      console.log(esm.Userfaultfd === cjs.Userfaultfd, typeof esm.Mapping, typeof cjs.FaultResolver, Object.keys(esm).length > 10)
    `,
    ])
    expect(r.stderr).toBe('')
    expect(r.stdout).toBe('true function function true\n')
  })
})

describe('package.json metadata and dependencies', () => {
  it('says where the project lives and what it is', () => {
    expect(pkg.repository).toMatchObject({
      type: 'git',
      url: expect.stringMatching(/^git\+https:\/\/github\.com\/.+\.git$/),
    })
    expect(pkg.homepage).toMatch(/^https:\/\/github\.com\/.+#readme$/)
    expect(pkg.bugs.url).toMatch(/^https:\/\/github\.com\/.+\/issues$/)
    expect(pkg.keywords).toEqual(expect.arrayContaining(['userfaultfd', 'firecracker', 'page-fault']))
    expect(typeof pkg.author).toBe('string')
    expect(pkg.license).toBe('MIT')
    for (const f of ['LICENSE', 'CHANGELOG.md']) {
      expect(pkg.files).toContain(f)
      expect(fs.existsSync(path.join(root, f))).toBe(true)
    }
  })

  it('node-gyp is not a runtime dependency (npm brings its own for the fallback build)', () => {
    expect(pkg.dependencies).not.toHaveProperty('node-gyp')
    expect(pkg.devDependencies).toHaveProperty('node-gyp')
    // What the fallback compile needs at install time: node-addon-api's headers; the libc tag of
    // the prebuild to load (detect-libc, used by src/addon/location.ts and the install script); and
    // undici: the HTTP(S) snapshot source (pure JS, no dependencies of its own; loaded only when used).
    expect(Object.keys(pkg.dependencies).sort()).toEqual(['bindings', 'detect-libc', 'node-addon-api', 'undici'])
  })
})

describe('source maps', () => {
  const maps: string[] = []
  const walk = (dir: string): void => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name)
      if (e.isDirectory()) walk(p)
      else if (e.name.endsWith('.js.map')) maps.push(p)
    }
  }
  walk(path.join(root, 'dist'))

  it('carry their sources (src/ is not published), equal to src/', () => {
    expect(maps.length).toBeGreaterThan(20)
    for (const map of maps) {
      const m = JSON.parse(fs.readFileSync(map, 'utf8'))
      expect(m.sources.length, map).toBeGreaterThan(0)
      expect(m.sourcesContent?.length, `${map} has no sourcesContent`).toBe(m.sources.length)
      for (const [i, source] of m.sources.entries()) {
        const file = path.resolve(path.dirname(map), m.sourceRoot ?? '', source)
        expect(m.sourcesContent[i], `${map}: ${source}`).toBe(fs.readFileSync(file, 'utf8'))
      }
    }
  })

  it('resolve: with --enable-source-maps a stack names the TypeScript line', () => {
    const r = node([
      '--enable-source-maps',
      '-e',
      "try { require('./dist').Userfaultfd.open({ via: 'pigeon' }) } catch (e) { console.log(e.stack) }",
    ])
    expect(r.stdout).toMatch(/via must be 'auto', 'device' or 'syscall'/)
    expect(r.stdout).toMatch(/src\/core\/userfaultfd\.ts:\d+:\d+/)
  })
})

describe('prebuilt binaries', () => {
  const found = check.inspect()

  it.each(Object.entries(check.TARGETS))(
    '%s is really that architecture and needs nothing newer than bookworm',
    (dir, want) => {
      const b = found.binaries[dir]
      expect(b, `prebuilds/${dir}/userfaultfd.glibc.node`).toBeDefined()
      expect(b.machine).toBe(want.machine)
      if (b.versions === null) return // no readelf here: prebuilds-check says so
      expect(Object.keys(b.versions)).toContain('GLIBC')
      for (const [lib, v] of Object.entries(b.versions)) {
        expect(
          compareVersions(v, check.MAX[lib]),
          `${dir} needs ${lib}_${v} (bookworm: ${check.MAX[lib]})`,
        ).toBeLessThanOrEqual(0)
      }
    },
  )

  it('records the sources they were built from (staleness is enforced by test:pack)', () => {
    const sources = JSON.parse(fs.readFileSync(path.join(root, 'prebuilds', 'sources.json'), 'utf8'))
    expect(sources.hash).toMatch(/^[0-9a-f]{64}$/)
    expect(Object.keys(sources.files)).toContain('binding.gyp')
    if (!found.fresh.fresh) {
      console.warn(`prebuilds are stale (changed since: ${found.fresh.changed.join(', ')}): run \`npm run prebuilds\``)
    }
  })
})

describe('loader', () => {
  const rel = (p: string): string => path.relative(root, p.trim())
  const prebuild = path.join('prebuilds', `linux-${process.arch}`, 'userfaultfd.glibc.node')

  it('prefers a local build, then the prebuild for this platform and libc', () => {
    expect(candidates('auto').map((c) => c.join('/'))).toEqual([
      'module_root/build/Release/bindings',
      'module_root/build/Debug/bindings',
      `module_root/${prebuild}`,
    ])
    expect(candidates('prebuild')).toHaveLength(1)
    expect(candidates('build')).toHaveLength(2)
    // the suite runs on the build that `npm test` just made
    expect(rel(nativePath)).toBe(path.join('build', 'Release', 'userfaultfd.node'))
  })

  it('USERFAULTFD_NATIVE=prebuild|build chooses, and the prebuild works', () => {
    const script =
      "const n = require('./dist/addon/native'); const { Userfaultfd } = require('./dist'); console.log(n.nativePath); console.log(Userfaultfd.probe().kernel)"
    const pre = node(['-e', script], { USERFAULTFD_NATIVE: 'prebuild' })
    expect(pre.stderr).toBe('')
    expect(rel(pre.stdout.split('\n')[0])).toBe(prebuild)
    const build = node(['-e', script], { USERFAULTFD_NATIVE: 'build' })
    expect(rel(build.stdout.split('\n')[0])).toBe(path.join('build', 'Release', 'userfaultfd.node'))
    const bad = node(['-e', script], { USERFAULTFD_NATIVE: 'fast' })
    expect(bad.code).not.toBe(0)
    expect(bad.stderr).toMatch(/USERFAULTFD_NATIVE must be 'auto', 'build' or 'prebuild' \(got 'fast'\)/)
  })
})
