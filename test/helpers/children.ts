// Child processes for cross-process tests: each is killed when its test ends (pass or fail),
// and each has a hard timeout, so no test can leave a process behind or hang.
import { spawn, type ChildProcess } from 'node:child_process'
import * as path from 'node:path'

export const root = path.join(__dirname, '..', '..')
export const dist = path.join(root, 'dist')

const live = new Set<ChildProcess>()

/** USERFAULTFD_TEST_TIME_SCALE (e.g. 6 under arm64 emulation) stretches the children's hard timeouts too. */
export const timeScale = Number(process.env.USERFAULTFD_TEST_TIME_SCALE ?? '1') || 1

export function killChildren(): void {
  for (const child of live) child.kill('SIGKILL')
  live.clear()
}

export interface ChildResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

/** Spawns `node args...`; resolves when it exits (SIGKILLed after timeoutMs). */
export function runNode(
  args: string[],
  timeoutMs = 15_000,
  onSpawn?: (child: ChildProcess) => void,
  extraFds: number[] = [],
  env?: NodeJS.ProcessEnv,
): Promise<ChildResult> {
  return runCommand(process.execPath, args, timeoutMs, onSpawn, extraFds, env)
}

/**
 * Spawns `file args...`; resolves when it exits (SIGKILLed after timeoutMs). `extraFds` become
 * the child's fds 3, 4, ...
 */
export function runCommand(
  file: string,
  args: string[],
  timeoutMs = 15_000,
  onSpawn?: (child: ChildProcess) => void,
  extraFds: number[] = [],
  env?: NodeJS.ProcessEnv,
): Promise<ChildResult> {
  return new Promise((resolve) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe', ...extraFds], env: env ?? process.env })
    live.add(child)
    onSpawn?.(child)
    let stdout = ''
    let stderr = ''
    child.stdout!.on('data', (d) => {
      stdout += d
    })
    child.stderr!.on('data', (d) => {
      stderr += d
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs * timeScale)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      live.delete(child)
      resolve({ code, signal, stdout, stderr })
    })
  })
}

/**
 * Records what `stream` prints from now on; `waitFor(pattern)` resolves with all of it once it
 * matches (at once if it already does), and rejects after `timeoutMs` (scaled) or at its end.
 */
export function watchOutput(stream: NodeJS.ReadableStream): {
  text(): string
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<string>
} {
  let text = ''
  let ended = false
  const waiters = new Set<() => void>()
  stream.on('data', (d: Buffer | string) => {
    text += d
    for (const w of [...waiters]) w()
  })
  stream.on('end', () => {
    ended = true
    for (const w of [...waiters]) w()
  })
  return {
    text: () => text,
    waitFor: (pattern, timeoutMs = 15_000) =>
      new Promise((resolve, reject) => {
        const check = (): void => {
          if (pattern.test(text)) finish()
          else if (ended) finish(new Error(`output ended without ${pattern}: ${text}`))
        }
        const finish = (err?: Error): void => {
          clearTimeout(timer)
          waiters.delete(check)
          if (err) reject(err)
          else resolve(text)
        }
        const timer = setTimeout(
          () => finish(new Error(`no ${pattern} within ${timeoutMs} ms: ${text}`)),
          timeoutMs * timeScale,
        )
        waiters.add(check)
        check()
      }),
  }
}

/**
 * Runs the Firecracker-like guest (dist/cli/demo/guest.js) with `options`. Without an IPC
 * channel it prints its result as one line of JSON; `parseError` says why that did not parse.
 */
export async function runGuest(
  options: object,
  timeoutMs = 15_000,
): Promise<ChildResult & { result?: Record<string, unknown>; parseError?: string }> {
  const r = await runNode([path.join(dist, 'cli', 'demo', 'guest.js'), JSON.stringify(options)], timeoutMs)
  try {
    return { ...r, result: JSON.parse(r.stdout) as Record<string, unknown> }
  } catch (err) {
    return { ...r, parseError: `${(err as Error).message} in ${JSON.stringify(r.stdout.slice(0, 200))}` }
  }
}

/** Starts the CLI's `serve` (the built binary) with `args`; resolves once it listens. */
export async function startServe(args: string[]): Promise<{
  child: ChildProcess
  done: Promise<ChildResult>
  stderr: ReturnType<typeof watchOutput>
}> {
  let child: ChildProcess | undefined
  let stderr: ReturnType<typeof watchOutput> | undefined
  const done = runNode([path.join(dist, 'cli', 'index.js'), 'serve', ...args], 60_000, (c) => {
    child = c
    stderr = watchOutput(c.stderr!)
  })
  await stderr!.waitFor(/listening on/)
  return { child: child!, done, stderr: stderr! }
}
