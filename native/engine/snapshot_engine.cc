#include "engine/snapshot_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>

#include "engine/util.h"
#include "kernel/uapi.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

const char* CopyMethodName(CopyMethod m) {
  switch (m) {
    case CopyMethod::kPwrite:
      return "pwrite";
    case CopyMethod::kProcessVmReadv:
      return "process_vm_readv";
    case CopyMethod::kPipe:
      return "pipe";
  }
  return "?";
}

SnapshotEngine::Copier::~Copier() {
  if (pipeR >= 0) close(pipeR);
  if (pipeW >= 0) close(pipeW);
}

SnapshotEngine::SnapshotEngine(int uffd, uint64_t start, uint64_t length, uint64_t pageSize,
                               const SnapshotSink& sink, const SnapshotOptions& options)
    : uffd_(uffd),
      start_(start),
      length_(length),
      pageSize_(pageSize),
      pages_(length / pageSize),
      sink_(sink),
      options_(options),
      states_(pages_, kFree) {
  faultCopier_.method = backgroundCopier_.method = options.method;
  faultCopier_.fixed = backgroundCopier_.fixed = options.methodFixed;
}

SnapshotEngine::~SnapshotEngine() {
  Join();
}

int SnapshotEngine::Protect(std::string* syscall, std::string* detail) {
  if (options_.populate) {
    // Without WP_UNPOPULATED, WRITEPROTECT skips empty page-table entries: fill them first.
    if (madvise(reinterpret_cast<void*>(start_), length_, MADV_POPULATE_WRITE) != 0) {
      *syscall = "madvise(MADV_POPULATE_WRITE)";
      *detail = "populating the range before protecting it";
      return errno;
    }
    populated_ = true;
  }
  // The snapshot instant: every page write-protected, nothing unprotected until this returns.
  struct uffdio_writeprotect wp = {};
  wp.range.start = start_;
  wp.range.len = length_;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  uint64_t t0 = NowNs();
  int rc;
  do {
    rc = ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    *syscall = "ioctl(UFFDIO_WRITEPROTECT)";
    *detail = "write-protecting the snapshot range";
    return errno;
  }
  instantNs_ = NowNs();
  protectNs_ = instantNs_ - t0;
  return 0;
}

void SnapshotEngine::Start(std::function<void()> onFinished) {
  onFinished_ = std::move(onFinished);
  thread_ = std::thread([this]() {
    Run();
    onFinished_();
    Linger();
  });
}

void SnapshotEngine::Join() {
  if (!finished_.load()) cancel_.store(true);
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

int SnapshotEngine::error(std::string* syscall, std::string* detail) const {
  std::lock_guard<std::mutex> lock(errMu_);
  *syscall = errSyscall_;
  *detail = errDetail_;
  return err_;
}

SnapshotStats SnapshotEngine::Stats() const {
  SnapshotStats s;
  s.totalBytes = length_;
  s.bytesCopied = bytesCopied_.load();
  s.faultCopies = faultCopies_.load();
  s.backgroundCopies = backgroundCopies_.load();
  s.pagesCopied = s.faultCopies + s.backgroundCopies;
  s.totalPages = pages_;
  s.faults = faults_.load();
  s.wakes = wakes_.load();
  s.protectMs = static_cast<double>(protectNs_) / 1e6;
  bool done = finished_.load();
  uint64_t end = done ? endNs_ : NowNs();
  s.elapsedMs = static_cast<double>(end - instantNs_) / 1e6;
  s.done = done;
  s.populated = populated_;
  const char* used = usedMethod_.load();
  s.copyMethod = used != nullptr ? used : CopyMethodName(options_.method);
  return s;
}

bool SnapshotEngine::Fail(int error, const char* syscall, const std::string& detail) {
  std::lock_guard<std::mutex> lock(errMu_);
  if (err_ == 0 && !finished_.load()) {
    err_ = error;
    errSyscall_ = syscall;
    errDetail_ = detail;
    failed_.store(true);
  }
  return false;
}

std::string SnapshotEngine::Where(uint64_t index) const {
  char buf[96];
  snprintf(buf, sizeof buf, "page at 0x%llx, offset %llu",
           static_cast<unsigned long long>(start_ + index * pageSize_),
           static_cast<unsigned long long>(index * pageSize_));
  return buf;
}

bool SnapshotEngine::OpenPipe(Copier* c) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return Fail(errno, "pipe2");
  c->pipeR = fds[0];
  c->pipeW = fds[1];
  int cap = fcntl(c->pipeW, F_SETPIPE_SZ, 1 << 20);
  if (cap < 0) cap = fcntl(c->pipeW, F_GETPIPE_SZ);
  c->pipeCap = cap > 0 ? static_cast<size_t>(cap) : 65536;
  return true;
}

