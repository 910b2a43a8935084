// Loads the addon and types its exports. The addon is a thin syscall layer: validation and
// policy live in TypeScript.
import * as fs from 'node:fs'
import * as path from 'node:path'
import bindings from 'bindings'
import type { SnapshotStats } from '../engines/live-snapshot'

type Bytes = ArrayBuffer | ArrayBufferView
type U64 = bigint | number

export interface MappingHandle {
  address(): bigint
  length(): number
  fd(): number
  buffer(): ArrayBuffer
  unmap(): void
  madvise(offset: number, length: number, advice: number): void
  protect(offset: number, length: number, prot: number): void
  read(offset: number, target: Bytes): number
  write(offset: number, source: Bytes): number
}

export interface MappingHandleOptions {
  hugetlb?: boolean
  populate?: boolean
  name?: string
  private?: boolean
}

export interface NativeConstants {
  Feature: Record<string, bigint>
  IoctlBit: Record<string, bigint>
  Ioctl: Record<string, number>
  Mode: Record<string, bigint>
  PagefaultFlag: Record<string, bigint>
  Event: Record<string, number>
  OpenFlag: Record<string, number>
  Prot: Record<string, number>
  Advice: Record<string, number>
  UFFD_API: number
  MSG_SIZE: number
  PAGE_SIZE: number
}

export interface TouchResult {
  values: BigUint64Array
  ns?: Float64Array
  errno: number
}

export interface SnapshotEngine {
  done: Promise<SnapshotStats>
  progress(): SnapshotStats
  cancel(): void
  join(): void
}

export interface Stamper {
  /** this stamper's run number, part of every stamp it writes (see stampOf) */
  run(): number
  counts(): Float64Array
  order(thread: number): Uint32Array
  initial(thread: number): BigUint64Array
  maxGapMs(reset?: boolean): number
  stop(): Promise<{ counts: Float64Array; stale: number }>
}

export interface Binding {
  constants: NativeConstants
  setErrorClass(ctor: new (message: string) => Error): void
  openSyscall(flags: number): number
  openDevice(flags: number, path?: string): number
  api(fd: number, features: bigint): [bigint, bigint]
  close(fd: number): void
  adopt(fd: number): void
  register(fd: number, start: U64, len: U64, mode: bigint): bigint
  unregister(fd: number, start: U64, len: U64): void
  wake(fd: number, start: U64, len: U64): void
  copy(fd: number, dst: U64, src: U64 | Bytes, len: U64, mode: bigint): number
  zeropage(fd: number, start: U64, len: U64, mode: bigint): number
  continue(fd: number, start: U64, len: U64, mode: bigint): number
  poison(fd: number, start: U64, len: U64, mode: bigint): number
  move(fd: number, dst: U64, src: U64, len: U64, mode: bigint): number
  writeProtect(fd: number, start: U64, len: U64, mode: bigint): void
  MappingHandle: new (
    kind: 'anonymous' | 'memfd' | 'alias',
    length: number,
    options: MappingHandleOptions,
    source?: MappingHandle,
  ) => MappingHandle
  touch(
    addresses: BigUint64Array,
    options: {
      write?: boolean
      value?: bigint
      threads?: number
      timings?: boolean
      workNs?: number
      cpu?: number
    },
  ): Promise<TouchResult>
  madviseOnThread(address: bigint, length: number, advice: number): Promise<TouchResult>
  forkOnThread(readAt?: bigint): Promise<TouchResult & { pid: number; status: number }>
  mremapOnThread(address: bigint, oldLength: number, newLength: number): Promise<TouchResult & { result: bigint }>
  munmapOnThread(address: bigint, length: number): Promise<TouchResult>
  mmapRaw(length: number): bigint
  openPollHandles(): number
  readMessages(fd: number, view: ArrayBufferView): number
  pagemapScan(
    pid: number,
    start: U64,
    end: U64,
    flags: U64,
    categoryInverted: U64,
    categoryMask: U64,
    categoryAnyofMask: U64,
    returnMask: U64,
    maxPages: U64,
    maxRegions: U64,
  ): { regions: BigUint64Array; walkEnd: bigint }
  pagemapScanProbe(): number
  SnapshotEngine: new (
    uffd: number,
    start: bigint,
    length: number,
    pageSize: number,
    sink: { fd: number; offset: number } | { buffer: ArrayBuffer | ArrayBufferView },
    options: {
      chunkSize?: number
      faultAround?: number
      maxBytesPerSecond?: number
      backgroundPriority?: string
      populate?: boolean
      copyMethod?: string
    },
  ) => SnapshotEngine
  Stamper: new (
    address: bigint,
    length: number,
    options: { threads?: number; shuffle?: boolean; seed?: number },
  ) => Stamper
}

// module_root is explicit: dist/addon/ and src/addon/ both sit two levels below the package root, and the
// default (walking up from the caller's stack) breaks under bundlers and test runners.
const moduleRoot = path.join(__dirname, '..', '..')

/** Which addon to load: USERFAULTFD_NATIVE=auto (default) | build | prebuild. */
export type NativeSource = 'auto' | 'build' | 'prebuild'

/** glibc or musl, for the prebuild's libc tag (there is no musl prebuild: musl compiles). */
export function libc(): 'glibc' | 'musl' {
  try {
    if (fs.readdirSync('/lib').some((f) => f.startsWith('ld-musl-'))) return 'musl'
  } catch {
    /* no /lib: assume glibc */
  }
  return 'glibc'
}

/**
 * The places the addon is looked for, in order (bindings' path templates):
 * - a local build (build/Release, build/Debug): it exists only when someone compiled on purpose
 *   (a development checkout, `npm install --build-from-source`, or install's fallback when no
 *   prebuild loaded), so it wins and always matches the sources next to it;
 * - then the prebuilt binary for this platform, arch and libc (prebuilds/linux-x64/userfaultfd.glibc.node).
 * USERFAULTFD_NATIVE=build or =prebuild takes only that one (an error if it is absent).
 */
export function candidates(source: NativeSource = nativeSource()): string[][] {
  const build = [
    ['module_root', 'build', 'Release', 'bindings'],
    ['module_root', 'build', 'Debug', 'bindings'],
  ]
  const prebuild = [['module_root', 'prebuilds', `${process.platform}-${process.arch}`, `userfaultfd.${libc()}.node`]]
  return source === 'build' ? build : source === 'prebuild' ? prebuild : [...build, ...prebuild]
}

export function nativeSource(): NativeSource {
  const v = process.env.USERFAULTFD_NATIVE
  if (v === undefined || v === '' || v === 'auto') return 'auto'
  if (v === 'build' || v === 'prebuild') return v
  throw new Error(`USERFAULTFD_NATIVE must be 'auto', 'build' or 'prebuild' (got '${v}')`)
}

function load(): Binding & { path: string } {
  const source = nativeSource()
  try {
    return bindings({ bindings: 'userfaultfd', module_root: moduleRoot, try: candidates(source) }) as Binding & {
      path: string
    }
  } catch (err) {
    const e = err as Error
    if (/Could not locate the bindings file/.test(e.message)) {
      e.message =
        `userfaultfd: no native addon for ${process.platform}-${process.arch} (${libc()})` +
        `${source === 'auto' ? '' : ` with USERFAULTFD_NATIVE=${source}`}. ${e.message}\n` +
        'Compile it: npm rebuild userfaultfd --build-from-source (needs python3, make and a C++ compiler).'
    }
    throw e
  }
}

export const native: Binding = load()
/** The file the addon was loaded from (a local build or a prebuild). */
export const nativePath: string = (native as Binding & { path: string }).path
