// Dirty-page tracking with synchronous write protection, for kernels without WP_ASYNC and
// PAGEMAP_SCAN (before Linux 6.7): the migration source's pre-copy rounds there.
//
// The range is registered WRITEPROTECT with a userfaultfd of its own and protected whole. The
// first write to a protected page blocks its writer in a WP fault; this tracker's thread marks
// the page written and unprotects it (which wakes the writer). Collect() takes the marks and
// protects those pages again. Order makes it lossless: a page's mark is set before it is
// unprotected, and Collect() clears marks before protecting again, so a write after Collect()
// saw the page either faults (and marks it) or came before the protection, which the caller's
// send, after Collect() returns, reads.
//
// No N-API here (native/binding/sync_dirty_tracker.cc is its JS face).
#pragma once
#include <stdint.h>

#include <atomic>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

class SyncDirtyTracker {
 public:
  // `uffd` has [start, start + length) registered in WP mode (not yet protected) and stays
  // owned by the caller; it must outlive Stop().
  SyncDirtyTracker(int uffd, uint64_t start, uint64_t length, uint64_t pageSize);
  ~SyncDirtyTracker();

  // Populates the range first when `populate` (kernels without WP_UNPOPULATED: a write to an
  // unpopulated page would not fault), protects it whole and starts the thread. 0 or an errno.
  int Start(bool populate);
  // The pages written since Start() or the previous Collect(), as (first page, count) runs in
  // address order, protected again before it returns. 0 or an errno (the protect that failed).
  int Collect(std::vector<std::pair<uint64_t, uint64_t>>* runs);
  // Ends the thread (joined) and unprotects the range, so that no writer stays blocked. Idempotent.
  void Stop();
  // WP faults handled so far; the errno that stopped the thread, if one did.
  uint64_t faults() const { return faults_.load(std::memory_order_relaxed); }
  int error() const { return error_.load(std::memory_order_relaxed); }

 private:
  void Loop();
  int Protect(uint64_t address, uint64_t length, bool wp);

  const int uffd_;
  const uint64_t start_, length_, pageSize_, pages_;
  std::unique_ptr<std::atomic<uint64_t>[]> marks_;  // one bit per page
  int stopFd_ = -1;                                 // eventfd: Stop() wakes the thread's poll
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> faults_{0};
  std::atomic<int> error_{0};
  bool started_ = false;
};