// Copies [src, src + n) into the memory sink at dst through a pipe: write(2) reads the source with
// copy_from_user, so an unmapped source is EFAULT, never a crash.
bool SnapshotEngine::CopyViaPipe(Copier* c, uint64_t src, uint8_t* dst, size_t n, uint64_t index) {
  if (c->pipeR < 0 && !OpenPipe(c)) return false;
  size_t done = 0;
  while (done < n) {
    size_t want = std::min(n - done, c->pipeCap);
    ssize_t w = write(c->pipeW, reinterpret_cast<void*>(src + done), want);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int e = errno;
      return Fail(e, "write",
                  e == EFAULT ? "the " + Where(index) + " is no longer mapped"
                              : "copying the " + Where(index) + " through a pipe");
    }
    size_t got = 0;
    while (got < static_cast<size_t>(w)) {
      ssize_t r = read(c->pipeR, dst + done + got, static_cast<size_t>(w) - got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return Fail(r < 0 ? errno : EIO, "read", "draining the copy pipe");
      got += static_cast<size_t>(r);
    }
    done += static_cast<size_t>(w);
  }
  return true;
}

// Copies `count` pages from page `index` to the sink.
bool SnapshotEngine::CopyOut(Copier* c, uint64_t index, uint64_t count) {
  uint64_t off = index * pageSize_;
  uint64_t src = start_ + off;
  size_t n = static_cast<size_t>(count * pageSize_);
  size_t done = 0;
  while (done < n) {
    ssize_t r;
    if (c->method == CopyMethod::kPwrite) {
      r = pwrite(sink_.fd, reinterpret_cast<void*>(src + done), n - done,
                 static_cast<off_t>(sink_.offset + off + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        int e = errno;
        return Fail(e, "pwrite",
                    e == EFAULT ? "the " + Where(index) + " is no longer mapped"
                                : "writing the " + Where(index) + " to the sink");
      }
      if (r == 0) return Fail(EIO, "pwrite", "the sink accepted no bytes");
    } else if (c->method == CopyMethod::kProcessVmReadv) {
      struct iovec local = {sink_.memory + off + done, n - done};
      struct iovec remote = {reinterpret_cast<void*>(src + done), n - done};
      r = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && !c->fixed && (errno == EPERM || errno == ENOSYS || errno == EACCES)) {
        c->method = CopyMethod::kPipe;  // seccomp (Docker's default profile) forbids it
        continue;
      }
      if (r < 0) {
        int e = errno;
        return Fail(
            e, "process_vm_readv",
            e == EFAULT ? "the " + Where(index) + " is no longer mapped" : "copying the " + Where(index));
      }
      if (r == 0) return Fail(EFAULT, "process_vm_readv", "the " + Where(index) + " is no longer mapped");
    } else {
      if (!CopyViaPipe(c, src + done, sink_.memory + off + done, n - done, index)) return false;
      r = static_cast<ssize_t>(n - done);
    }
    done += static_cast<size_t>(r);
  }
  usedMethod_.store(CopyMethodName(c->method));
  bytesCopied_.fetch_add(n, std::memory_order_relaxed);
  return true;
}

