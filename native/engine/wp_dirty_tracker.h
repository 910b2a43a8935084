// Dirty-page tracking by synchronous userfaultfd write protection: the fallback for kernels
// without WP_ASYNC/PAGEMAP_SCAN (before 6.7; Debian 12's 6.1). No N-API here.
//
// The caller opens a uffd, registers the range WP (and MISSING for anonymous memory) and
// write-protects it. One native thread then reads the uffd:
//   - a WP fault marks its page dirty and unprotects it (which wakes the writer);
//   - a MISSING fault (anonymous memory only: without WP_UNPOPULATED a page that was never
//     populated, or was dropped by MADV_DONTNEED, cannot be write-protected) maps a zero page:
//     write-protected for a read, so that the first write still faults; for a write, the page is
//     marked dirty and mapped writable;
//   - a REMOVE event (MADV_DONTNEED/MADV_REMOVE) marks the pages dirty: their contents change
//     (to zeros) without a write, and asynchronous tracking reports them as written too.
// An ioctl refused with EAGAIN (an event not yet read: mmap_changing) is retried once the
// pending messages are read, so no faulting thread is left asleep.
// Collect() swaps the dirty set for an empty one and write-protects the pages it held, under the
// same lock the fault thread holds from "mark dirty" to "unprotect": a page is never left
// unprotected and unmarked, so no write is missed (a write is reported by the collect that
// follows it, or by the next one).
#pragma once
#include <stdint.h>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct WpDirtyError {
  int err = 0;
  std::string syscall;
  std::string detail;
};

class WpDirtyTracker {
 public:
  // uffd: registered WP over [start, start + length) (and MISSING when `missing`), owned by the
  // caller, who closes it only after Stop(). pageSize: the mapping's page size.
  WpDirtyTracker(int uffd, uint64_t start, uint64_t length, uint64_t pageSize, bool missing);
  ~WpDirtyTracker();
  WpDirtyTracker(const WpDirtyTracker&) = delete;
  WpDirtyTracker& operator=(const WpDirtyTracker&) = delete;

  // Write-protects the whole range and starts the fault thread. False (with *error) on failure.
  bool Start(WpDirtyError* error);
  // Stops and joins the fault thread. Idempotent. Faults raised afterwards wait until the
  // caller closes the uffd (which wakes them).
  void Stop();
  // The dirty pages as [start, end) pairs, address order, adjacent pages merged. reprotect:
  // clears them and write-protects them again. False (with *error) if protecting failed, or the
  // fault thread had failed.
  bool Collect(bool reprotect, std::vector<uint64_t>* runs, WpDirtyError* error);

  uint64_t WpFaults() const { return wpFaults_.load(std::memory_order_relaxed); }
  uint64_t MissingFaults() const { return missingFaults_.load(std::memory_order_relaxed); }

 private:
  void Run();
  // False: EAGAIN (an event is pending), to be retried after the next read.
  bool OnFault(uint64_t address, uint64_t flags);
  void OnRemove(uint64_t from, uint64_t to);
  void MarkDirty(uint64_t index) { dirty_[index / 64] |= 1ull << (index % 64); }
  bool Protect(uint64_t from, uint64_t len, WpDirtyError* error);
  void Fail(int err, const char* syscall, const std::string& detail);

  const int uffd_;
  const uint64_t start_;
  const uint64_t length_;
  const uint64_t pageSize_;
  const bool missing_;
  int stopFd_ = -1;
  std::thread thread_;
  std::mutex mu_;                // dirty_ and every protect/unprotect of the range
  std::vector<uint64_t> dirty_;  // one bit per page
  void* zeroPage_ = nullptr;     // source of UFFDIO_COPY for MISSING faults
  std::atomic<uint64_t> wpFaults_{0};
  std::atomic<uint64_t> missingFaults_{0};
  std::mutex errMu_;
  WpDirtyError error_;
};
