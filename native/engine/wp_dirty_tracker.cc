#include "engine/wp_dirty_tracker.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "kernel/uapi.h"

namespace {

int Ioctl(int fd, unsigned long request, void* arg) {
  int rc;
  do {
    rc = ioctl(fd, request, arg);
  } while (rc != 0 && errno == EINTR);
  return rc;
}

uint64_t NowMs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

// How long collect() waits for the fault thread to read a pending event (EAGAIN) before it
// gives up: the thread reads at once, so only a stopped or starved thread takes this long.
const uint64_t kEventWaitMs = 10000;

}  // namespace

WpDirtyTracker::WpDirtyTracker(int uffd, uint64_t start, uint64_t length, uint64_t pageSize, bool missing)
    : uffd_(uffd),
      start_(start),
      length_(length),
      pageSize_(pageSize),
      missing_(missing),
      dirty_((length / pageSize + 63) / 64, 0) {}

WpDirtyTracker::~WpDirtyTracker() {
  Stop();
  free(zeroPage_);
}

void WpDirtyTracker::Fail(int err, const char* syscall, const std::string& detail) {
  std::lock_guard<std::mutex> lock(errMu_);
  if (error_.err != 0) return;
  error_.err = err;
  error_.syscall = syscall;
  error_.detail = detail;
}

bool WpDirtyTracker::Start(WpDirtyError* error) {
  if (missing_) {
    if (posix_memalign(&zeroPage_, pageSize_, pageSize_) != 0) {
      *error = {ENOMEM, "posix_memalign", "the zero page for MISSING faults"};
      return false;
    }
    memset(zeroPage_, 0, pageSize_);
  }
  stopFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stopFd_ < 0) {
    *error = {errno, "eventfd", "the tracker's stop signal"};
    return false;
  }
  // The thread first: an event raised meanwhile (MADV_DONTNEED elsewhere) must be read before
  // the protect below can succeed. Nothing is protected yet, so it has no WP fault to serve.
  thread_ = std::thread([this]() { Run(); });
  bool ok;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ok = Protect(start_, length_, error);
  }
  if (!ok) Stop();
  return ok;
}

void WpDirtyTracker::Stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    ssize_t w = write(stopFd_, &one, sizeof one);
    (void)w;
    thread_.join();
  }
  if (stopFd_ >= 0) {
    close(stopFd_);
    stopFd_ = -1;
  }
}

// UFFDIO_WRITEPROTECT (protect) over [from, from + len), on the caller's thread with mu_ held.
// EAGAIN: an event is pending; the fault thread reads it (it needs no lock for that), so wait.
// Before Linux 6.5 the ioctl covers one VMA only (ENOENT otherwise): then page by page,
// skipping pages no longer mapped.
bool WpDirtyTracker::Protect(uint64_t from, uint64_t len, WpDirtyError* error) {
  struct uffdio_writeprotect wp = {};
  wp.range.start = from;
  wp.range.len = len;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  uint64_t deadline = 0;
  while (Ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) != 0) {
    if (errno == EAGAIN) {
      if (deadline == 0) deadline = NowMs() + kEventWaitMs;
      if (NowMs() > deadline) {
        *error = {EAGAIN, "ioctl(UFFDIO_WRITEPROTECT)", "an event on the tracked range was never read"};
        return false;
      }
      usleep(100);
      continue;
    }
    if (errno == ENOENT && len == pageSize_) return true;  // unmapped: nothing left to track there
    if (errno != ENOENT) {
      *error = {errno, "ioctl(UFFDIO_WRITEPROTECT)", "write-protecting tracked pages"};
      return false;
    }
    for (uint64_t a = from; a < from + len; a += pageSize_)
      if (!Protect(a, pageSize_, error)) return false;
    return true;
  }
  return true;
}

