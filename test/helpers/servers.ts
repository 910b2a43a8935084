// Real servers for the remote-source tests, started and stopped by the tests themselves:
// nbdkit (file plugin, with its delay/rate/error filters), qemu-nbd (qcow2 images) and nginx
// (HTTP and HTTPS with a certificate made on the spot). Each listens on loopback or on a Unix
// socket in a temporary directory, is killed when its test file ends, and is looked up on PATH
// first so that a missing binary skips with the reason (.ci/run installs them all).
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import * as fs from 'node:fs'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import { timeScale } from './children'

const live = new Set<ChildProcess>()

/**
 * The servers' environment: ours without LD_PRELOAD (the ASan run preloads libasan into node;
 * qemu-img and friends must not inherit it: under it qemu-img hangs).
 */
function serverEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env }
  delete env.LD_PRELOAD
  delete env.ASAN_OPTIONS
  delete env.UBSAN_OPTIONS
  return env
}
const dirs: string[] = []

/** The absolute path of `name` on PATH (and /usr/sbin), or null. */
export function which(name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin']) {
    if (dir === '') continue
    const p = path.join(dir, name)
    try {
      fs.accessSync(p, fs.constants.X_OK)
      return p
    } catch {
      /* next */
    }
  }
  return null
}

/** Why a test needing these binaries cannot run here, or null when it can. */
export function missing(...names: string[]): string | null {
  const absent = names.filter((n) => which(n) === null)
  if (absent.length === 0) return null
  const why = `${absent.join(', ')} not installed (.ci/run installs them: see CONTRIBUTING.md)`
  process.stderr.write(`skipping tests that need ${absent.join(', ')}: ${why}\n`)
  return why
}

export function tempDir(prefix = 'uffd-remote-'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  dirs.push(d)
  return d
}

/** Kills every server started here and removes the temporary directories. */
export function stopServers(): void {
  for (const c of live) c.kill('SIGKILL')
  live.clear()
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true })
}

/** A free TCP port on 127.0.0.1 (the server binds it right after: a tiny race, retried by callers). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port
      s.close(() => resolve(port))
    })
  })
}

async function waitFor(pred: () => boolean, child: ChildProcess, what: string, stderr: () => string): Promise<void> {
  const end = Date.now() + 10_000 * timeScale
  while (!pred()) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new Error(`${what} exited (${child.exitCode ?? child.signalCode}): ${stderr()}`)
    if (Date.now() > end) throw new Error(`${what} not ready within 10 s: ${stderr()}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

export interface Server {
  /** nbd://..., nbd+unix://... or http(s)://... */
  url: string
  child: ChildProcess
  /** SIGKILL now (a server that dies mid-restore) */
  kill(): void
  /** SIGTERM and wait for the exit */
  stop(): Promise<void>
  stderr(): string
}

function track(child: ChildProcess): () => string {
  live.add(child)
  let err = ''
  child.stderr?.on('data', (d) => {
    err += d
  })
  child.on('exit', () => live.delete(child))
  return () => err
}

function server(url: string, child: ChildProcess, stderr: () => string): Server {
  return {
    url,
    child,
    stderr,
    kill: () => child.kill('SIGKILL'),
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve()
        // SIGTERM, then SIGKILL: a server waiting for its clients must not hang a test
        const timer = setTimeout(() => child.kill('SIGKILL'), 2000)
        child.once('exit', () => {
          clearTimeout(timer)
          resolve()
        })
        child.kill('SIGTERM')
      }),
  }
}

export interface NbdkitOptions {
  /** serve on TCP 127.0.0.1 (nbd://) instead of a Unix socket (nbd+unix://) */
  tcp?: boolean
  /** filters and their parameters, e.g. ['delay'], ['delay-read=25ms'] */
  filters?: string[]
  params?: string[]
  exportName?: string
  threads?: number
}

/** nbdkit's file plugin serving `file` read-only. */
export async function startNbdkit(file: string, options: NbdkitOptions = {}): Promise<Server> {
  const dir = tempDir('uffd-nbdkit-')
  const pidFile = path.join(dir, 'pid')
  const exportName = options.exportName ?? 'snap'
  for (let attempt = 0; ; attempt++) {
    const args = ['-f', '-r', '--exit-with-parent', '-P', pidFile, '-e', exportName]
    let url: string
    if (options.tcp) {
      const port = await freePort()
      args.push('-i', '127.0.0.1', '-p', String(port))
      url = `nbd://127.0.0.1:${port}/${exportName}`
    } else {
      const sock = path.join(dir, 'nbd.sock')
      args.push('-U', sock)
      url = `nbd+unix:///${exportName}?socket=${sock}`
    }
    if (options.threads) args.push('-t', String(options.threads))
    for (const f of options.filters ?? []) args.push(`--filter=${f}`)
    args.push('file', `file=${file}`, ...(options.params ?? []))
    const child = spawn(which('nbdkit') ?? 'nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'], env: serverEnv() })
    const stderr = track(child)
    try {
      await waitFor(() => fs.existsSync(pidFile), child, 'nbdkit', stderr)
      return server(url, child, stderr)
    } catch (err) {
      child.kill('SIGKILL')
      if (attempt < 3 && /Address already in use/.test(stderr())) continue
      throw err
    }
  }
}

