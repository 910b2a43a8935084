// The kernel's constants, named as in <linux/userfaultfd.h>, with values from the addon (which
// defines what older build headers lack).
import { native } from '../addon/native'

const c = native.constants

/** UFFD_FEATURE_* bits (uffdio_api.features). */
export const Feature = Object.freeze({
  PAGEFAULT_FLAG_WP: c.Feature.PAGEFAULT_FLAG_WP,
  EVENT_FORK: c.Feature.EVENT_FORK,
  EVENT_REMAP: c.Feature.EVENT_REMAP,
  EVENT_REMOVE: c.Feature.EVENT_REMOVE,
  MISSING_HUGETLBFS: c.Feature.MISSING_HUGETLBFS,
  MISSING_SHMEM: c.Feature.MISSING_SHMEM,
  EVENT_UNMAP: c.Feature.EVENT_UNMAP,
  SIGBUS: c.Feature.SIGBUS,
  THREAD_ID: c.Feature.THREAD_ID,
  MINOR_HUGETLBFS: c.Feature.MINOR_HUGETLBFS,
  MINOR_SHMEM: c.Feature.MINOR_SHMEM,
  EXACT_ADDRESS: c.Feature.EXACT_ADDRESS,
  WP_HUGETLBFS_SHMEM: c.Feature.WP_HUGETLBFS_SHMEM,
  WP_UNPOPULATED: c.Feature.WP_UNPOPULATED,
  POISON: c.Feature.POISON,
  WP_ASYNC: c.Feature.WP_ASYNC,
  MOVE: c.Feature.MOVE,
} as const)
export type FeatureName = keyof typeof Feature

/** Bits of the `ioctls` masks returned by UFFDIO_API and UFFDIO_REGISTER: 1n << _UFFDIO_*. */
export const IoctlBit = Object.freeze({
  REGISTER: c.IoctlBit.REGISTER,
  UNREGISTER: c.IoctlBit.UNREGISTER,
  WAKE: c.IoctlBit.WAKE,
  COPY: c.IoctlBit.COPY,
  ZEROPAGE: c.IoctlBit.ZEROPAGE,
  MOVE: c.IoctlBit.MOVE,
  WRITEPROTECT: c.IoctlBit.WRITEPROTECT,
  CONTINUE: c.IoctlBit.CONTINUE,
  POISON: c.IoctlBit.POISON,
  API: c.IoctlBit.API,
} as const)
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

export const featureNames = (mask: bigint): string[] => bitNames(mask, Feature)
export const ioctlNames = (mask: bigint): string[] => bitNames(mask, IoctlBit)
