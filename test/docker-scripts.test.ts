// The Docker stand-in image's helpers: the Debian mirror comes from this machine's apt sources
// (or DEBIAN_MIRROR), and nothing is archived or deleted through a mount left under the rootfs.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { spawn, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { root } from './helpers/children'
import { timeScale } from './helpers/children'

const mirrorScript = path.join(root, 'scripts', 'docker', 'debian-mirror.js')
const mountsScript = path.join(root, 'scripts', 'docker', 'mounts.sh')
let dir: string

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-docker-'))
})
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

/** An /etc/apt with these files; returns what debian-mirror.js prints for it. */
function mirrorFor(files: Record<string, string>, env: NodeJS.ProcessEnv = {}): { mirror: string; from: string } {
  const etc = fs.mkdtempSync(path.join(dir, 'apt-'))
  fs.mkdirSync(path.join(etc, 'sources.list.d'))
  for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(etc, name), text)
  const base = { ...process.env }
  delete base.DEBIAN_MIRROR
  const r = spawnSync(process.execPath, [mirrorScript, etc], { encoding: 'utf8', env: { ...base, ...env } })
  expect(r.status).toBe(0)
  return { mirror: r.stdout.trim(), from: r.stderr.trim() }
}

describe('debian-mirror.js', () => {
  it('deb822 sources: the first Debian archive entry, skipping security, deb-src and disabled stanzas', () => {
    const r = mirrorFor({
      'sources.list.d/a.sources': `Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm

Types: deb
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
`,
    })
    expect(r.mirror).toBe('http://mirror.example/debian')
    expect(r.from).toMatch(/a\.sources/)
  })

  it('one-line sources.list, with options in brackets; other distributions are skipped', () => {
    const r = mirrorFor({
      'sources.list': `# deb http://commented.example/debian bookworm main
deb http://archive.ubuntu.com/ubuntu jammy main
deb [arch=amd64 signed-by=/k.gpg] https://proxy.corp.example/debian trixie main contrib
`,
    })
    expect(r.mirror).toBe('https://proxy.corp.example/debian')
  })

  it('falls back to deb.debian.org where apt has no Debian archive; DEBIAN_MIRROR wins', () => {
    expect(mirrorFor({ 'sources.list': 'deb http://archive.ubuntu.com/ubuntu noble main\n' })).toMatchObject({
      mirror: 'http://deb.debian.org/debian',
      from: expect.stringMatching(/default/),
    })
    expect(
      mirrorFor(
        { 'sources.list': 'deb http://mirror.example/debian bookworm main\n' },
        { DEBIAN_MIRROR: 'http://mine/debian' },
      ),
    ).toMatchObject({ mirror: 'http://mine/debian', from: expect.stringMatching(/DEBIAN_MIRROR/) })
  })
})

/** Why this process cannot mount here, or undefined when it can. */
function cannotMount(): string | undefined {
  if (process.getuid!() !== 0) return 'needs root to mount'
  const capEff = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0'
  if (((BigInt(`0x${capEff}`) >> 21n) & 1n) === 0n) return 'needs CAP_SYS_ADMIN to mount (e.g. a container without it)'
  return undefined
}

describe('mounts.sh', () => {
  const bash = (script: string) =>
    spawnSync('bash', ['-c', `. ${JSON.stringify(mountsScript)}; ${script}`], {
      encoding: 'utf8',
      timeout: 10_000 * timeScale,
    })

  it('unmounts what debootstrap left under the rootfs (deepest first), then removes it', (ctx) => {
    const why = cannotMount()
    if (why) ctx.skip(why)
    const rootfs = path.join(dir, 'rootfs-a')
    fs.mkdirSync(path.join(rootfs, 'proc'), { recursive: true })
    expect(spawnSync('mount', ['-t', 'tmpfs', 'none', path.join(rootfs, 'proc')]).status).toBe(0)
    fs.mkdirSync(path.join(rootfs, 'proc', 'inner'))
    expect(spawnSync('mount', ['-t', 'tmpfs', 'none', path.join(rootfs, 'proc', 'inner')]).status).toBe(0)
    expect(
      bash(`mounts_under ${JSON.stringify(rootfs)}`)
        .stdout.trim()
        .split('\n'),
    ).toEqual([path.join(rootfs, 'proc', 'inner'), path.join(rootfs, 'proc')])
    const r = bash(`safe_remove ${JSON.stringify(rootfs)}`)
    expect(r.stderr).toBe('')
    expect(r.status).toBe(0)
    expect(fs.existsSync(rootfs)).toBe(false)
    expect(fs.readFileSync('/proc/mounts', 'utf8')).not.toContain(rootfs)
  })

  it('refuses (and deletes nothing) when a mount under it cannot be unmounted', async (ctx) => {
    const why = cannotMount()
    if (why) ctx.skip(why)
    const rootfs = path.join(dir, 'rootfs b') // a space: /proc/mounts writes it as \040
    const mnt = path.join(rootfs, 'proc')
    fs.mkdirSync(mnt, { recursive: true })
    expect(spawnSync('mount', ['-t', 'tmpfs', 'none', mnt]).status).toBe(0)
    fs.writeFileSync(path.join(mnt, 'host-file'), 'must survive')
    // A process whose working directory is inside keeps the mount busy (umount: EBUSY).
    const holder = spawn('sleep', ['30'], { cwd: mnt, stdio: 'ignore' })
    try {
      const r = bash(`safe_remove ${JSON.stringify(rootfs)}`)
      expect(r.status).toBe(1)
      expect(r.stderr).toMatch(
        /standin: refusing to archive or delete .*rootfs b: still mounted there:\n {2}.*rootfs b\/proc\n/,
      )
      expect(fs.readFileSync(path.join(mnt, 'host-file'), 'utf8')).toBe('must survive')
    } finally {
      holder.kill('SIGKILL')
      await new Promise((r) => holder.once('exit', r))
      spawnSync('umount', [mnt])
    }
    expect(bash(`safe_remove ${JSON.stringify(rootfs)}`).status).toBe(0)
    expect(fs.existsSync(rootfs)).toBe(false)
  })
})
