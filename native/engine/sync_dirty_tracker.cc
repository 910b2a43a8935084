#include "engine/sync_dirty_tracker.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernel/uapi.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

SyncDirtyTracker::SyncDirtyTracker(int uffd, uint64_t start, uint64_t length, uint64_t pageSize)
    : uffd_(uffd),
      start_(start),
      length_(length),
      pageSize_(pageSize),
      pages_(length / pageSize),
      marks_(new std::atomic<uint64_t>[(length / pageSize + 63) / 64]) {
  for (uint64_t w = 0; w < (pages_ + 63) / 64; w++) marks_[w].store(0, std::memory_order_relaxed);
}

SyncDirtyTracker::~SyncDirtyTracker() {
  Stop();
}

int SyncDirtyTracker::Protect(uint64_t address, uint64_t length, bool wp) {
  struct uffdio_writeprotect w = {};
  w.range.start = address;
  w.range.len = length;
  w.mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0;  // unprotecting wakes the blocked writers
  while (ioctl(uffd_, UFFDIO_WRITEPROTECT, &w) != 0) {
    if (errno != EAGAIN && errno != EINTR) return errno;
  }
  return 0;
}

int SyncDirtyTracker::Start(bool populate) {
  if (started_) return EBUSY;
  if (populate && madvise(reinterpret_cast<void*>(start_), length_, MADV_POPULATE_WRITE) != 0) return errno;
  stopFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stopFd_ < 0) return errno;
  if (int err = Protect(start_, length_, true)) {
    close(stopFd_);
    stopFd_ = -1;
    return err;
  }
  started_ = true;
  thread_ = std::thread([this] { Loop(); });
  return 0;
}

void SyncDirtyTracker::Loop() {
  struct uffd_msg msgs[64];
  while (!stopping_.load(std::memory_order_acquire)) {
    struct pollfd p[2] = {{uffd_, POLLIN, 0}, {stopFd_, POLLIN, 0}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      error_.store(errno);
      return;
    }
    if (p[1].revents) return;
    ssize_t n = read(uffd_, msgs, sizeof msgs);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      error_.store(errno);
      return;
    }
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof msgs[0]; i++) {
      const struct uffd_msg& m = msgs[i];
      if (m.event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t a = m.arg.pagefault.address;
      if (a < start_ || a >= start_ + length_) continue;
      uint64_t page = (a - start_) / pageSize_;
      // Marked before unprotected: Collect() cannot miss a page that is writable again.
      marks_[page / 64].fetch_or(1ull << (page % 64), std::memory_order_acq_rel);
      faults_.fetch_add(1, std::memory_order_relaxed);
      if (int err = Protect(start_ + page * pageSize_, pageSize_, false)) {
        // ENOENT: the page went away (unmapped): nothing blocks on it.
        if (err != ENOENT) error_.store(err);
      }
    }
  }
}

int SyncDirtyTracker::Collect(std::vector<std::pair<uint64_t, uint64_t>>* runs) {
  runs->clear();
  for (uint64_t w = 0; w < (pages_ + 63) / 64; w++) {
    uint64_t bits = marks_[w].exchange(0, std::memory_order_acq_rel);
    while (bits != 0) {
      uint64_t page = w * 64 + static_cast<uint64_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      if (!runs->empty() && runs->back().first + runs->back().second == page)
        runs->back().second++;
      else
        runs->emplace_back(page, 1);
    }
  }
  for (const auto& r : *runs) {
    if (int err = Protect(start_ + r.first * pageSize_, r.second * pageSize_, true)) return err;
  }
  return 0;
}

void SyncDirtyTracker::Stop() {
  if (!started_) return;
  started_ = false;
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  if (write(stopFd_, &one, sizeof one) < 0) {
    // an eventfd write fails only on overflow: the thread is being woken anyway
  }
  thread_.join();
  close(stopFd_);
  stopFd_ = -1;
  // Writers blocked on a fault nobody reads any more are woken by this (or by closing the uffd).
  Protect(start_, length_, false);
}