// Unprotects (and wakes) `count` pages from page `index`. `reader`: called on the thread that reads
// the uffd, which can read a pending event itself.
bool SnapshotEngine::Unprotect(uint64_t index, uint64_t count, bool reader) {
  struct uffdio_writeprotect wp = {};
  wp.range.start = start_ + index * pageSize_;
  wp.range.len = count * pageSize_;
  wp.mode = 0;
  while (ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) != 0) {
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      // An UNMAP/REMOVE/REMAP event is pending (mmap_changing): it must be read first. The reader
      // reads it (nested at most a few levels: a fault read here unprotects too); the background
      // thread waits for the reader to.
      if (reader && drainDepth_ < 4) {
        drainDepth_++;
        bool ok = Drain();
        drainDepth_--;
        if (!ok) return false;
      } else {
        if (Stopping()) return false;
        usleep(200);
      }
      continue;
    }
    int e = errno;
    return Fail(
        e, "ioctl(UFFDIO_WRITEPROTECT)",
        e == ENOENT ? "the " + Where(index) + " is no longer mapped" : "unprotecting the " + Where(index));
  }
  return true;
}

void SnapshotEngine::Wake(uint64_t address, uint64_t len) {
  struct uffdio_range r = {address, len};
  ioctl(uffd_, UFFDIO_WAKE, &r);  // a thread already woken by an unprotect: nothing to do
  wakes_.fetch_add(1, std::memory_order_relaxed);
}

bool SnapshotEngine::OnFault(uint64_t address) {
  faults_.fetch_add(1, std::memory_order_relaxed);
  uint64_t page = AlignDown(address, pageSize_);
  if (page < start_ || page >= start_ + length_ || lingering_) {
    Wake(page, pageSize_);
    return true;
  }
  uint64_t index = (page - start_) / pageSize_;
  uint8_t seen;
  if (!states_.Transition(index, kFree, kClaimed, &seen)) {
    // Done: the fault was raised before the unprotect, which woke it already. Claimed: the
    // background thread is copying it and its unprotect will wake the writer.
    if (seen == kDone) Wake(page, pageSize_);
    return true;
  }
  // Fault-around: also claim the free pages next to it within its aligned window, so that a
  // writer moving through memory faults once per window, not once per page.
  uint64_t window = std::max<uint64_t>(1, options_.faultAround / pageSize_);
  uint64_t lo = index - index % window;
  uint64_t hi = std::min(pages_, lo + window);
  uint64_t last = states_.ClaimForward(index + 1, hi, kFree, kClaimed);
  uint64_t first = states_.ClaimBackward(index, lo, kFree, kClaimed);
  if (!CopyOut(&faultCopier_, first, last - first)) return false;
  faultCopies_.fetch_add(last - first, std::memory_order_relaxed);
  if (!Unprotect(first, last - first, true)) return false;
  for (uint64_t k = first; k < last; k++) states_.Set(k, kDone);
  return true;
}

// An event that changes the address space: fatal if it covers pages not yet copied.
bool SnapshotEngine::OnChange(uint64_t from, uint64_t to, const char* what) {
  if (lingering_) return true;
  uint64_t lo = std::max(from, start_);
  uint64_t hi = std::min(to, start_ + length_);
  for (uint64_t a = AlignDown(lo, pageSize_); a < hi; a += pageSize_) {
    uint64_t index = (a - start_) / pageSize_;
    if (states_.Get(index) != kDone) {
      return Fail(EFAULT, "snapshot",
                  std::string("the range was ") + what + " while the snapshot ran, before its " +
                      Where(index) + " was copied");
    }
  }
  return true;
}

// Reads and handles every pending message. False on a fatal error.
bool SnapshotEngine::Drain() {
  struct uffd_msg msgs[64];
  for (;;) {
    ssize_t n = read(uffd_, msgs, sizeof msgs);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return true;
    if (n < 0) return Fail(errno, "read", "reading the snapshot's userfaultfd");
    size_t count = static_cast<size_t>(n) / sizeof(struct uffd_msg);
    for (size_t i = 0; i < count; i++) {
      const struct uffd_msg& m = msgs[i];
      bool ok = true;
      switch (m.event) {
        case UFFD_EVENT_PAGEFAULT:
          ok = OnFault(m.arg.pagefault.address);
          break;
        case UFFD_EVENT_REMOVE:
          ok = OnChange(m.arg.remove.start, m.arg.remove.end, "discarded (MADV_DONTNEED/REMOVE)");
          break;
        case UFFD_EVENT_UNMAP:
          ok = OnChange(m.arg.remove.start, m.arg.remove.end, "unmapped");
          break;
        case UFFD_EVENT_REMAP:
          ok = OnChange(m.arg.remap.from, m.arg.remap.from + m.arg.remap.len, "moved (mremap)");
          break;
        default:
          break;
      }
      if (!ok && !lingering_) return false;
    }
  }
}

