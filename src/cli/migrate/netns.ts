// Two network namespaces joined by a veth pair, so that a source and a target on one machine
// talk over a real network stack (TCP over a link that can go down), for the demo, the tests and
// the benchmark. Names carry the creating process's pid (uffdmig-<pid>-s / -t; interfaces
// um<pid>s / um<pid>t, within the 15-character limit); the ends get link-local addresses. What
// is made is removed by remove(), at process exit, and by the next run if a crash left it.
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'

export interface LinkPair {
  sourceNs: string
  targetNs: string
  sourceDev: string
  targetDev: string
  sourceIp: string
  targetIp: string
  /** argv prefix running a command in one namespace */
  exec(side: 'source' | 'target'): string[]
  /** removes both namespaces (and the veth pair with them); idempotent */
  remove(): void
}

function ip(args: string[]): { ok: boolean; error: string } {
  const r = spawnSync('ip', args, { encoding: 'utf8' })
  if (r.error) return { ok: false, error: r.error.message }
  return { ok: r.status === 0, error: (r.stderr ?? '').trim() }
}

const PREFIX = 'uffdmig-'

/** Removes namespaces left by runs whose process is gone (a SIGKILL skips every cleanup). */
export function sweepStale(): void {
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' })
  if (r.status !== 0) return
  for (const line of r.stdout.split('\n')) {
    const m = new RegExp(`^(${PREFIX}(\\d+)-[st])\\b`).exec(line.trim())
    if (m === null) continue
    if (!fs.existsSync(`/proc/${m[2]}`)) ip(['netns', 'del', m[1]])
  }
}

/**
 * Makes the pair, or says why it cannot (not root, no `ip`, no netns support): the caller then
 * falls back to loopback and prints the reason.
 */
export function createLinkPair(tag = String(process.pid)): LinkPair | { reason: string } {
  sweepStale()
  const sourceNs = `${PREFIX}${tag}-s`
  const targetNs = `${PREFIX}${tag}-t`
  const sourceDev = `um${tag}s`.slice(0, 15)
  const targetDev = `um${tag}t`.slice(0, 15)
  const sourceIp = '169.254.77.1'
  const targetIp = '169.254.77.2'
  let removed = false
  const remove = (): void => {
    if (removed) return
    removed = true
    ip(['netns', 'del', sourceNs])
    ip(['netns', 'del', targetNs])
    process.off('exit', remove)
  }
  const steps: string[][] = [
    ['netns', 'add', sourceNs],
    ['netns', 'add', targetNs],
    ['link', 'add', sourceDev, 'netns', sourceNs, 'type', 'veth', 'peer', 'name', targetDev, 'netns', targetNs],
    ['-n', sourceNs, 'addr', 'add', `${sourceIp}/30`, 'dev', sourceDev],
    ['-n', targetNs, 'addr', 'add', `${targetIp}/30`, 'dev', targetDev],
    ['-n', sourceNs, 'link', 'set', 'lo', 'up'],
    ['-n', targetNs, 'link', 'set', 'lo', 'up'],
    ['-n', sourceNs, 'link', 'set', sourceDev, 'up'],
    ['-n', targetNs, 'link', 'set', targetDev, 'up'],
  ]
  process.on('exit', remove)
  for (const step of steps) {
    const r = ip(step)
    if (!r.ok) {
      remove()
      return { reason: `cannot make network namespaces (ip ${step.join(' ')}: ${r.error || 'failed'})` }
    }
  }
  return {
    sourceNs,
    targetNs,
    sourceDev,
    targetDev,
    sourceIp,
    targetIp,
    exec: (side) => ['ip', 'netns', 'exec', side === 'source' ? sourceNs : targetNs],
    remove,
  }
}

/** Whether `ip netns list` still shows a namespace (tests check the cleanup). */
export function namespaceExists(name: string): boolean {
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' })
  return r.status === 0 && r.stdout.split('\n').some((l) => l.trim().split(' ')[0] === name)
}
