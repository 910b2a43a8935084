// Userfaultfd: one userfaultfd file descriptor and every ioctl on it.
import * as fs from 'node:fs'
import { debug } from '../util/diagnostics'
import { native } from '../addon/native'
import { IntervalSet } from '../util/interval-set'
import { checkOptions, describe, flag, int } from '../util/validate'
import { Feature, Mode, OpenFlag, PAGE_SIZE, UFFD_MSG_SIZE, featureNames } from './constants'
import { PERMISSION_HINT, type UffdError, isPermissionError, uffdError } from './errors'
import { EventStream, type EventsOptions } from './events'
import { decodeMessages, type UffdMessage } from './messages'
import { probe, type Probe, type Via } from './probe'
import { asBytes, checkAligned, pageSizeOf, toAddress, toLength, toRange, type Bytes, type RangeLike } from './range'
import { hasFeature, unofferedFeatures, unsupported } from './kernel-features'

/** Options of Userfaultfd.open(). */
export interface OpenOptions {
  /** Feature.* bits OR-ed together; the kernel must offer every one (see Userfaultfd.probe()). */
  features?: bigint
  /** 'auto' (default): the syscall, falling back to /dev/userfaultfd on EPERM/EACCES/ENOSYS, and back. */
  via?: 'auto' | Via
  /** UFFD_USER_MODE_ONLY: always permitted, but faults raised inside syscalls are not delivered. */
  userModeOnly?: boolean
  /** Always on: the event reader needs O_NONBLOCK. */
  nonBlocking?: true
  /** Always on: across exec the fd would stay tied to the old address space. */
  closeOnExec?: true
}

/** Which faults of a range to receive (UFFDIO_REGISTER modes); the default is `{ missing: true }`. */
export interface RegisterModes {
  /** MISSING faults: a page not present yet (resolve with copy, zeropage, poison, move). */
  missing?: boolean
  /** WP faults: a write to a write-protected page (resolve with writeProtect(range, { protect: false })). */
  wp?: boolean
  /** MINOR faults (shmem, hugetlbfs): the page is in the page cache but not mapped here (resolve with continue). */
  minor?: boolean
}
/** Whether an ioctl wakes the threads waiting on the range (default true). */
export interface WakeOption {
  /** false: leave the faulting threads asleep (wake them later with wake(), or another op). */
  wake?: boolean
}
/** Options of copy() and continue(). */
export interface CopyOptions extends WakeOption {
  /** Map the page write-protected (COPY_MODE_WP / CONTINUE_MODE_WP). */
  wp?: boolean
}
/** Options of writeProtect(). */
export interface WriteProtectOptions extends WakeOption {
  /** true (default): protect; false: unprotect (and wake, unless `wake: false`). */
  protect?: boolean
}
/** Options of move(). */
export interface MoveOptions extends WakeOption {
  /** UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: skip holes in the source instead of failing with ENOENT. */
  allowSrcHoles?: boolean
}

/**
 * A message read from the uffd (struct uffd_msg, decoded):
 * - `pagefault`: a thread touched `address` (`write`, `wp`: a write-protect fault, `minor`; `tid` with Feature.THREAD_ID)
 * - `fork`: the process forked with EVENT_FORK: `uffd` serves the child (yours to close)
 * - `remap`: mremap moved `length` bytes `from` -> `to` (EVENT_REMAP)
 * - `remove`: MADV_DONTNEED/REMOVE dropped [start, end) (EVENT_REMOVE)
 * - `unmap`: munmap of [start, end) (EVENT_UNMAP)
 * - `unknown`: an event type this version does not know
 */
export type UffdEvent =
  | { type: 'pagefault'; address: bigint; flags: bigint; write: boolean; wp: boolean; minor: boolean; tid?: number }
  | { type: 'fork'; uffd: Userfaultfd }
  | { type: 'remap'; from: bigint; to: bigint; length: number }
  | { type: 'remove'; start: bigint; end: bigint }
  | { type: 'unmap'; start: bigint; end: bigint }
  | { type: 'unknown'; event: number }

/** What an event stream yields: single events (default), or arrays of them with `{ batch }`. */
export type EventItem = UffdEvent | UffdEvent[]

