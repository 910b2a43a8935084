// Where a served range's bytes come from, and the fill ioctls that put them in place.
// A Source knows how to fill [dst, dst + len) from its logical byte offset `at`: straight from
// memory (bytes it owns, memory the caller keeps mapped, or a private read-only mmap of a snapshot
// file: one copy, by the kernel), through pread into a bounce buffer, or with zeros. Handler
// sources are filled by the engine from bytes that JS hands back.
//
// Every length here is a whole number of the range's pages, which may be huge (hugetlb: 2 MiB or
// 1 GiB): the kernel fills hugetlb memory only in whole huge pages, and has no ZEROPAGE for it, so
// zeros are copied there from a read-only zero mapping (ZeroRegion).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <memory>
#include <string>
#include <vector>

// Outcome of one fill ioctl: `done` bytes were filled from the start; then `err` (0: all done, or
// done < len when a source fills in steps; EEXIST: the page at `done` is already present; EAGAIN:
// an event is pending, read it first; anything else: a real failure of `syscall`).
struct FillResult {
  uint64_t done = 0;
  int err = 0;
  const char* syscall = "";
  bool zero = false;          // zeros rather than source bytes
  const char* why = nullptr;  // what went wrong, where errno alone does not say it
  uint64_t sourceNs = 0;      // time spent getting the bytes (pread, the page cache), not in the fill ioctl
};

FillResult CopyPages(int uffd, uint64_t dst, const void* src, uint64_t len);
FillResult ZeroPages(int uffd, uint64_t dst, uint64_t len);
// Maps pages already in the page cache (MINOR mode): no copy.
FillResult ContinuePages(int uffd, uint64_t dst, uint64_t len);
// Marks pages poisoned: a touch raises SIGBUS (Linux 6.6+; EINVAL before).
FillResult PoisonPages(int uffd, uint64_t dst, uint64_t len);
// Wakes threads waiting on faults in the range (a fault on a page someone else filled).
void WakePages(int uffd, uint64_t start, uint64_t len);

// A read-only private anonymous mapping that reads as zeros (the kernel maps its zero page as it
// is read; nothing is allocated): the source of UFFDIO_COPY where ZEROPAGE is not allowed.
class ZeroRegion {
 public:
  // nullptr (with *err) when mmap fails.
  static std::shared_ptr<ZeroRegion> Create(uint64_t length, int* err);
  ~ZeroRegion();
  const uint8_t* data() const { return data_; }
  uint64_t length() const { return length_; }

 private:
  ZeroRegion() = default;
  uint8_t* data_ = nullptr;
  uint64_t length_ = 0;
};

// How one range's pages are put in place: its page size, and (hugetlb) the zeros to copy.
struct Filler {
  int uffd = -1;
  uint64_t pageSize = 4096;
  const ZeroRegion* zeros = nullptr;  // null: ZEROPAGE works here

  FillResult Copy(uint64_t dst, const void* src, uint64_t len) const {
    return CopyPages(uffd, dst, src, len);
  }
  // Zeros over [dst, dst + len): ZEROPAGE, or copies from the zero region (in steps of its size).
  FillResult Zero(uint64_t dst, uint64_t len) const;
};

class Source {
 public:
  enum Kind { kBuffer, kFile, kZero, kHandler };

  // Copies [data, data + length) into memory the source owns: nothing the caller does afterwards
  // (detaching, freeing) can reach it. nullptr with *err when that memory cannot be had.
  static Source* OwnedCopy(const uint8_t* data, uint64_t length, int* err);
  // Memory the caller keeps mapped for as long as the range is served (a Mapping, a
  // SharedArrayBuffer). A copy from it after all is EFAULT, never a crash.
  static Source* Memory(const uint8_t* data, uint64_t length);
  // `fd` is dup'ed (CLOEXEC) and owned. mmap mode also maps [offset, size) privately (the tail
  // page past the end of the file is read through the fd). `size` is the file's size as its
  // owner knows it (kSizeNow: fstat's, or a block device's end): bytes short of it that cannot be
  // read (a file truncated since) are errors, never zeros. nullptr with *err on failure.
  static constexpr uint64_t kSizeNow = UINT64_MAX;
  static Source* File(int fd, uint64_t offset, uint64_t size, bool useMmap, int* err, std::string* syscall);
  static Source* Zero();
  static Source* Handler(uint32_t handlerId);
  ~Source();
  // Closes the file and unmaps what the source owns, before the last reference to it goes: once
  // the engine's threads are joined nothing reads it, and a JS object may keep it for long.
  void Release();

  Kind kind() const { return kind_; }
  uint32_t handlerId() const { return handlerId_; }
  // Bytes of real content (past it: zeros). Buffers: their length.
  uint64_t length() const { return length_; }

  // One ioctl's worth (or one step) of filling [dst, dst + len) with the source's bytes at `at`.
  // `scratch` is the calling thread's bounce buffer, grown as needed.
  FillResult Fill(const Filler& f, uint64_t dst, uint64_t at, uint64_t len,
                  std::vector<uint8_t>* scratch) const;

 private:
  Source() = default;
  // Reads [at, at + n) into scratch (zeros past the content) and copies it in.
  FillResult Bounce(const Filler& f, uint64_t dst, uint64_t at, uint64_t n,
                    std::vector<uint8_t>* scratch) const;

  Kind kind_ = kZero;
  const uint8_t* data_ = nullptr;  // memory, owned copy, or the file mapping
  uint64_t length_ = 0;
  int fd_ = -1;  // file sources
  uint64_t fileOffset_ = 0;
  void* map_ = nullptr;  // owned memory or the file mapping: munmap'ed on destruction
  uint64_t mapLength_ = 0;
  uint32_t handlerId_ = 0;
};
