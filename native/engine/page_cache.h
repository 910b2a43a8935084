// The page cache of a shared file (shmem: a memfd or MAP_SHARED|MAP_ANONYMOUS memory; hugetlbfs)
// as ranges served in MINOR mode fill it. Its bytes go in through a mapping of the file that
// only the engine writes (the "writer"), registered for MISSING faults with a uffd of its own,
// so that filling a page is atomic in the kernel: UFFDIO_COPY (or ZEROPAGE) into the writer adds
// a page to the page cache only where there is none, and fails with EEXIST where there is one (a
// page pushed before serving, or filled by another range or server): it never overwrites. Then
// UFFDIO_CONTINUE maps the cached page into each faulting mapping, with no copy.
//
// One per file per process (src/engines/page-cache.ts): every MINOR range over the file, of
// every FaultServer (one per uffd: a VMM's clones, each with its own), shares its page states,
// so a page is filled once and every other fault on it costs only the CONTINUE.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memory>

#include "engine/fault_sources.h"
#include "engine/page_states.h"

class PageCache {
 public:
  enum State : uint8_t {
    kUnknown = 0,  // not known to be cached: filled through the writer (EEXIST if it is after all)
    kCached = 1,   // in the page cache
  };

  // `uffd` is dup'ed by the caller and owned from here; [address, address + length) is the
  // writer, registered MISSING with it, of pages of `pageSize`; hugetlb: `zeros` to copy.
  PageCache(int uffd, uint64_t address, uint64_t length, uint64_t pageSize, std::shared_ptr<ZeroRegion> zeros)
      : uffd_(uffd),
        address_(address),
        length_(length),
        pageSize_(pageSize),
        zeros_(std::move(zeros)),
        states_(length / pageSize, kUnknown) {}
  ~PageCache() {
    if (uffd_ >= 0) close(uffd_);
  }
  PageCache(const PageCache&) = delete;
  PageCache& operator=(const PageCache&) = delete;

  uint64_t pageSize() const { return pageSize_; }
  size_t pages() const { return states_.pages(); }
  // The writer's address of page `i` of the file (from the writer's start).
  uint64_t At(size_t i) const { return address_ + i * pageSize_; }
  Filler filler() const { return Filler{uffd_, pageSize_, zeros_.get()}; }

  bool Cached(size_t i) const { return states_.Get(i) == kCached; }
  void MarkCached(size_t i) { states_.Set(i, kCached); }
  // Not known to be cached any more (a hole punched, MADV_REMOVE): filled again if need be.
  void Forget(size_t first, size_t count) {
    for (size_t i = first; i < first + count && i < pages(); i++) states_.Set(i, kUnknown);
  }
  // Pages from `i` (up to `max`) known to be cached.
  size_t CachedRun(size_t i, size_t max) const { return states_.RunOf(i, max, kCached); }
  // Pages from `i` (up to `max`) not known to be cached.
  size_t UnknownRun(size_t i, size_t max) const { return states_.RunOf(i, max, kUnknown); }

  // Asks the kernel which of pages [first, first + count) are cached, and marks them: one
  // mincore(2), where filling them would cost an ioctl each to learn it (EEXIST). shmem only:
  // on hugetlbfs mincore sees this mapping's page tables, not the page cache. Returns how many.
  size_t Probe(size_t first, size_t count) {
    if (pageSize_ != static_cast<uint64_t>(sysconf(_SC_PAGESIZE))) return 0;
    if (first >= pages()) return 0;
    if (first + count > pages()) count = pages() - first;
    unsigned char vec[256];
    size_t n = 0;
    for (size_t done = 0; done < count;) {
      size_t step = count - done < sizeof vec ? count - done : sizeof vec;
      if (mincore(reinterpret_cast<void*>(At(first + done)), step * pageSize_, vec) != 0) return n;
      for (size_t i = 0; i < step; i++)
        if (vec[i] & 1) {
          MarkCached(first + done + i);
          n++;
        }
      done += step;
    }
    return n;
  }

 private:
  int uffd_;
  uint64_t address_;
  uint64_t length_;
  uint64_t pageSize_;
  std::shared_ptr<ZeroRegion> zeros_;
  PageStates states_;
};