/** Where a copy or move goes (or comes from): an address, or a range's start (a Mapping, say). */
export type Address = bigint | RangeLike
/** What UFFDIO_COPY copies from: an address in this process, or bytes. */
export type CopySource = Address | Bytes

const FALLBACK_CODES = new Set(['EPERM', 'EACCES', 'ENOSYS', 'ENOENT', 'ENODEV'])
const MAX_BATCH = 4096

// An fd dropped without close() is closed when its object is collected, with a warning (as
// Node does for a FileHandle), so a forgotten uffd does not pin the address space forever.
const leaked = new FinalizationRegistry<number>((fd) => {
  try {
    native.close(fd)
  } catch {
    /* already gone */
  }
  process.emitWarning(`userfaultfd: closing fd ${fd} on garbage collection; call close() explicitly`, 'UffdWarning')
})

const USERFAULTFD_LINK = 'anon_inode:[userfaultfd]'
const S_IFMT = 0o170000

/**
 * What `fd` is: its /proc/self/fd link ('anon_inode:[userfaultfd]', '/dev/pts/0', 'pipe:[123]'),
 * or undefined if it is not open. Without /proc (a bare chroot), only "some anonymous inode" can
 * be told apart from files, pipes and sockets: that much passes as a userfaultfd.
 */
