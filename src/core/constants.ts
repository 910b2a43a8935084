// The kernel's constants, named as in <linux/userfaultfd.h>, with values from the addon (which
// defines what older build headers lack).
import { native } from '../addon/native'

const c = native.constants

/** UFFD_FEATURE_* bits (uffdio_api.features). */
export const Feature = Object.freeze({
  /** Write-protect faults (register with { wp }), anonymous memory (Linux 5.7+). */
  PAGEFAULT_FLAG_WP: c.Feature.PAGEFAULT_FLAG_WP,
  /** A 'fork' event per fork(2) of a registered process: the child's memory gets its own uffd (needs CAP_SYS_PTRACE; 4.11+). */
  EVENT_FORK: c.Feature.EVENT_FORK,
  /** 'remap' events for mremap(2) of registered memory (4.11+). */
  EVENT_REMAP: c.Feature.EVENT_REMAP,
  /** 'remove' events for MADV_DONTNEED/MADV_REMOVE of registered memory; the madvise caller waits until the event is read (4.11+). */
  EVENT_REMOVE: c.Feature.EVENT_REMOVE,
  /** MISSING faults on hugetlbfs memory (4.11+). */
  MISSING_HUGETLBFS: c.Feature.MISSING_HUGETLBFS,
  /** MISSING faults on shmem memory (4.11+). */
  MISSING_SHMEM: c.Feature.MISSING_SHMEM,
  /** 'unmap' events for munmap(2) of registered memory (4.11+). */
  EVENT_UNMAP: c.Feature.EVENT_UNMAP,
  /** No fault events: missing pages raise SIGBUS instead (4.14+). */
  SIGBUS: c.Feature.SIGBUS,
  /** The faulting thread's id in 'pagefault' events (`tid`; 4.14+). */
  THREAD_ID: c.Feature.THREAD_ID,
  /** MINOR faults on hugetlbfs (register with { minor }, resolve with continue(); 5.13+). */
  MINOR_HUGETLBFS: c.Feature.MINOR_HUGETLBFS,
  /** MINOR faults on shmem (5.14+). */
  MINOR_SHMEM: c.Feature.MINOR_SHMEM,
  /** Fault addresses not rounded down to the page (5.18+). */
  EXACT_ADDRESS: c.Feature.EXACT_ADDRESS,
  /** Write protection on hugetlbfs and shmem memory (5.19+). */
  WP_HUGETLBFS_SHMEM: c.Feature.WP_HUGETLBFS_SHMEM,
  /** Write protection also covers pages never populated (6.4+). */
  WP_UNPOPULATED: c.Feature.WP_UNPOPULATED,
  /** UFFDIO_POISON: mark pages so that touching them raises SIGBUS (6.6+). */
  POISON: c.Feature.POISON,
  /** Write-protect faults resolved by the kernel itself, leaving the page marked written (dirty tracking with PAGEMAP_SCAN; 6.7+). */
  WP_ASYNC: c.Feature.WP_ASYNC,
  /** UFFDIO_MOVE: move anonymous pages within the process instead of copying them (6.8+). */
  MOVE: c.Feature.MOVE,
} as const)
/** A name of Feature ('EVENT_REMOVE', ...). */
export type FeatureName = keyof typeof Feature

/** Bits of the `ioctls` masks returned by UFFDIO_API and UFFDIO_REGISTER: 1n << _UFFDIO_*. */
export const IoctlBit = Object.freeze({
  /** UFFDIO_REGISTER is allowed. */
  REGISTER: c.IoctlBit.REGISTER,
  /** UFFDIO_UNREGISTER is allowed. */
  UNREGISTER: c.IoctlBit.UNREGISTER,
  /** UFFDIO_WAKE is allowed. */
  WAKE: c.IoctlBit.WAKE,
  /** UFFDIO_COPY is allowed. */
  COPY: c.IoctlBit.COPY,
  /** UFFDIO_ZEROPAGE is allowed. */
  ZEROPAGE: c.IoctlBit.ZEROPAGE,
  /** UFFDIO_MOVE is allowed. */
  MOVE: c.IoctlBit.MOVE,
  /** UFFDIO_WRITEPROTECT is allowed. */
  WRITEPROTECT: c.IoctlBit.WRITEPROTECT,
  /** UFFDIO_CONTINUE is allowed. */
  CONTINUE: c.IoctlBit.CONTINUE,
  /** UFFDIO_POISON is allowed. */
  POISON: c.IoctlBit.POISON,
  /** UFFDIO_API is allowed. */
  API: c.IoctlBit.API,
} as const)
/** A name of IoctlBit ('COPY', ...). */
export type IoctlName = keyof typeof IoctlBit