/** qemu-nbd serving an image (qcow2 or raw) read-only to several clients at once. */
export async function startQemuNbd(image: string, format: 'qcow2' | 'raw', exportName = 'snap'): Promise<Server> {
  const dir = tempDir('uffd-qemu-nbd-')
  const sock = path.join(dir, 'nbd.sock')
  const child = spawn(
    which('qemu-nbd') ?? 'qemu-nbd',
    ['-r', '-f', format, '-x', exportName, '-k', sock, '--shared=8', '--persistent', image],
    { stdio: ['ignore', 'ignore', 'pipe'], env: serverEnv() },
  )
  const stderr = track(child)
  await waitFor(() => fs.existsSync(sock), child, 'qemu-nbd', stderr)
  return server(`nbd+unix:///${exportName}?socket=${sock}`, child, stderr)
}

/** qemu-img convert `raw` into a qcow2 image (compressed with -c); returns its path. */
export function makeQcow2(raw: string, compressed: boolean): string {
  const out = `${raw}.${compressed ? 'compressed' : 'sparse'}.qcow2`
  execFileSync(
    which('qemu-img') ?? 'qemu-img',
    ['convert', ...(compressed ? ['-c'] : []), '-f', 'raw', '-O', 'qcow2', raw, out],
    { env: serverEnv() },
  )
  return out
}

export interface NginxOptions {
  https?: boolean
  /** extra directives inside `server { }` */
  extra?: string
  /** listen on this port (a server restarted where clients expect it) */
  port?: number
}

/** A self-signed certificate for 127.0.0.1/localhost, made with openssl: { cert, key } paths. */
export function makeCertificate(dir: string): { cert: string; key: string } {
  const cert = path.join(dir, 'cert.pem')
  const key = path.join(dir, 'key.pem')
  execFileSync(
    which('openssl') ?? 'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '2',
      '-subj',
      '/CN=localhost',
      '-addext',
      'subjectAltName=IP:127.0.0.1,DNS:localhost',
      '-keyout',
      key,
      '-out',
      cert,
    ],
    { stdio: 'ignore', env: serverEnv() },
  )
  return { cert, key }
}

/** nginx serving `root` (a directory) on 127.0.0.1, with range requests and ETags (its defaults). */
export async function startNginx(root: string, options: NginxOptions = {}): Promise<Server & { cert?: string }> {
  const dir = tempDir('uffd-nginx-')
  const pidFile = path.join(dir, 'nginx.pid')
  const tls = options.https ? makeCertificate(dir) : undefined
  for (let attempt = 0; ; attempt++) {
    const port = options.port ?? (await freePort())
    const conf = `
daemon off;
master_process off;
worker_processes 1;
pid ${pidFile};
error_log ${dir}/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${dir};
  proxy_temp_path ${dir};
  fastcgi_temp_path ${dir};
  uwsgi_temp_path ${dir};
  scgi_temp_path ${dir};
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:${port}${tls ? ' ssl' : ''};
    ${tls ? `ssl_certificate ${tls.cert}; ssl_certificate_key ${tls.key};` : ''}
    root ${root};
    ${options.extra ?? ''}
  }
}
`
    const confFile = path.join(dir, 'nginx.conf')
    fs.writeFileSync(confFile, conf)
    const child = spawn(which('nginx') ?? 'nginx', ['-c', confFile, '-p', dir, '-e', path.join(dir, 'error.log')], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: serverEnv(),
    })
    const stderr = (): string => {
      try {
        return fs.readFileSync(path.join(dir, 'error.log'), 'utf8')
      } catch {
        return ''
      }
    }
    track(child)
    try {
      await waitFor(() => fs.existsSync(pidFile) && portOpen(port), child, 'nginx', stderr)
      const url = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`
      return { ...server(url, child, stderr), cert: tls?.cert }
    } catch (err) {
      child.kill('SIGKILL')
      if (attempt < 3 && /Address already in use/.test(stderr())) continue
      throw err
    }
  }
}

const openPorts = new Set<number>()
function portOpen(port: number): boolean {
  if (openPorts.has(port)) return true
  const s = net.connect(port, '127.0.0.1')
  s.on('connect', () => {
    openPorts.add(port)
    s.destroy()
  })
  s.on('error', () => s.destroy())
  return false
}