function fdKind(fd: number): string | undefined {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`)
  } catch {
    if (fs.existsSync('/proc/self/fd')) return undefined
    let mode: number
    try {
      mode = fs.fstatSync(fd).mode
    } catch {
      return undefined
    }
    return (mode & S_IFMT) === 0 ? USERFAULTFD_LINK : `not an anonymous inode (mode 0${mode.toString(8)})`
  }
}

/** True if `fd` is an open userfaultfd (its /proc/self/fd link is anon_inode:[userfaultfd]). */
export function isUserfaultfd(fd: number): boolean {
  return Number.isSafeInteger(fd) && fd >= 0 && fdKind(fd) === USERFAULTFD_LINK
}

function withHint<T extends Error>(err: T, hint: string): T {
  ;(err as { hint?: string }).hint = hint
  err.message += `\n${hint}`
  return err
}

/**
 * A userfaultfd: register ranges of memory, read their fault events, and resolve them with the
 * UFFDIO_* ioctls. Open one with Userfaultfd.open(), or adopt one from elsewhere with fromFd().
 * Every failed call throws a UffdError (code, errno, syscall); see docs/api.md.
 */
export class Userfaultfd {
  #fd: number
  #view: DataView | undefined
  #stream: Pick<EventStream<EventItem>, 'updateRef' | 'close'> | undefined
  #registered = new IntervalSet()
  #followed = new WeakSet<object>() // Mappings whose unmap() we listen to
  #refed = true
  #readListeners = new Set<() => void>()
  /** Features enabled on this fd: those requested (plus WP_UNPOPULATED with WP_ASYNC). */
  readonly features: bigint
  /** ioctls the fd supports (from UFFDIO_API). */
  readonly ioctls: bigint
  /** How the fd was obtained. */
  readonly via: Via | 'inherited'

  private constructor(fd: number, features: bigint, ioctls: bigint, via: Via | 'inherited') {
    this.#fd = fd
    this.features = features
    this.ioctls = ioctls
    this.via = via
    leaked.register(this, fd, this)
  }

  /** What the kernel offers and whether this process may use it. Cached; never throws for EPERM. */
  static probe(options: { refresh?: boolean } = {}): Probe {
    return probe(options)
  }

  /** Opens a userfaultfd and performs the UFFDIO_API handshake with `features`. */
  static open(options: OpenOptions = {}): Userfaultfd {
    const opts = checkOptions(options, 'open')
    const features = opts.features ?? 0n
    if (typeof features !== 'bigint' || features < 0n) {
      throw new TypeError(`features must be a non-negative bigint of Feature.* bits (got ${describe(features)})`)
    }
    const via = opts.via ?? 'auto'
    if (via !== 'auto' && via !== 'device' && via !== 'syscall') {
      throw new TypeError(`via must be 'auto', 'device' or 'syscall' (got ${describe(via)})`)
    }
    for (const name of ['nonBlocking', 'closeOnExec']) {
      if (opts[name] !== undefined && opts[name] !== true) {
        throw new TypeError(
          `${name} can only be true: ${
            name === 'nonBlocking'
              ? 'the event reader needs O_NONBLOCK'
              : 'across exec a uffd stays tied to the old address space'
          }`,
        )
      }
    }
    const userModeOnly = flag(opts, 'userModeOnly', false)
    // A feature this kernel does not offer: say which, and the release that brought it.
    const lacking = unofferedFeatures(features, 'Userfaultfd.open({ features })')
    if (lacking !== undefined) throw lacking
    const flags = OpenFlag.O_CLOEXEC | OpenFlag.O_NONBLOCK | (userModeOnly ? OpenFlag.UFFD_USER_MODE_ONLY : 0)

    const order: Via[] = via === 'auto' ? ['syscall', 'device'] : [via]
    let fd = -1
    let used: Via = order[0]
    const failures: Array<{ path: Via; err: UffdError }> = []
    for (const path of order) {
      try {
        fd = path === 'syscall' ? native.openSyscall(flags) : native.openDevice(flags)
        used = path
        break
      } catch (err) {
        failures.push({ path, err: err as UffdError })
        if (!FALLBACK_CODES.has((err as UffdError).code)) break
      }
    }
    if (fd < 0) {
      // 'auto' tried both: report the permission error (the syscall's EPERM in a Docker container
      // without --device, say) over the device's mere absence (ENOENT), and name the other one.
      // The last attempt stands when it was itself refused (EACCES on the device, say).
      const last = failures[failures.length - 1]
      const denied = isPermissionError(last.err) ? last : (failures.find((f) => isPermissionError(f.err)) ?? last)
      const err = denied.err
      for (const f of failures) {
        if (f !== denied)
          err.message += ` (and ${f.path === 'device' ? '/dev/userfaultfd' : 'the userfaultfd(2) syscall'}: ${f.err.code})`
      }
      if (isPermissionError(err) || err.code === 'ENOSYS' || err.code === 'ENOENT') withHint(err, PERMISSION_HINT)
      if (debug.enabled) debug('open failed: %s', err.message)
      throw err
    }

    try {
      // The kernel's answer lists every feature it offers, not what this fd got: the fd gets
      // what was asked for, plus WP_UNPOPULATED, which WP_ASYNC implies (the kernel turns it on).
      // THREAD_ID is always asked for where offered: the deadlock watchdog tells by the faulting
      // thread's id whether the JS thread waits for itself (it is not reported in `features`
      // unless asked for, and events carry `tid` only then).
      const internal = (probe().features & Feature.THREAD_ID) !== 0n ? Feature.THREAD_ID : 0n
      const [, ioctls] = native.api(fd, features | internal)
      const granted = (features & Feature.WP_ASYNC) !== 0n ? features | Feature.WP_UNPOPULATED : features
      if (debug.enabled) debug('open: fd %d via %s, features %s', fd, used, featureNames(granted).join('|') || 'none')
      return new Userfaultfd(fd, granted, ioctls, used)
    } catch (err) {
      native.close(fd)
      const e = err as UffdError
      if (e.code === 'EINVAL' && features !== 0n) {
        const offered = probe().features
        const missing = featureNames(features & ~offered)
        if (missing.length > 0) {
          withHint(
            e,
            `this kernel (${probe().kernel}) does not offer: ${missing.join(', ')}; check Userfaultfd.probe().features`,
          )
        }
      } else if (e.code === 'EPERM' && (features & Feature.EVENT_FORK) !== 0n) {
        withHint(e, 'Feature.EVENT_FORK needs CAP_SYS_PTRACE')
      }
      throw e
    }
  }

  /**
   * Wraps a uffd whose UFFDIO_API handshake was already done elsewhere: one received over a
   * socket, or one created by a FORK event. Takes ownership of the fd.
   */
  static fromFd(fd: number, options: { features?: bigint; ioctls?: bigint } = {}): Userfaultfd {
    if (!Number.isSafeInteger(fd) || fd < 0)
      throw new TypeError(`fd must be a non-negative integer (got ${describe(fd)})`)
    const opts = checkOptions(options, 'fromFd')
    for (const name of ['features', 'ioctls']) {
      const v = opts[name]
      if (v !== undefined && (typeof v !== 'bigint' || v < 0n))
        throw new TypeError(`fromFd: ${name} must be a non-negative bigint (got ${describe(v)})`)
    }
    // Before anything touches the fd's flags (adopt sets O_NONBLOCK on the open file, which a
    // stdin or a shared file would then have for every process using it), and before this
    // object takes ownership (close): it must really be a userfaultfd.
    const kind = fdKind(fd)
    if (kind !== USERFAULTFD_LINK) {
      throw uffdError(
        kind === undefined ? 'EBADF' : 'EINVAL',
        'fromFd',
        kind === undefined ? `fd ${fd} is not open` : `fd ${fd} is ${kind}, not a userfaultfd; it was left untouched`,
      )
    }
    native.adopt(fd)
    if (debug.enabled) debug('fromFd: adopted fd %d', fd)
    return new Userfaultfd(fd, (opts.features as bigint) ?? 0n, (opts.ioctls as bigint) ?? 0n, 'inherited')
  }

  /** The file descriptor (owned by this object: close() closes it). */
  get fd(): number {
    return this.#live('fd')
  }

  /** True after close(). */
  get closed(): boolean {
    return this.#fd < 0
  }

  /** True if every bit of `feature` was granted. */
  has(feature: bigint): boolean {
    return (this.features & feature) === feature
  }

  /** UFFDIO_REGISTER. Default mode: missing. Returns the ioctls allowed on the range. */
  register(range: RangeLike, modes: RegisterModes = { missing: true }): bigint {
    const fd = this.#live('ioctl(UFFDIO_REGISTER)')
    const r = toRange(range)
    const m = checkOptions(modes, 'register')
    let mode = 0n
    if (flag(m, 'missing', false)) mode |= Mode.REGISTER_MODE_MISSING
    if (flag(m, 'wp', false)) mode |= Mode.REGISTER_MODE_WP
    if (flag(m, 'minor', false)) mode |= Mode.REGISTER_MODE_MINOR
    if (mode === 0n) throw new RangeError('register: choose at least one of missing, wp, minor')
    try {
      const ioctls = native.register(fd, r.address, r.length, mode)
      if (debug.enabled)
        debug('register: fd %d, 0x%s +%d, mode %s', fd, r.address.toString(16), r.length, mode.toString(16))
      this.#registered.add(r.address, r.address + BigInt(r.length))
      this.#stream?.updateRef()
      this.#followUnmap(range)
      return ioctls
    } catch (err) {
      const e = err as UffdError
      if (e.code === 'EINVAL' && (mode & Mode.REGISTER_MODE_WP) !== 0n && !hasFeature('PAGEFAULT_FLAG_WP'))
        throw unsupported('PAGEFAULT_FLAG_WP', 'register() with { wp: true }')
      if (
        e.code === 'EINVAL' &&
        (mode & Mode.REGISTER_MODE_MINOR) !== 0n &&
        !hasFeature('MINOR_SHMEM') &&
        !hasFeature('MINOR_HUGETLBFS')
      )
        throw unsupported('MINOR_HUGETLBFS', 'register() with { minor: true }')
      if (e.code === 'EINVAL' && (mode & Mode.REGISTER_MODE_MINOR) !== 0n) {
        withHint(e, 'MINOR faults need shared memory (shmem or hugetlbfs: Mapping.memfd), not anonymous memory')
      } else if (e.code === 'EBUSY') {
        withHint(e, 'another userfaultfd already registered (part of) this range')
      } else if (e.code === 'EINVAL') {
        withHint(
          e,
          'the range must be mapped (no part of it a hole), page-aligned, of a kind the mode supports (WP and MINOR on hugetlb/shmem need Feature.WP_HUGETLBFS_SHMEM / MINOR_HUGETLBFS / MINOR_SHMEM), and not VM_PFNMAP/IO memory',
        )
      }
      throw e
    }
  }

  // A Mapping's unmap() unregisters it in the kernel without an event (unless EVENT_UNMAP):
  // forget it here too, so that it stops keeping the process alive.
  #followUnmap(range: RangeLike): void {
    const mapping = range as { _onUnmap?: (listener: (address: bigint, length: number) => void) => void }
    if (typeof mapping._onUnmap !== 'function' || this.#followed.has(mapping)) return
    this.#followed.add(mapping)
    mapping._onUnmap((address, length) => {
      this.#registered.remove(address, address + BigInt(length))
      this.#stream?.updateRef()
    })
  }

  /** UFFDIO_UNREGISTER. */
  unregister(range: RangeLike): void {
    const fd = this.#live('ioctl(UFFDIO_UNREGISTER)')
    const r = toRange(range)
    native.unregister(fd, r.address, r.length)
    this.#registered.remove(r.address, r.address + BigInt(r.length))
    this.#stream?.updateRef()
  }

  /** UFFDIO_WAKE: wakes threads waiting on faults in the range. */
  wake(range: RangeLike): void {
    const fd = this.#live('ioctl(UFFDIO_WAKE)')
    const r = toRange(range)
    native.wake(fd, r.address, r.length)
  }

  /**
   * UFFDIO_COPY: fills [dst, dst + length) with a copy of src and (unless wake: false) wakes the
   * faulting threads. src: bytes (length defaults to their size), or an address/Mapping.
   * Returns bytes copied; a partial copy throws UffdError EAGAIN with `bytes`.
   */
  copy(dst: Address, src: CopySource, length?: number, options?: CopyOptions): number {
    const fd = this.#live('ioctl(UFFDIO_COPY)')
    const d = toAddress(dst, 'dst')
    let len: number
    let s: bigint | ArrayBuffer | ArrayBufferView
    const bytes = asBytes(src)
    if (bytes !== undefined) {
      if (bytes.byteLength === 0) throw new RangeError('copy: src is empty (or its buffer was detached)')
      len = toLength(length ?? bytes.byteLength, 'length')
      if (len > bytes.byteLength) throw new RangeError(`copy: length ${len} exceeds src (${bytes.byteLength} bytes)`)
      s = bytes
    } else {
      s = toAddress(src, 'src')
      if (length === undefined) {
        if (typeof src === 'object' && src !== null && 'length' in src) len = toLength(src.length, 'src.length')
        else throw new TypeError('copy: length is required when src is an address')
      } else {
        len = toLength(length, 'length')
      }
    }
    checkAligned(d, len, 'copy', pageSizeOf(dst))
    const o = checkOptions(options, 'copy')
    let mode = 0n
    if (!flag(o, 'wake', true)) mode |= Mode.COPY_MODE_DONTWAKE
    if (flag(o, 'wp', false)) mode |= Mode.COPY_MODE_WP
    try {
      return native.copy(fd, d, s, len, mode)
    } catch (err) {
      throw (mode & Mode.COPY_MODE_WP) !== 0n
        ? this.#lacking(err as UffdError, 'PAGEFAULT_FLAG_WP', 'copy() with { wp: true }')
        : err
    }
  }

  /** UFFDIO_ZEROPAGE: maps zero pages. Returns bytes done. */
  zeropage(range: RangeLike, options?: WakeOption): number {
    const fd = this.#live('ioctl(UFFDIO_ZEROPAGE)')
    const r = toRange(range)
    const mode = flag(checkOptions(options, 'zeropage'), 'wake', true) ? 0n : Mode.ZEROPAGE_MODE_DONTWAKE
    return native.zeropage(fd, r.address, r.length, mode)
  }

  /** UFFDIO_CONTINUE: maps the page-cache pages already present (resolves MINOR faults). */
  continue(range: RangeLike, options?: CopyOptions): number {
    const fd = this.#live('ioctl(UFFDIO_CONTINUE)')
    const r = toRange(range)
    const o = checkOptions(options, 'continue')
    let mode = 0n
    if (!flag(o, 'wake', true)) mode |= Mode.CONTINUE_MODE_DONTWAKE
    if (flag(o, 'wp', false)) mode |= Mode.CONTINUE_MODE_WP
    try {
      return native.continue(fd, r.address, r.length, mode)
    } catch (err) {
      // { wp: true } needs write protection, and a kernel that knows the mode (6.4+).
      if ((mode & Mode.CONTINUE_MODE_WP) === 0n) throw err
      const lacking = this.#lacking(err as UffdError, 'PAGEFAULT_FLAG_WP', 'continue() with { wp: true }')
      throw lacking !== err
        ? lacking
        : this.#lacking(err as UffdError, 'CONTINUE_MODE_WP', 'continue() with { wp: true }')
    }
  }

  /**
   * UFFDIO_WRITEPROTECT: protect (default) or unprotect a range. wake: false (DONTWAKE) only
   * applies when unprotecting.
   */
  writeProtect(range: RangeLike, options?: WriteProtectOptions): void {
    const fd = this.#live('ioctl(UFFDIO_WRITEPROTECT)')
    const r = toRange(range)
    const o = checkOptions(options, 'writeProtect')
    const protect = flag(o, 'protect', true)
    const wake = flag(o, 'wake', true)
    let mode = 0n
    if (protect) mode |= Mode.WRITEPROTECT_MODE_WP
    if (!wake) mode |= Mode.WRITEPROTECT_MODE_DONTWAKE
    try {
      native.writeProtect(fd, r.address, r.length, mode)
    } catch (err) {
      const e = err as UffdError
      if (!hasFeature('PAGEFAULT_FLAG_WP')) throw unsupported('PAGEFAULT_FLAG_WP', 'writeProtect()')
      if (e.code === 'EINVAL' && protect && !wake) withHint(e, 'wake: false (DONTWAKE) is only valid when unprotecting')
      else if (e.code === 'ENOENT') withHint(e, 'the range must be registered with { wp: true }')
      throw e
    }
  }

  /** UFFDIO_POISON: marks pages poisoned; touching them raises SIGBUS. Returns bytes done. */
  poison(range: RangeLike, options?: WakeOption): number {
    const fd = this.#live('ioctl(UFFDIO_POISON)')
    const r = toRange(range)
    const mode = flag(checkOptions(options, 'poison'), 'wake', true) ? 0n : Mode.POISON_MODE_DONTWAKE
    try {
      return native.poison(fd, r.address, r.length, mode)
    } catch (err) {
      throw this.#lacking(err as UffdError, 'POISON', 'uffd.poison()')
    }
  }

  // An ioctl (or mode) newer than the kernel is EINVAL (unknown to userfaultfd_ioctl): an
  // UnsupportedError naming the feature and its release instead.
  #lacking(err: UffdError, feature: 'POISON' | 'MOVE' | 'PAGEFAULT_FLAG_WP' | 'CONTINUE_MODE_WP', what: string): Error {
    if (err.code === 'EINVAL' && !hasFeature(feature)) return unsupported(feature, what)
    return err
  }

  /**
   * UFFDIO_MOVE: moves pages from src to dst (anonymous memory of this process only) instead of
   * copying them. Returns bytes moved.
   */
  move(dst: Address, src: Address, length: number, options?: MoveOptions): number {
    const fd = this.#live('ioctl(UFFDIO_MOVE)')
    const d = toAddress(dst, 'dst')
    const s = toAddress(src, 'src')
    const len = toLength(length, 'length')
    checkAligned(d, len, 'move dst', pageSizeOf(dst))
    checkAligned(s, len, 'move src', pageSizeOf(src))
    const o = checkOptions(options, 'move')
    let mode = 0n
    if (!flag(o, 'wake', true)) mode |= Mode.MOVE_MODE_DONTWAKE
    if (flag(o, 'allowSrcHoles', false)) mode |= Mode.MOVE_MODE_ALLOW_SRC_HOLES
    try {
      return native.move(fd, d, s, len, mode)
    } catch (err) {
      throw this.#lacking(err as UffdError, 'MOVE', 'uffd.move()')
    }
  }

  /**
   * Reads pending messages without blocking (one read(2) of up to `max`): [] when none are
   * pending. A 'fork' event carries a ready Userfaultfd for the child's address space, which the
   * caller owns. events() is the async form.
   */
  read(max = 64): UffdEvent[] {
    const fd = this.#live('read')
    int(max, 'max', 1, MAX_BATCH)
    if (this.#view === undefined || this.#view.byteLength < max * UFFD_MSG_SIZE) {
      this.#view = new DataView(new ArrayBuffer(Math.max(max, 64) * UFFD_MSG_SIZE))
    }
    const view = new DataView(this.#view.buffer, 0, max * UFFD_MSG_SIZE)
    const count = native.readMessages(fd, view)
    const events = this.toEvents(decodeMessages(view, count, this.has(Feature.THREAD_ID)))
    if (count > 0) this._onBatch(events)
    return events
  }

  /**
   * The event stream: an async iterable of events (or of arrays of events with { batch }).
   * One read(2) drains many messages per wake-up. It ends when the uffd is closed, with an
   * AbortError when `signal` aborts; `break` releases it. One stream at a time per uffd.
   */
  events(options?: EventsOptions & { batch?: false }): EventStream<UffdEvent>
  events(options: EventsOptions & { batch: true | number }): EventStream<UffdEvent[]>
  events(options?: EventsOptions): EventStream<UffdEvent> | EventStream<UffdEvent[]>
  events(options: EventsOptions = {}): EventStream<UffdEvent> | EventStream<UffdEvent[]> {
    this.#live('events')
    if (this.#stream !== undefined) {
      throw uffdError(
        'EBUSY',
        'events',
        'this userfaultfd already has an active event stream; end it (break, abort) first',
      )
    }
    const stream = new EventStream<EventItem>(this, options)
    this.#stream = stream
    return stream as EventStream<UffdEvent> | EventStream<UffdEvent[]>
  }

  /** Lets the process exit while the event stream waits (like socket.unref()). */
  unref(): this {
    this.#refed = false
    this.#stream?.updateRef()
    return this
  }

  /** Undoes unref(): the stream keeps the process alive while ranges are registered. */
  ref(): this {
    this.#refed = true
    this.#stream?.updateRef()
    return this
  }

  /** @internal registers a callback run after each read of events; returns its remover. */
  _onRead(listener: () => void): () => void {
    this.#readListeners.add(listener)
    return () => this.#readListeners.delete(listener)
  }

  /** @internal bookkeeping after each read: registrations follow remap/unmap; resolvers retry. */
  _onBatch(events: UffdEvent[]): void {
    let changed = false
    for (const e of events) {
      if (e.type === 'remap') {
        this.#registered.move(e.from, e.to, BigInt(e.length))
      } else if (e.type === 'unmap') {
        this.#registered.remove(e.start, e.end)
        changed = true
      }
    }
    if (changed) this.#stream?.updateRef()
    for (const listener of this.#readListeners) listener()
  }

  /** @internal */
  _onStreamEnd(stream: object): void {
    if (this.#stream === stream) this.#stream = undefined
  }

  /**
   * @internal events a stream read but never handed out: each faulting thread is woken to fault
   * again (the next reader gets it), and fork uffds, which nobody will serve, are closed.
   */
  _release(events: UffdEvent[]): void {
    for (const e of events) {
      if (e.type === 'fork') {
        e.uffd.close()
      } else if (e.type === 'pagefault' && this.#fd >= 0) {
        // The kernel matches waiters by the address in their message, whatever the page size.
        try {
          native.wake(this.#fd, e.address & ~BigInt(PAGE_SIZE - 1), PAGE_SIZE)
        } catch {
          // Nothing better to do from an ending stream: the thread waits for the next resolver.
        }
      }
    }
  }

  /** @internal keep the process alive? Only while something can fault (or the fd came from elsewhere). */
  _wantsRef(): boolean {
    return this.#refed && (this.via === 'inherited' || !this.#registered.empty)
  }

  /** @internal decoded messages to public events: FORK fds become Userfaultfd objects. */
  toEvents(messages: UffdMessage[]): UffdEvent[] {
    return messages.map(
      (m): UffdEvent =>
        m.type === 'fork'
          ? { type: 'fork', uffd: Userfaultfd.fromFd(m.fd, { features: this.features, ioctls: this.ioctls }) }
          : m,
    )
  }

  /**
   * Closes the fd. Idempotent. The kernel then unregisters every range and wakes threads blocked
   * in faults; they retry as ordinary faults (anonymous memory reads as zeros).
   */
  close(): void {
    const fd = this.#fd
    if (fd < 0) return
    // Stop polling before the fd number can be reused.
    this.#stream?.close()
    this.#fd = -1
    this.#registered.clear()
    leaked.unregister(this)
    native.close(fd)
    if (debug.enabled) debug('close: fd %d', fd)
  }

  /** close(), for `using uffd = Userfaultfd.open()` (TypeScript 5.2+ or Node 24+). */
  [Symbol.dispose](): void {
    this.close()
  }

  #live(syscall: string): number {
    if (this.#fd < 0) throw uffdError('EBADF', syscall, 'the userfaultfd was closed')
    return this.#fd
  }
}
