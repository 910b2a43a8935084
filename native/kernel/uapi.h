// Kernel ABI for userfaultfd. The build machine's <linux/userfaultfd.h> may be older than the
// kernel the addon runs on (Debian bookworm ships 6.1's), so everything newer is defined here
// behind #ifndef guards. Values are from the Linux v7.2 uapi header (unchanged since v6.8).
#pragma once

#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#ifndef __NR_userfaultfd
#if defined(__x86_64__)
#define __NR_userfaultfd 323
#elif defined(__aarch64__)
#define __NR_userfaultfd 282
#endif
#endif

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

// Features (bits of uffdio_api.features).
#ifndef UFFD_FEATURE_PAGEFAULT_FLAG_WP
#define UFFD_FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#endif
#ifndef UFFD_FEATURE_EVENT_FORK
#define UFFD_FEATURE_EVENT_FORK (1ULL << 1)
#endif
#ifndef UFFD_FEATURE_EVENT_REMAP
#define UFFD_FEATURE_EVENT_REMAP (1ULL << 2)
#endif
#ifndef UFFD_FEATURE_EVENT_REMOVE
#define UFFD_FEATURE_EVENT_REMOVE (1ULL << 3)
#endif
#ifndef UFFD_FEATURE_MISSING_HUGETLBFS
#define UFFD_FEATURE_MISSING_HUGETLBFS (1ULL << 4)
#endif
#ifndef UFFD_FEATURE_MISSING_SHMEM
#define UFFD_FEATURE_MISSING_SHMEM (1ULL << 5)
#endif
#ifndef UFFD_FEATURE_EVENT_UNMAP
#define UFFD_FEATURE_EVENT_UNMAP (1ULL << 6)
#endif
#ifndef UFFD_FEATURE_SIGBUS
#define UFFD_FEATURE_SIGBUS (1ULL << 7)
#endif
#ifndef UFFD_FEATURE_THREAD_ID
#define UFFD_FEATURE_THREAD_ID (1ULL << 8)
#endif
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1ULL << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1ULL << 10)
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1ULL << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1ULL << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif

// ioctl numbers (_UFFDIO_*) and their bits in the ioctls masks.
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_WRITEPROTECT
#define _UFFDIO_WRITEPROTECT (0x06)
#endif
#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif

// Register modes.
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif

// Pagefault flags.
#ifndef UFFD_PAGEFAULT_FLAG_MINOR
#define UFFD_PAGEFAULT_FLAG_MINOR (1 << 2)
#endif

// Structs and modes that 6.1 lacks. Layouts are fixed by the ABI: all fields 64-bit.
struct uffdio_move_abi {
  __u64 dst;
  __u64 src;
  __u64 len;
  __u64 mode;
  __s64 move;
};
#define UFFDIO_MOVE_MODE_DONTWAKE_ABI ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES_ABI ((__u64)1 << 1)
#define UFFDIO_MOVE_ABI _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move_abi)

struct uffdio_continue_abi {
  struct uffdio_range range;
  __u64 mode;
  __s64 mapped;
};
#define UFFDIO_CONTINUE_MODE_DONTWAKE_ABI ((__u64)1 << 0)
#define UFFDIO_CONTINUE_MODE_WP_ABI ((__u64)1 << 1)
#define UFFDIO_CONTINUE_ABI _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue_abi)

struct uffdio_poison_abi {
  struct uffdio_range range;
  __u64 mode;
  __s64 updated;
};
#define UFFDIO_POISON_MODE_DONTWAKE_ABI ((__u64)1 << 0)
#define UFFDIO_POISON_ABI _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison_abi)

#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1 << 1)
#endif
#ifndef UFFDIO_WRITEPROTECT_MODE_WP
#define UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1 << 0)
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ((__u64)1 << 1)
struct uffdio_writeprotect {
  struct uffdio_range range;
  __u64 mode;
};
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)
#endif

// The ABI is fixed; catch a header that disagrees at compile time.
static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
static_assert(sizeof(struct uffdio_move_abi) == 40, "uffdio_move is 40 bytes");
static_assert(sizeof(struct uffdio_continue_abi) == 32, "uffdio_continue is 32 bytes");
static_assert(sizeof(struct uffdio_poison_abi) == 32, "uffdio_poison is 32 bytes");
static_assert(UFFDIO_API == 0xC018AA3F, "UFFDIO_API");
static_assert(UFFDIO_REGISTER == 0xC020AA00, "UFFDIO_REGISTER");
static_assert(UFFDIO_COPY == 0xC028AA03, "UFFDIO_COPY");
static_assert(UFFDIO_MOVE_ABI == 0xC028AA05, "UFFDIO_MOVE");
static_assert(UFFDIO_CONTINUE_ABI == 0xC020AA07, "UFFDIO_CONTINUE");
static_assert(UFFDIO_POISON_ABI == 0xC020AA08, "UFFDIO_POISON");
static_assert(USERFAULTFD_IOC_NEW == 0xAA00, "USERFAULTFD_IOC_NEW");