bool WpDirtyTracker::OnFault(uint64_t address, uint64_t flags) {
  uint64_t page = address & ~(pageSize_ - 1);
  if (page < start_ || page >= start_ + length_) {
    struct uffdio_range r = {page, pageSize_};
    Ioctl(uffd_, UFFDIO_WAKE, &r);
    return true;
  }
  uint64_t index = (page - start_) / pageSize_;
  std::lock_guard<std::mutex> lock(mu_);
  if ((flags & UFFD_PAGEFAULT_FLAG_WP) != 0) {
    MarkDirty(index);
    struct uffdio_writeprotect wp = {};
    wp.range.start = page;
    wp.range.len = pageSize_;
    wp.mode = 0;  // unprotect, and wake the writer
    if (Ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) != 0) {
      if (errno == EAGAIN) return false;
      if (errno != ENOENT) Fail(errno, "ioctl(UFFDIO_WRITEPROTECT)", "unprotecting a written page");
      struct uffdio_range r = {page, pageSize_};
      Ioctl(uffd_, UFFDIO_WAKE, &r);
    }
    wpFaults_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  // MISSING (anonymous memory): a zero page, write-protected unless this is the write itself.
  bool write = (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
  if (write) MarkDirty(index);
  struct uffdio_copy copy = {};
  copy.dst = page;
  copy.src = reinterpret_cast<uint64_t>(zeroPage_);
  copy.len = pageSize_;
  copy.mode = write ? 0 : UFFDIO_COPY_MODE_WP;
  if (Ioctl(uffd_, UFFDIO_COPY, &copy) != 0) {
    if (errno == EAGAIN) return false;
    // EEXIST: another fault mapped it first; ENOENT: unmapped meanwhile. Either way only wake.
    if (errno != EEXIST && errno != ENOENT)
      Fail(errno, "ioctl(UFFDIO_COPY)", "mapping a zero page for a missing page");
    struct uffdio_range r = {page, pageSize_};
    Ioctl(uffd_, UFFDIO_WAKE, &r);
  }
  missingFaults_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void WpDirtyTracker::OnRemove(uint64_t from, uint64_t to) {
  uint64_t lo = from > start_ ? from : start_;
  uint64_t hi = to < start_ + length_ ? to : start_ + length_;
  if (lo >= hi) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t a = lo & ~(pageSize_ - 1); a < hi; a += pageSize_) MarkDirty((a - start_) / pageSize_);
}

void WpDirtyTracker::Run() {
  struct uffd_msg msgs[64];
  std::vector<struct uffd_msg> retry;  // faults refused with EAGAIN: after the next read
  for (;;) {
    struct pollfd p[2] = {{uffd_, POLLIN, 0}, {stopFd_, POLLIN, 0}};
    int n = poll(p, 2, retry.empty() ? -1 : 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Fail(errno, "poll", "waiting for the tracker's faults");
      return;
    }
    if (p[1].revents != 0) return;
    if ((p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) != 0) return;
    std::vector<struct uffd_msg> pending;
    pending.swap(retry);
    for (;;) {
      ssize_t r = read(uffd_, msgs, sizeof msgs);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EAGAIN) break;
      if (r < 0) {
        Fail(errno, "read", "reading the tracker's userfaultfd");
        return;
      }
      pending.insert(pending.end(), msgs, msgs + static_cast<size_t>(r) / sizeof(struct uffd_msg));
    }
    // Events first: a fault refused with EAGAIN waits for them to be read, which they now are.
    for (const auto& m : pending)
      if (m.event == UFFD_EVENT_REMOVE) OnRemove(m.arg.remove.start, m.arg.remove.end);
    for (const auto& m : pending)
      if (m.event == UFFD_EVENT_PAGEFAULT && !OnFault(m.arg.pagefault.address, m.arg.pagefault.flags))
        retry.push_back(m);
  }
}

bool WpDirtyTracker::Collect(bool reprotect, std::vector<uint64_t>* runs, WpDirtyError* error) {
  {
    std::lock_guard<std::mutex> lock(errMu_);
    if (error_.err != 0) {
      *error = error_;
      return false;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t pages = length_ / pageSize_;
  uint64_t i = 0;
  while (i < pages) {
    uint64_t word = dirty_[i / 64];
    if (word == 0 && i % 64 == 0) {
      i += 64;
      continue;
    }
    if ((word & (1ull << (i % 64))) == 0) {
      i++;
      continue;
    }
    uint64_t j = i + 1;
    while (j < pages && (dirty_[j / 64] & (1ull << (j % 64))) != 0) j++;
    runs->push_back(start_ + i * pageSize_);
    runs->push_back(start_ + j * pageSize_);
    i = j;
  }
  if (!reprotect) return true;
  std::vector<uint64_t> kept;
  kept.swap(dirty_);
  dirty_.assign(kept.size(), 0);
  for (size_t k = 0; k < runs->size(); k += 2) {
    if (!Protect((*runs)[k], (*runs)[k + 1] - (*runs)[k], error)) {
      // Not reported as collected: keep every page dirty for the next call.
      for (size_t w = 0; w < kept.size(); w++) dirty_[w] |= kept[w];
      runs->clear();
      return false;
    }
  }
  return true;
}