// Milliseconds to wait before the next background chunk under maxBytesPerSecond (0: go).
int SnapshotEngine::ThrottleMs() const {
  if (options_.maxBytesPerSecond <= 0) return 0;
  double elapsed = static_cast<double>(NowNs() - instantNs_) / 1e9;
  double allowed = elapsed * options_.maxBytesPerSecond;
  if (static_cast<double>(backgroundBytes_) <= allowed) return 0;
  double wait = (static_cast<double>(backgroundBytes_) - allowed) / options_.maxBytesPerSecond * 1000.0;
  return std::max(1, std::min(10, static_cast<int>(wait)));
}

// The background thread: claims, copies and unprotects the pages nobody has claimed, a chunk at a
// time, so that the fault thread stays free to serve writers at once.
void SnapshotEngine::Background() {
  if (options_.backgroundIdle) {
    struct sched_param param = {};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);  // best effort
  }
  uint64_t per = std::max<uint64_t>(1, options_.chunkSize / pageSize_);
  for (uint64_t first = 0; first < pages_;) {
    if (Stopping()) return;
    int wait = ThrottleMs();
    if (wait > 0) {
      usleep(static_cast<useconds_t>(wait) * 1000);
      continue;
    }
    uint64_t end = std::min(pages_, first + per);
    uint64_t i = first;
    while (i < end) {
      if (!states_.Transition(i, kFree, kClaimed)) {
        i++;
        continue;
      }
      uint64_t j = states_.ClaimForward(i + 1, end, kFree, kClaimed);
      if (!CopyOut(&backgroundCopier_, i, j - i)) return;
      if (!Unprotect(i, j - i, false)) return;
      for (uint64_t k = i; k < j; k++) states_.Set(k, kDone);
      backgroundCopies_.fetch_add(j - i, std::memory_order_relaxed);
      backgroundBytes_ += (j - i) * pageSize_;
      i = j;
    }
    first = end;
  }
  backgroundDone_.store(true);
}

// The fault thread: serves writers until the background thread is through.
void SnapshotEngine::Run() {
  std::thread background([this]() { Background(); });
  for (;;) {
    if (cancel_.load()) Fail(ECANCELED, "snapshot", "cancelled");
    if (failed_.load()) break;
    if (!Drain()) break;
    if (backgroundDone_.load()) {
      // Every page is copied and unprotected; faults raised before that were woken by it.
      Drain();
      break;
    }
    struct pollfd p = {uffd_, POLLIN, 0};
    poll(&p, 1, 5);
  }
  background.join();
  lingering_ = true;  // from here on: no copies, no new errors; faults are only woken
  if (failed_.load()) ReleaseAll();
  endNs_ = NowNs();
  finished_.store(true);
}

// After a failure or cancel: unprotect whatever is still protected so that every writer goes on.
// Pieces may be unmapped (ENOENT: skip them), and a pending event makes the ioctl EAGAIN until it
// is read.
void SnapshotEngine::ReleaseAll() {
  auto unprotect = [this](uint64_t from, uint64_t len) {
    struct uffdio_writeprotect wp = {};
    wp.range.start = from;
    wp.range.len = len;
    for (int attempt = 0; attempt < 100; attempt++) {
      if (ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) == 0) return true;
      if (errno != EAGAIN && errno != EINTR) return false;
      Drain();
    }
    return false;
  };
  if (unprotect(start_, length_)) return;
  for (uint64_t i = 0; i < pages_; i++)
    if (states_.Get(i) != kDone) unprotect(start_ + i * pageSize_, pageSize_);
}

// After finishing, until Join() (after which the caller closes the uffd at once): keep reading, so
// that an munmap/madvise elsewhere never waits on an event nobody reads.
void SnapshotEngine::Linger() {
  while (!stop_.load()) {
    struct pollfd p = {uffd_, POLLIN, 0};
    poll(&p, 1, 20);
    Drain();
  }
}
