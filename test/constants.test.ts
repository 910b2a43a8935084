// Every constant of the userfaultfd ABI (shared/UAPI.md) is exported under its kernel name with
// the kernel's value, including those the build machine's 6.1 headers lack (MOVE, POISON,
// WP_ASYNC): the addon defines them.
import { describe, expect, it } from 'vitest'
import { execFileSync } from 'node:child_process'
import * as index from '../src/index'
import {
  EventType,
  Feature,
  Ioctl,
  IoctlBit,
  Mode,
  OpenFlag,
  PAGE_SIZE,
  PagefaultFlag,
  RegisterMode,
  UFFD_API,
  UFFD_MSG_SIZE,
  Userfaultfd,
  bitNames,
  featureNames,
  ioctlNames,
} from '../src/index'
import { featuresExpectedHere } from './helpers/kernel'

describe('constants', () => {
  it('Feature: UFFD_FEATURE_* bits 0..16', () => {
    const names = [
      'PAGEFAULT_FLAG_WP',
      'EVENT_FORK',
      'EVENT_REMAP',
      'EVENT_REMOVE',
      'MISSING_HUGETLBFS',
      'MISSING_SHMEM',
      'EVENT_UNMAP',
      'SIGBUS',
      'THREAD_ID',
      'MINOR_HUGETLBFS',
      'MINOR_SHMEM',
      'EXACT_ADDRESS',
      'WP_HUGETLBFS_SHMEM',
      'WP_UNPOPULATED',
      'POISON',
      'WP_ASYNC',
      'MOVE',
    ]
    expect(Object.keys(Feature)).toEqual(names)
    for (const [bit, name] of names.entries())
      expect(Feature[name as keyof typeof Feature], name).toBe(1n << BigInt(bit))
    const all = Object.values(Feature).reduce((a, b) => a | b, 0n)
    expect(all).toBe(0x1ffffn)
    // The running kernel offers exactly what the package's table of releases says a kernel of
    // its release and architecture offers (6.18: 0x1ffff; 6.1: 0x1fff on x86_64, 0xffe on
    // arm64, which got write protection in 6.10). A distribution kernel with backports, or
    // built without CONFIG_PTE_MARKER_UFFD_WP, would differ: then this says where.
    expect(featureNames(Userfaultfd.probe().features)).toEqual(featureNames(featuresExpectedHere()))
  })

  it('IoctlBit: 1n << _UFFDIO_*', () => {
    expect({ ...IoctlBit }).toEqual({
      REGISTER: 1n << 0n,
      UNREGISTER: 1n << 1n,
      WAKE: 1n << 2n,
      COPY: 1n << 3n,
      ZEROPAGE: 1n << 4n,
      MOVE: 1n << 5n,
      WRITEPROTECT: 1n << 6n,
      CONTINUE: 1n << 7n,
      POISON: 1n << 8n,
      API: 1n << 63n,
    })
  })

  it('Ioctl: the request numbers', () => {
    expect({ ...Ioctl }).toEqual({
      UFFDIO_API: 0xc018aa3f,
      UFFDIO_REGISTER: 0xc020aa00,
      UFFDIO_UNREGISTER: 0x8010aa01,
      UFFDIO_WAKE: 0x8010aa02,
      UFFDIO_COPY: 0xc028aa03,
      UFFDIO_ZEROPAGE: 0xc020aa04,
      UFFDIO_MOVE: 0xc028aa05,
      UFFDIO_WRITEPROTECT: 0xc018aa06,
      UFFDIO_CONTINUE: 0xc020aa07,
      UFFDIO_POISON: 0xc020aa08,
      USERFAULTFD_IOC_NEW: 0xaa00,
    })
  })

  it('Mode: UFFDIO_*_MODE_* for each ioctl, and RegisterMode', () => {
    expect({ ...Mode }).toEqual({
      REGISTER_MODE_MISSING: 1n,
      REGISTER_MODE_WP: 2n,
      REGISTER_MODE_MINOR: 4n,
      COPY_MODE_DONTWAKE: 1n,
      COPY_MODE_WP: 2n,
      ZEROPAGE_MODE_DONTWAKE: 1n,
      WRITEPROTECT_MODE_WP: 1n,
      WRITEPROTECT_MODE_DONTWAKE: 2n,
      CONTINUE_MODE_DONTWAKE: 1n,
      CONTINUE_MODE_WP: 2n,
      POISON_MODE_DONTWAKE: 1n,
      MOVE_MODE_DONTWAKE: 1n,
      MOVE_MODE_ALLOW_SRC_HOLES: 2n,
    })
    expect({ ...RegisterMode }).toEqual({ MISSING: 1n, WP: 2n, MINOR: 4n })
  })

  it('PagefaultFlag, EventType, OpenFlag, UFFD_API, UFFD_MSG_SIZE, PAGE_SIZE', () => {
    expect({ ...PagefaultFlag }).toEqual({ WRITE: 1n, WP: 2n, MINOR: 4n })
    expect({ ...EventType }).toEqual({ PAGEFAULT: 0x12, FORK: 0x13, REMAP: 0x14, REMOVE: 0x15, UNMAP: 0x16 })
    expect({ ...OpenFlag }).toEqual({ O_CLOEXEC: 0o2000000, O_NONBLOCK: 0o4000, UFFD_USER_MODE_ONLY: 1 })
    expect(UFFD_API).toBe(0xaa)
    expect(UFFD_MSG_SIZE).toBe(32)
    expect(PAGE_SIZE).toBe(Number(execFileSync('getconf', ['PAGESIZE']).toString().trim()))
  })

  it('the tables are frozen, masks are bigints', () => {
    for (const table of [Feature, IoctlBit, Ioctl, Mode, RegisterMode, PagefaultFlag, EventType, OpenFlag]) {
      expect(Object.isFrozen(table)).toBe(true)
    }
    for (const table of [Feature, IoctlBit, Mode, RegisterMode, PagefaultFlag]) {
      for (const v of Object.values(table)) expect(typeof v).toBe('bigint')
    }
    expect(() => {
      ;(Feature as Record<string, bigint>).MOVE = 0n
    }).toThrow(TypeError)
  })

  it('featureNames / ioctlNames / bitNames name the bits, unknown ones as hex', () => {
    expect(featureNames(Feature.MOVE | Feature.THREAD_ID)).toEqual(['THREAD_ID', 'MOVE'])
    expect(featureNames((1n << 17n) | Feature.SIGBUS)).toEqual(['SIGBUS', '0x20000'])
    expect(ioctlNames(IoctlBit.API | IoctlBit.COPY)).toEqual(['COPY', 'API'])
    expect(bitNames(0n, Feature)).toEqual([])
  })

  it('the package index exports every table', () => {
    for (const name of [
      'Feature',
      'IoctlBit',
      'Ioctl',
      'Mode',
      'RegisterMode',
      'PagefaultFlag',
      'EventType',
      'OpenFlag',
      'UFFD_API',
      'UFFD_MSG_SIZE',
      'PAGE_SIZE',
      'featureNames',
      'ioctlNames',
      'bitNames',
    ]) {
      expect(index, name).toHaveProperty(name)
    }
  })
})