/** ioctl request numbers. */
export const Ioctl = Object.freeze({
  UFFDIO_API: c.Ioctl.UFFDIO_API,
  UFFDIO_REGISTER: c.Ioctl.UFFDIO_REGISTER,
  UFFDIO_UNREGISTER: c.Ioctl.UFFDIO_UNREGISTER,
  UFFDIO_WAKE: c.Ioctl.UFFDIO_WAKE,
  UFFDIO_COPY: c.Ioctl.UFFDIO_COPY,
  UFFDIO_ZEROPAGE: c.Ioctl.UFFDIO_ZEROPAGE,
  UFFDIO_MOVE: c.Ioctl.UFFDIO_MOVE,
  UFFDIO_WRITEPROTECT: c.Ioctl.UFFDIO_WRITEPROTECT,
  UFFDIO_CONTINUE: c.Ioctl.UFFDIO_CONTINUE,
  UFFDIO_POISON: c.Ioctl.UFFDIO_POISON,
  USERFAULTFD_IOC_NEW: c.Ioctl.USERFAULTFD_IOC_NEW,
} as const)

/** UFFDIO_*_MODE_* values for each ioctl's `mode` field. */
export const Mode = Object.freeze({
  REGISTER_MODE_MISSING: c.Mode.REGISTER_MODE_MISSING,
  REGISTER_MODE_WP: c.Mode.REGISTER_MODE_WP,
  REGISTER_MODE_MINOR: c.Mode.REGISTER_MODE_MINOR,
  COPY_MODE_DONTWAKE: c.Mode.COPY_MODE_DONTWAKE,
  COPY_MODE_WP: c.Mode.COPY_MODE_WP,
  ZEROPAGE_MODE_DONTWAKE: c.Mode.ZEROPAGE_MODE_DONTWAKE,
  WRITEPROTECT_MODE_WP: c.Mode.WRITEPROTECT_MODE_WP,
  WRITEPROTECT_MODE_DONTWAKE: c.Mode.WRITEPROTECT_MODE_DONTWAKE,
  CONTINUE_MODE_DONTWAKE: c.Mode.CONTINUE_MODE_DONTWAKE,
  CONTINUE_MODE_WP: c.Mode.CONTINUE_MODE_WP,
  POISON_MODE_DONTWAKE: c.Mode.POISON_MODE_DONTWAKE,
  MOVE_MODE_DONTWAKE: c.Mode.MOVE_MODE_DONTWAKE,
  MOVE_MODE_ALLOW_SRC_HOLES: c.Mode.MOVE_MODE_ALLOW_SRC_HOLES,
} as const)

/** UFFDIO_REGISTER_MODE_* (also available in Mode). */
export const RegisterMode = Object.freeze({
  MISSING: c.Mode.REGISTER_MODE_MISSING,
  WP: c.Mode.REGISTER_MODE_WP,
  MINOR: c.Mode.REGISTER_MODE_MINOR,
} as const)

/** UFFD_PAGEFAULT_FLAG_* (uffd_msg.pagefault.flags). */
export const PagefaultFlag = Object.freeze({
  WRITE: c.PagefaultFlag.WRITE,
  WP: c.PagefaultFlag.WP,
  MINOR: c.PagefaultFlag.MINOR,
} as const)

/** UFFD_EVENT_* (uffd_msg.event). */
export const EventType = Object.freeze({
  PAGEFAULT: c.Event.PAGEFAULT,
  FORK: c.Event.FORK,
  REMAP: c.Event.REMAP,
  REMOVE: c.Event.REMOVE,
  UNMAP: c.Event.UNMAP,
} as const)

/** Flags for opening (syscall argument or USERFAULTFD_IOC_NEW argument). */
export const OpenFlag = Object.freeze({
  O_CLOEXEC: c.OpenFlag.O_CLOEXEC,
  O_NONBLOCK: c.OpenFlag.O_NONBLOCK,
  UFFD_USER_MODE_ONLY: c.OpenFlag.UFFD_USER_MODE_ONLY,
} as const)

/** The API version UFFDIO_API asks for. */
export const UFFD_API = c.UFFD_API
/** sizeof(struct uffd_msg) */
export const UFFD_MSG_SIZE = c.MSG_SIZE
/** The base page size of this system. */
export const PAGE_SIZE = c.PAGE_SIZE

/** Names of the bits set in a mask, given a name -> bit table. Unknown bits become '0x...'. */
export function bitNames(mask: bigint, table: Readonly<Record<string, bigint>>): string[] {
  const names: string[] = []
  let rest = mask
  for (const [name, bit] of Object.entries(table)) {
    if ((mask & bit) !== 0n) {
      names.push(name)
      rest &= ~bit
    }
  }
  for (let bit = 0n; rest !== 0n; bit++) {
    if ((rest & (1n << bit)) !== 0n) {
      names.push(`0x${(1n << bit).toString(16)}`)
      rest &= ~(1n << bit)
    }
  }
  return names
}

/** The names of the Feature bits set in `mask`. */
export const featureNames = (mask: bigint): string[] => bitNames(mask, Feature)
/** The names of the IoctlBit bits set in `mask`. */
export const ioctlNames = (mask: bigint): string[] => bitNames(mask, IoctlBit)
