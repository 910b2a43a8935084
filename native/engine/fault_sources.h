// Where a served range's bytes come from, and the fill ioctls that put them in place.
// A Source knows how to fill [dst, dst + len) from its logical byte offset `at`: straight from
// memory (a buffer, or a private read-only mmap of a snapshot file: one copy, by the kernel),
// through pread into a bounce buffer, or with zero pages. Handler sources are filled by the
// engine from bytes that JS hands back.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

// Outcome of one fill ioctl: `done` bytes were filled from the start; then `err` (0: all done;
// EEXIST: the page at `done` is already present; EAGAIN: an event is pending, read it first;
// anything else: a real failure of `syscall`).
struct FillResult {
  uint64_t done = 0;
  int err = 0;
  const char* syscall = "";
  bool zero = false;  // ZEROPAGE rather than COPY
};

FillResult CopyPages(int uffd, uint64_t dst, const void* src, uint64_t len);
FillResult ZeroPages(int uffd, uint64_t dst, uint64_t len);
// Wakes threads waiting on faults in the range (a fault on a page someone else filled).
void WakePages(int uffd, uint64_t start, uint64_t len);

class Source {
 public:
  enum Kind { kBuffer, kFile, kZero, kHandler };

  static Source* Buffer(const uint8_t* data, uint64_t length);
  // Opens nothing: `fd` is dup'ed (CLOEXEC) and owned. mmap mode maps [offset, size) privately.
  // Throws nothing; returns nullptr with *err set on failure.
  static Source* File(int fd, uint64_t offset, bool useMmap, int* err, std::string* syscall);
  static Source* Zero();
  static Source* Handler(uint32_t handlerId);
  ~Source();

  Kind kind() const { return kind_; }
  uint32_t handlerId() const { return handlerId_; }
  // Bytes of real content (past it: zeros). Buffers: their length.
  uint64_t length() const { return length_; }

  // One ioctl's worth of filling [dst, dst + len) with the source's bytes at `at`.
  // `scratch` is the calling thread's bounce buffer (pread mode), grown as needed.
  FillResult Fill(int uffd, uint64_t dst, uint64_t at, uint64_t len, std::vector<uint8_t>* scratch) const;

 private:
  Source() = default;
  Kind kind_ = kZero;
  const uint8_t* data_ = nullptr;  // buffer, or the file mapping
  uint64_t length_ = 0;
  int fd_ = -1;  // pread mode
  uint64_t fileOffset_ = 0;
  void* map_ = nullptr;  // mmap mode: the mapping to munmap
  uint64_t mapLength_ = 0;
  uint32_t handlerId_ = 0;
};
