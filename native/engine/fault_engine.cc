#include "engine/fault_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "kernel/uapi.h"

namespace {

inline void CpuRelax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

FaultEngine::FaultEngine(const EngineOptions& options, std::function<void()> wakeJs)
    : options_(options), wakeJs_(std::move(wakeJs)) {
  paused_.store(options_.startPaused);
  if (options_.readSize < 1) options_.readSize = 1;
  spinBudgetNs_.store(options_.spinUs * 1000);
  if (options_.traceCapacity > 0) trace_.reset(new FaultTrace(options_.traceCapacity));
}

FaultEngine::~FaultEngine() {
  Stop();
  for (auto& n : notices_)
    if (n.kind == Notice::kFork && n.fd >= 0) close(n.fd);
}

int FaultEngine::Start(int uffd, std::string* syscall) {
  uffd_ = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
  if (uffd_ < 0) {
    *syscall = "fcntl(F_DUPFD_CLOEXEC)";
    return errno;
  }
  wakeFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wakeFd_ < 0) {
    int err = errno;
    close(uffd_);
    uffd_ = -1;
    *syscall = "eventfd";
    return err;
  }
  requestFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (requestFd_ < 0) {
    int err = errno;
    close(uffd_);
    close(wakeFd_);
    uffd_ = wakeFd_ = -1;
    *syscall = "eventfd";
    return err;
  }
  started_ = true;
  demand_ = std::thread([this] { DemandLoop(); });
  prefetch_ = std::thread([this] { PrefetchLoop(); });
  return 0;
}

void FaultEngine::Stop() {
  if (!started_ || stopping_.exchange(true)) return;
  uint64_t one = 1;
  ssize_t ignored = write(wakeFd_, &one, sizeof one);
  (void)ignored;
  KickPrefetch();
  if (demand_.joinable()) demand_.join();
  if (prefetch_.joinable()) prefetch_.join();
  close(uffd_);
  close(wakeFd_);
  close(requestFd_);
  uffd_ = wakeFd_ = requestFd_ = -1;
  // Nothing reads the sources now: their files and mappings go at once, not with the last
  // reference to a range (the JS object holding the engine may live on until a GC).
  deferred_.clear();
  failed_.clear();
  demandTable_.clear();
  std::lock_guard<std::mutex> lock(tableMu_);
  for (auto& r : table_) r->source->Release();
}

void FaultEngine::Resume() {
  if (!paused_.exchange(false) || wakeFd_ < 0) return;
  uint64_t one = 1;
  ssize_t ignored = write(wakeFd_, &one, sizeof one);
  (void)ignored;
}

void FaultEngine::KickPrefetch() {
  {
    std::lock_guard<std::mutex> lock(prefetchMu_);
    prefetchKick_.fetch_add(1);
  }
  prefetchCv_.notify_all();
}

// ---- ranges ---------------------------------------------------------------------------------

int FaultEngine::AddRange(std::shared_ptr<ServedRange> range) {
  {
    std::lock_guard<std::mutex> lock(tableMu_);
    for (auto& r : table_)
      if (range->start < r->end() && r->start < range->end()) return EEXIST;
    auto at = std::upper_bound(table_.begin(), table_.end(), range,
                               [](const auto& a, const auto& b) { return a->start < b->start; });
    table_.insert(at, std::move(range));
    tableVersion_.fetch_add(1);
  }
  KickPrefetch();
  return 0;
}

int FaultEngine::RemoveRange(uint64_t start, uint64_t end) {
  Table removed;
  {
    std::lock_guard<std::mutex> lock(tableMu_);
    for (auto it = table_.begin(); it != table_.end();) {
      if ((*it)->start >= start && (*it)->end() <= end) {
        (*it)->dropped.store(true, std::memory_order_seq_cst);
        removed.push_back(*it);
        it = table_.erase(it);
      } else {
        ++it;
      }
    }
    if (!removed.empty()) tableVersion_.fetch_add(1);
  }
  // Fills already under way finish (one ioctl's worth); none starts anew, since a fill checks
  // `dropped` after counting itself (FillRun). Then the caller may free what the source reads.
  for (auto& r : removed)
    while (r->fills.load(std::memory_order_seq_cst) != 0)
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  return static_cast<int>(removed.size());
}

Settlement FaultEngine::Settled() {
  std::lock_guard<std::mutex> lock(tableMu_);
  Settlement s;
  for (auto& r : table_) {
    uint64_t settled = r->settled.load();
    s.pages += settled;
    s.totalPages += r->pages;
    s.bytes += settled * r->pageSize;
    s.totalBytes += r->length;
  }
  return s;
}

std::shared_ptr<ZeroRegion> FaultEngine::ZerosFor(uint64_t pageSize, int* err) {
  std::lock_guard<std::mutex> lock(tableMu_);
  auto& z = zeros_[pageSize];
  // A few pages per copy, so that a run of zero pages is not one ioctl per page.
  if (!z) z = ZeroRegion::Create(std::max<uint64_t>(pageSize, 8u << 20), err);
  return z;
}

const FaultEngine::Table& FaultEngine::Snapshot(Table* local, uint64_t* version) {
  uint64_t v = tableVersion_.load();
  if (v != *version) {
    std::lock_guard<std::mutex> lock(tableMu_);
    *local = table_;
    *version = tableVersion_.load();
  }
  return *local;
}

std::shared_ptr<ServedRange> FaultEngine::Lookup(const Table& table, uint64_t address) const {
  auto it = std::upper_bound(table.begin(), table.end(), address,
                             [](uint64_t a, const auto& r) { return a < r->start; });
  if (it == table.begin()) return nullptr;
  --it;
  if (address >= (*it)->end() || (*it)->dropped.load(std::memory_order_relaxed)) return nullptr;
  return *it;
}

// ---- page states ----------------------------------------------------------------------------

size_t FaultEngine::MarkPresent(ServedRange* r, size_t first, size_t count) {
  size_t changed = 0;
  for (size_t i = first; i < first + count; i++) {
    uint8_t s = r->states.Get(i);
    if ((s == kMissing || s == kInFlight) && r->states.Transition(i, s, kPresent)) changed++;
  }
  if (changed > 0) Progress(r->settled.fetch_add(changed) + changed == r->pages);
  return changed;
}

void FaultEngine::SetState(ServedRange* r, size_t page, uint8_t to) {
  uint8_t prev = r->states.Set(page, to);
  if (IsSettled(prev) && !IsSettled(to)) r->settled.fetch_sub(1);
  if (!IsSettled(prev) && IsSettled(to)) r->settled.fetch_add(1);
}

// ---- filling --------------------------------------------------------------------------------

FaultEngine::FillStatus FaultEngine::FillRun(const std::shared_ptr<ServedRange>& r, size_t page, size_t count,
                                             Origin origin, From from, const uint8_t* bytes,
                                             std::vector<uint8_t>* scratch, bool* firstExisted,
                                             size_t* done) {
  // Counted while it runs, for RemoveRange; a range removed meanwhile is not filled at all.
  struct Counted {
    std::atomic<uint32_t>& n;
    explicit Counted(std::atomic<uint32_t>& c) : n(c) { n.fetch_add(1, std::memory_order_seq_cst); }
    ~Counted() { n.fetch_sub(1, std::memory_order_seq_cst); }
  } counted(r->fills);
  *done = 0;
  if (r->dropped.load(std::memory_order_seq_cst)) return kFilled;  // nothing left to do for it
  const uint64_t ps = r->pageSize;
  const Filler filler = r->filler(uffd_);
  uint64_t dst = r->start + page * ps;
  uint64_t len = count * ps;
  uint64_t off = 0;
  while (off < len) {
    FillResult f;
    switch (from) {
      case From::kSource:
        f = r->source->Fill(filler, dst + off, r->sourceOffset + page * ps + off, len - off, scratch);
        break;
      case From::kBytes:
        f = filler.Copy(dst + off, bytes + off, len - off);
        break;
      case From::kZeros:
        f = filler.Zero(dst + off, len - off);
        break;
    }
    if (f.done > 0) {
      size_t n = f.done / ps;
      // Counters first: whoever sees the pages present (drained()) sees them counted.
      stats_.bytes.fetch_add(f.done, std::memory_order_relaxed);
      if (f.zero) stats_.zeroPages.fetch_add(n, std::memory_order_relaxed);
      switch (origin) {
        case kDemand:
          stats_.demandPages.fetch_add(n, std::memory_order_relaxed);
          stats_.aroundPages.fetch_add(off == 0 ? n - 1 : n, std::memory_order_relaxed);
          break;
        case kAround:
          stats_.demandPages.fetch_add(n, std::memory_order_relaxed);
          stats_.aroundPages.fetch_add(n, std::memory_order_relaxed);
          break;
        case kPrefetch:
          stats_.prefetchPages.fetch_add(n, std::memory_order_relaxed);
          break;
        case kCompletion:
          stats_.handlerPages.fetch_add(n, std::memory_order_relaxed);
          break;
      }
      MarkPresent(r.get(), page + off / ps, n);
      // Only the prefetch thread fills for kPrefetch, only the demand thread for the others.
      if (trace_) (origin == kPrefetch ? prefetchFilled_ : traceFilled_) += f.done;
      off += f.done;
    }
    *done = off / ps;
    if (f.err == 0) continue;
    if (f.err == EAGAIN) {
      if (f.done > 0) continue;  // partial progress: go on with the rest
      return kDeferredOp;        // an event is pending: read it first
    }
    if (f.err == EEXIST) {
      // Someone (the other thread, a racing fault) filled this page first.
      if (off == 0 && firstExisted != nullptr) *firstExisted = true;
      stats_.exists.fetch_add(1, std::memory_order_relaxed);
      MarkPresent(r.get(), page + off / ps, 1);
      off += ps;
      *done = off / ps;
      continue;
    }
    if (f.err == ENOENT || f.err == ESRCH) {
      // Not registered any more (unregistered behind our back, or the process exited):
      // nothing will fault there through this uffd again.
      for (size_t i = page + off / ps; i < page + count; i++) SetState(r.get(), i, kGone);
      if (f.err == ESRCH) Error(f.err, f.syscall, "the process owning the memory exited", dst + off);
      *done = count;
      return kFailed;
    }
    FillFailed(r, dst + off, f, origin);
    return kFailed;
  }
  return kFilled;
}

void FaultEngine::FillFailed(const std::shared_ptr<ServedRange>& r, uint64_t address, const FillResult& f,
                             Origin origin) {
  std::string why;
  if (f.why != nullptr)
    why = std::string(": ") + f.why;
  else if (f.err == EINVAL && r->pageSize == BasePageSize())
    why = " (is it hugetlb memory served with the base page size? pass its pageSize)";
  else if (f.err == EFAULT && r->source->kind() == Source::kFile)
    why = ": the source file's pages cannot be read (truncated after it was opened?)";
  Error(f.err, f.syscall,
        std::string("filling ") + Hex(address) + " from source offset " +
            Hex(r->sourceOffset + (address - r->start)) + why,
        address);
}

FaultEngine::FillStatus FaultEngine::FillOrDefer(const std::shared_ptr<ServedRange>& r, size_t page,
                                                 size_t count, Origin origin, From from,
                                                 std::shared_ptr<std::vector<uint8_t>> bytes,
                                                 bool* firstExisted) {
  size_t done = 0;
  FillStatus s = FillRun(r, page, count, origin, from, bytes ? bytes->data() : nullptr, &demandScratch_,
                         firstExisted, &done);
  if (s != kDeferredOp) return s;
  std::shared_ptr<std::vector<uint8_t>> rest;
  if (bytes) rest = std::make_shared<std::vector<uint8_t>>(bytes->begin() + done * r->pageSize, bytes->end());
  deferred_.push_back(Deferred{r, 0, page + done, count - done, origin, from, std::move(rest)});
  stats_.deferred.fetch_add(1, std::memory_order_relaxed);
  return s;
}

void FaultEngine::RetryFailed(uint64_t now) {
  std::vector<Failed> due;
  for (auto it = failed_.begin(); it != failed_.end();) {
    if (it->dueNs <= now) {
      due.push_back(*it);
      it = failed_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& f : due) {
    auto& r = f.range;
    if (r->dropped.load() || r->states.Get(f.page) != kMissing) continue;  // gone, or filled meanwhile
    stats_.retries.fetch_add(1, std::memory_order_relaxed);
    if (FillOrDefer(r, f.page, 1, kDemand, From::kSource, nullptr, nullptr) != kFailed) continue;
    if (r->states.Get(f.page) != kMissing) continue;
    uint32_t next = std::min<uint32_t>(f.backoffMs * 2, 1000);
    failed_.push_back(Failed{r, f.page, NowNs() + next * 1000000ull, next});
  }
}

int FaultEngine::FailedTimeoutMs(uint64_t now) const {
  int best = -1;
  for (auto& f : failed_) {
    int ms = f.dueNs <= now ? 0 : static_cast<int>((f.dueNs - now + 999999) / 1000000);
    if (best < 0 || ms < best) best = ms;
  }
  return best;
}

void FaultEngine::ZeroUnserved(uint64_t address) {
  uint64_t size = BasePageSize();
  uint64_t page = AlignDown(address, size);
  FillResult f = ZeroPages(uffd_, page, size);
  if (f.err == EINVAL && options_.hugePageSize > size) {
    // No ZEROPAGE here: hugetlb memory (of the default huge page size, as far as we can tell).
    if (!unservedZeros_) {
      int err = 0;
      unservedZeros_ = ZeroRegion::Create(options_.hugePageSize, &err);
    }
    if (unservedZeros_) {
      size = options_.hugePageSize;
      page = AlignDown(address, size);
      f = CopyPages(uffd_, page, unservedZeros_->data(), size);
      f.zero = true;
    }
  }
  if (f.err == EAGAIN && f.done == 0) {
    deferred_.push_back(Deferred{nullptr, address, 0, 1, kDemand, From::kZeros, nullptr});
    stats_.deferred.fetch_add(1, std::memory_order_relaxed);
  } else if (f.err == EEXIST) {
    WakePages(uffd_, page, size);
  } else if (f.err == 0) {
    stats_.zeroPages.fetch_add(1, std::memory_order_relaxed);
    traceFilled_ += size;
  } else if (f.err != ENOENT) {
    Error(f.err, f.syscall, "zeros for " + Hex(page), page);
  }
}

void FaultEngine::RetryDeferred() {
  std::vector<Deferred> ops;
  ops.swap(deferred_);
  for (auto& d : ops) {
    stats_.retries.fetch_add(1, std::memory_order_relaxed);
    const uint64_t t0 = trace_ ? NowNs() : 0;
    traceFilled_ = 0;
    if (d.range == nullptr) {
      ZeroUnserved(d.address);
    } else if (d.from == From::kZeros) {
      if (!d.range->dropped.load()) ZeroRemoved(d.range, d.page);
    } else if (!d.range->dropped.load()) {
      FillOrDefer(d.range, d.page, d.count, d.origin, d.from, d.bytes, nullptr);
    }
    if (trace_ && traceFilled_ > 0) {
      uint8_t kind = d.from == From::kZeros ? kTraceZero : d.origin == kAround ? kTraceAround : kTraceDemand;
      uint64_t at = d.range ? d.range->start + d.page * d.range->pageSize : d.address;
      trace_->Record(kind, at, t0, NowNs(), traceFilled_, 0);
    }
  }
}

// ---- demand thread --------------------------------------------------------------------------

void FaultEngine::DemandLoop() {
  std::vector<struct uffd_msg> msgs(options_.readSize);
  const uint64_t maxSpin = static_cast<uint64_t>(options_.spinUs) * 1000;
  uint64_t idleSince = 0;
  int sleepsWithoutSpin = 0;
  int backoffMs = 1;
  bool dead = false;
  while (!stopping_.load(std::memory_order_relaxed)) {
    if (paused_.load()) {
      // Not reading the uffd yet: wait for Resume() or Stop() (both write the wake eventfd).
      struct pollfd w = {wakeFd_, POLLIN, 0};
      if (poll(&w, 1, -1) > 0 && (w.revents & POLLIN)) {
        uint64_t v;
        ssize_t ignored = read(wakeFd_, &v, sizeof v);
        (void)ignored;
      }
      continue;
    }
    ssize_t n = -1;
    errno = EAGAIN;  // after a fatal read error only completions and stop are waited for
    if (!dead) n = read(uffd_, msgs.data(), msgs.size() * sizeof(struct uffd_msg));
    if (n > 0) {
      uint64_t now = NowNs();
      if (idleSince != 0) {
        // A spin hit: the message came while spinning. Spin a little longer next time.
        stats_.spinHits.fetch_add(1, std::memory_order_relaxed);
        uint64_t b = spinBudgetNs_.load(std::memory_order_relaxed);
        spinBudgetNs_.store(static_cast<uint32_t>(std::min<uint64_t>(maxSpin, b + b / 4 + 1000)),
                            std::memory_order_relaxed);
      }
      idleSince = 0;
      stats_.reads.fetch_add(1, std::memory_order_relaxed);
      demandBusy_.store(1, std::memory_order_relaxed);
      HandleMessages(msgs.data(), static_cast<size_t>(n) / sizeof(struct uffd_msg), now);
      demandBusy_.store(0, std::memory_order_relaxed);
      if (!deferred_.empty()) RetryDeferred();  // the events that blocked them were just read
      if (!failed_.empty()) RetryFailed(NowNs());
      if (completionsPending_.load()) ProcessCompletions();
      FlushRequests(&batchRequests_);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && !dead) {
      Error(errno, "read", "the fault server stopped reading this uffd");
      dead = true;
    }
    if (completionsPending_.load()) {
      ProcessCompletions();
      FlushRequests(&batchRequests_);
      continue;
    }
    int timeout = -1;
    if (!deferred_.empty()) {
      // mmap_changing drops once the event's causer runs again: retry on a short, growing
      // timer, never in a tight loop.
      RetryDeferred();
      if (!deferred_.empty()) {
        timeout = backoffMs;
        backoffMs = std::min(backoffMs * 2, 50);
      } else {
        backoffMs = 1;
      }
    } else {
      backoffMs = 1;
    }
    if (!failed_.empty()) {
      RetryFailed(NowNs());
      int due = FailedTimeoutMs(NowNs());
      if (due >= 0 && (timeout < 0 || due < timeout)) timeout = due;
    }
    uint64_t now = NowNs();
    if (idleSince == 0) idleSince = now;
    // Adaptive spin: a sleeping reader costs one more cross-CPU wake-up per fault.
    uint64_t budget = spinBudgetNs_.load(std::memory_order_relaxed);
    if (!dead && timeout < 0 && now - idleSince < budget) {
      for (int i = 0; i < 16; i++) CpuRelax();
      continue;
    }
    // A spin miss halves the budget: spinning only pays when faulting threads run on another
    // CPU; when the scheduler packs them onto this one, spinning only delays them (measured on
    // this project's 2-vCPU VM: p99 = spin budget + 10 us). At 0, probe again now and then.
    if (maxSpin > 0 && timeout < 0) {
      uint64_t b = spinBudgetNs_.load(std::memory_order_relaxed);
      if (b > 0)
        b = b / 2 < 1000 ? 0 : b / 2;
      else if (++sleepsWithoutSpin >= 256)
        b = maxSpin / 4, sleepsWithoutSpin = 0;
      spinBudgetNs_.store(static_cast<uint32_t>(b), std::memory_order_relaxed);
    }
    struct pollfd fds[2] = {{uffd_, POLLIN, 0}, {wakeFd_, POLLIN, 0}};
    stats_.sleeps.fetch_add(1, std::memory_order_relaxed);
    int rc = poll(dead ? fds + 1 : fds, dead ? 1 : 2, timeout);
    if (rc > 0 && (fds[1].revents & POLLIN)) {
      uint64_t v;
      ssize_t ignored = read(wakeFd_, &v, sizeof v);
      (void)ignored;
    }
    idleSince = 0;
  }
}

void FaultEngine::HandleMessages(const void* data, size_t count, uint64_t readNs) {
  const struct uffd_msg* msgs = static_cast<const struct uffd_msg*>(data);
  for (size_t i = 0; i < count; i++) {
    const struct uffd_msg& m = msgs[i];
    switch (m.event) {
      case UFFD_EVENT_PAGEFAULT:
        stats_.faults.fetch_add(1, std::memory_order_relaxed);
        lastDemandNs_.store(readNs, std::memory_order_relaxed);
        if (m.arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)) {
          stats_.unhandled.fetch_add(1, std::memory_order_relaxed);
          if (!unhandledReported_.exchange(true))
            Error(EINVAL, "read",
                  "the fault server serves MISSING faults only; a WP or MINOR fault at " +
                      Hex(m.arg.pagefault.address) + " is left to its waiter",
                  m.arg.pagefault.address);
          break;
        }
        traceTid_ = m.arg.pagefault.feat.ptid;  // 0 without UFFD_FEATURE_THREAD_ID
        HandleFault(m.arg.pagefault.address, readNs);
        break;
      case UFFD_EVENT_REMOVE:
        stats_.removes.fetch_add(1, std::memory_order_relaxed);
        HandleRemove(m.arg.remove.start, m.arg.remove.end);
        break;
      case UFFD_EVENT_UNMAP:
        stats_.unmaps.fetch_add(1, std::memory_order_relaxed);
        HandleUnmap(m.arg.remove.start, m.arg.remove.end);
        break;
      case UFFD_EVENT_REMAP:
        stats_.remaps.fetch_add(1, std::memory_order_relaxed);
        HandleRemap(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
        break;
      case UFFD_EVENT_FORK:
        stats_.forks.fetch_add(1, std::memory_order_relaxed);
        HandleFork(static_cast<int>(m.arg.fork.ufd));
        break;
      default:
        break;
    }
  }
}

void FaultEngine::HandleFault(uint64_t address, uint64_t readNs) {
  const Table& table = Snapshot(&demandTable_, &demandVersion_);
  std::shared_ptr<ServedRange> r = Lookup(table, address);
  size_t i = r ? (address - r->start) / r->pageSize : 0;
  uint8_t state = r ? r->states.Get(i) : static_cast<uint8_t>(kGone);
  traceFilled_ = 0;
  traceAddress_ = address;
  traceReadNs_ = readNs;
  if (state == kGone) {
    // Registered with this uffd but served by no range: zeros, and say so once.
    stats_.unhandled.fetch_add(1, std::memory_order_relaxed);
    if (!unhandledReported_.exchange(true))
      Error(ENOENT, "ioctl(UFFDIO_ZEROPAGE)",
            "fault at " + Hex(address) + " outside every served range: served as zeros", address);
    ZeroUnserved(address);
    if (trace_) trace_->Record(kTraceZero, address, readNs, NowNs(), traceFilled_, traceTid_);
    return;
  }
  const uint64_t page = r->start + i * r->pageSize;
  if (recording_.load(std::memory_order_relaxed)) {
    // At base-page granularity whatever the range's page size (a working set outlives it).
    std::lock_guard<std::mutex> lock(touchMu_);
    touches_.emplace_back(r->id, r->sourceOffset + AlignDown(address - r->start, BasePageSize()));
  }
  if (state == kRemoved) {
    ZeroRemoved(r, i);
    uint64_t now = NowNs();
    latency_.Record(now - readNs);
    if (trace_) trace_->Record(kTraceZero, address, readNs, now, traceFilled_, traceTid_);
    return;
  }
  size_t window, ws, we;
  if (r->faultAround == 0) {
    // Adaptive: forward from the fault, as wide as the access pattern has earned (a fault on a
    // page filled meanwhile says nothing about the pattern).
    window = state == kPresent ? 1 : r->around.Window(i);
    ws = i;
    we = std::min(i + window, r->pages);
  } else {
    window = std::max<uint64_t>(r->faultAround / r->pageSize, 1);
    ws = i - i % window;
    we = std::min(ws + window, r->pages);
  }
  // Prefetch follows demand (locality), one window ahead: the next window is the likeliest
  // next fault, and the demand thread copies it faster than the two could share it.
  if (r->prefetch) r->cursor.store(std::min(we + window, r->pages), std::memory_order_relaxed);
  if (r->source->kind() == Source::kHandler) {
    if (state == kInFlight) return;  // the handler's bytes will wake it
    SetState(r.get(), i, kInFlight);
    size_t last = r->states.ClaimForward(i + 1, we, kMissing, kInFlight);
    size_t first = r->states.ClaimBackward(i, ws, kMissing, kInFlight);
    RequestFromHandler(r, first, last - first, false, &batchRequests_);
    batchRequests_.back().fault = address;
    return;
  }
  bool existed = false;
  size_t forward = 1 + r->states.RunOf(i + 1, we - i - 1, kMissing);
  if (FillOrDefer(r, i, forward, kDemand, From::kSource, nullptr, &existed) == kFailed &&
      r->states.Get(i) == kMissing) {
    // The faulting page itself failed: its thread waits; try again shortly (RetryFailed).
    bool queued = false;
    for (auto& f : failed_) queued = queued || (f.range == r && f.page == i);
    if (!queued) failed_.push_back(Failed{r, i, NowNs() + 10 * 1000000ull, 10});
  }
  uint64_t now = NowNs();
  latency_.Record(now - readNs);
  if (trace_) trace_->Record(kTraceDemand, address, readNs, now, traceFilled_, traceTid_);
  if (existed) {
    // Filled by the prefetch thread, whose ioctl wakes waiters only when it ends: wake now.
    WakePages(uffd_, page, r->pageSize);
    stats_.wakes.fetch_add(1, std::memory_order_relaxed);
  }
  size_t back = i;
  while (back > ws && r->states.Get(back - 1) == kMissing) back--;
  if (back < i) {
    traceFilled_ = 0;
    FillOrDefer(r, back, i - back, kAround, From::kSource, nullptr, nullptr);
    if (trace_)
      trace_->Record(kTraceAround, r->start + back * r->pageSize, now, NowNs(), traceFilled_, traceTid_);
  }
}

void FaultEngine::ZeroRemoved(const std::shared_ptr<ServedRange>& r, size_t i) {
  uint64_t page = r->start + i * r->pageSize;
  FillResult f = r->filler(uffd_).Zero(page, r->pageSize);
  if (f.err == EAGAIN && f.done == 0) {
    deferred_.push_back(Deferred{r, page, i, 1, kDemand, From::kZeros, nullptr});
    stats_.deferred.fetch_add(1, std::memory_order_relaxed);
  } else if (f.err == EEXIST) {
    WakePages(uffd_, page, r->pageSize);
  } else if (f.err == 0) {
    stats_.zeroPages.fetch_add(1, std::memory_order_relaxed);
    traceFilled_ += r->pageSize;
  } else if (f.err != ENOENT) {
    Error(f.err, f.syscall, "zeros for the removed page at " + Hex(page), page);
  }
}

void FaultEngine::RequestFromHandler(const std::shared_ptr<ServedRange>& r, size_t page, size_t count,
                                     bool prefetch, std::vector<HandlerRequest>* out) {
  HandlerRequest q;
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    q.id = nextRequest_++;
    Pending p{r, page, count, prefetch};
    if (!prefetch) p.faultAddress = traceAddress_, p.faultNs = traceReadNs_, p.faultTid = traceTid_;
    requests_[q.id] = p;
  }
  q.handlerId = r->source->handlerId();
  q.rangeId = r->id;
  q.address = r->start + page * r->pageSize;
  q.offset = r->sourceOffset + page * r->pageSize;
  q.length = count * r->pageSize;
  q.prefetch = prefetch;
  stats_.requests.fetch_add(1, std::memory_order_relaxed);
  out->push_back(q);
}

void FaultEngine::FlushRequests(std::vector<HandlerRequest>* requests) {
  if (requests->empty()) return;
  Notice n;
  n.kind = Notice::kRequests;
  n.requests.swap(*requests);
  Notify(std::move(n));
  uint64_t one = 1;
  ssize_t ignored = write(requestFd_, &one, sizeof one);
  (void)ignored;
}

void FaultEngine::Complete(uint64_t requestId, std::vector<uint8_t> bytes, bool ok) {
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    completions_.push_back(Completion{requestId, std::move(bytes), ok});
  }
  // One wake-up per batch: the demand thread takes the whole queue once woken.
  if (completionsPending_.exchange(true)) return;
  uint64_t one = 1;
  if (wakeFd_ >= 0) {
    ssize_t ignored = write(wakeFd_, &one, sizeof one);
    (void)ignored;
  }
}

void FaultEngine::DropProvided() {
  std::deque<Provided> dropped;
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    dropped.swap(provided_);
  }
  providedBytes_.store(0);
}

std::vector<std::pair<uint32_t, uint64_t>> FaultEngine::TakeTouches() {
  std::lock_guard<std::mutex> lock(touchMu_);
  std::vector<std::pair<uint32_t, uint64_t>> out;
  out.swap(touches_);
  return out;
}

uint64_t FaultEngine::Provide(uint32_t rangeId, uint64_t sourceOffset, const uint8_t* data, uint64_t size,
                              std::shared_ptr<void> hold) {
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    provided_.push_back(Provided{rangeId, sourceOffset, data, size, std::move(hold)});
  }
  uint64_t queued = providedBytes_.fetch_add(size) + size;
  if (completionsPending_.exchange(true)) return queued;  // the demand thread is on it already
  uint64_t one = 1;
  if (wakeFd_ >= 0) {
    ssize_t ignored = write(wakeFd_, &one, sizeof one);
    (void)ignored;
  }
  return queued;
}

// Demand first: a bounded amount per call, then back to the uffd (DemandLoop reads it before
// calling again while anything is queued).
bool FaultEngine::ProcessProvided(uint64_t budget) {
  uint64_t done = 0;
  while (done < budget) {
    Provided p;
    {
      std::lock_guard<std::mutex> lock(requestMu_);
      if (provided_.empty()) return false;
      p = std::move(provided_.front());
      provided_.pop_front();
    }
    const Table& table = Snapshot(&demandTable_, &demandVersion_);
    for (auto& r : table)
      if (r->id == p.rangeId && !r->dropped.load()) InstallProvided(r, p);
    done += p.size;
    providedBytes_.fetch_sub(p.size);
  }
  std::lock_guard<std::mutex> lock(requestMu_);
  return !provided_.empty();
}

void FaultEngine::InstallProvided(const std::shared_ptr<ServedRange>& r, const Provided& p) {
  // Whole pages (of the range's page size) of the range inside the provided bytes.
  const uint64_t ps = r->pageSize;
  uint64_t lo = std::max(p.sourceOffset, r->sourceOffset);
  uint64_t hi = std::min(p.sourceOffset + p.size, r->sourceOffset + r->length);
  if (lo >= hi) return;
  size_t first = (lo - r->sourceOffset + ps - 1) / ps;
  size_t end = (hi - r->sourceOffset) / ps;
  auto wanted = [](uint8_t s) { return s == kMissing || s == kInFlight; };
  size_t i = first;
  while (i < end) {
    if (!wanted(r->states.Get(i))) {
      i++;
      continue;
    }
    size_t run = 1;
    while (i + run < end && wanted(r->states.Get(i + run))) run++;
    const uint8_t* bytes = p.data + (r->sourceOffset + i * ps - p.sourceOffset);
    size_t filled = 0;
    if (FillRun(r, i, run, kPrefetch, From::kBytes, bytes, &demandScratch_, nullptr, &filled) ==
        kDeferredOp) {
      // An event is pending: retry the rest after reading it (a copy: `hold` goes with `p`).
      auto rest = std::make_shared<std::vector<uint8_t>>(bytes + filled * ps, bytes + run * ps);
      deferred_.push_back(Deferred{r, 0, i + filled, run - filled, kPrefetch, From::kBytes, std::move(rest)});
      stats_.deferred.fetch_add(1, std::memory_order_relaxed);
    }
    i += run;
  }
}

void FaultEngine::ProcessCompletions() {
  std::deque<Completion> done;
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    completionsPending_.store(false);
    done.swap(completions_);
  }
  bool kick = false;
  for (auto& c : done) {
    Pending p;
    {
      std::lock_guard<std::mutex> lock(requestMu_);
      auto it = requests_.find(c.id);
      if (it == requests_.end()) continue;
      p = it->second;
      requests_.erase(it);
    }
    if (p.prefetch) {
      p.range->inflight.fetch_sub(1);
      kick = true;
    }
    if (p.range->dropped.load()) continue;
    if (!c.ok) {
      for (size_t i = p.page; i < p.page + p.count; i++) p.range->states.Transition(i, kInFlight, kMissing);
      if (p.prefetch) p.range->prefetchFailed.store(true);
      continue;
    }
    c.bytes.resize(p.count * p.range->pageSize, 0);
    auto bytes = std::make_shared<std::vector<uint8_t>>(std::move(c.bytes));
    const uint64_t t0 = trace_ ? NowNs() : 0;
    traceFilled_ = 0;
    FillOrDefer(p.range, p.page, p.count, kCompletion, From::kBytes, bytes, nullptr);
    if (trace_) {
      // A demand request's record spans the fault's whole wait: read, handler, copy.
      if (p.prefetch)
        trace_->Record(kTracePrefetch, p.range->start + p.page * p.range->pageSize, t0, NowNs(), traceFilled_,
                       0);
      else
        trace_->Record(kTraceDemand, p.faultAddress, p.faultNs, NowNs(), traceFilled_, p.faultTid);
    }
  }
  if (kick) KickPrefetch();
  if (ProcessProvided(1 << 20)) completionsPending_.store(true);
}

// ---- events ---------------------------------------------------------------------------------

void FaultEngine::HandleRemove(uint64_t start, uint64_t end) {
  const Table& table = Snapshot(&demandTable_, &demandVersion_);
  bool kick = false, anyGone = false;
  for (auto& r : table) {
    uint64_t a = std::max(start, r->start), b = std::min(end, r->end());
    if (a >= b) continue;
    const uint64_t ps = r->pageSize;
    size_t pa = (a - r->start) / ps, pb = (b - r->start + ps - 1) / ps;
    if (options_.onRemove == RemovePolicy::kUnregister) {
      // Only whole pages can be unregistered; where that fails, zeros (just as correct).
      size_t ua = (a - r->start + ps - 1) / ps, ub = (b - r->start) / ps;
      if (ua < ub) {
        struct uffdio_range range = {r->start + ua * ps, (ub - ua) * ps};
        if (ioctl(uffd_, UFFDIO_UNREGISTER, &range) == 0) {
          for (size_t p = ua; p < ub; p++) SetState(r.get(), p, kGone);
          anyGone = anyGone || r->states.All(kGone);
        } else {
          ua = ub = pa;
        }
      }
      for (size_t p = pa; p < pb; p++)
        if ((p < ua || p >= ub) && r->states.Get(p) != kGone) SetState(r.get(), p, kRemoved);
      continue;
    }
    bool zero = options_.onRemove == RemovePolicy::kZero;
    for (size_t p = pa; p < pb; p++) {
      if (r->states.Get(p) == kGone) continue;
      SetState(r.get(), p, zero ? kRemoved : kMissing);
    }
    if (!zero && r->prefetch) {
      r->cursor.store(pa);  // re-serve from where the hole starts
      kick = true;
    }
  }
  if (anyGone) DropGoneRanges();
  if (kick) KickPrefetch();
  Progress(false);
}

void FaultEngine::HandleUnmap(uint64_t start, uint64_t end) {
  const Table& table = Snapshot(&demandTable_, &demandVersion_);
  bool anyGone = false;
  for (auto& r : table) {
    uint64_t a = std::max(start, r->start), b = std::min(end, r->end());
    if (a >= b) continue;
    const uint64_t ps = r->pageSize;
    size_t pa = (a - r->start) / ps, pb = (b - r->start + ps - 1) / ps;
    for (size_t p = pa; p < pb; p++) SetState(r.get(), p, kGone);
    if (r->states.All(kGone)) anyGone = true;
  }
  if (anyGone) DropGoneRanges();
  Progress(true);
}

// With tableMu_ held: drops the ranges whose every page is gone. Returns whether any was.
bool FaultEngine::EraseGoneLocked() {
  size_t before = table_.size();
  table_.erase(std::remove_if(table_.begin(), table_.end(),
                              [](const std::shared_ptr<ServedRange>& r) {
                                bool gone = r->states.All(kGone);
                                if (gone) r->dropped.store(true);
                                return gone;
                              }),
               table_.end());
  return table_.size() != before;
}

void FaultEngine::DropGoneRanges() {
  std::lock_guard<std::mutex> lock(tableMu_);
  if (EraseGoneLocked()) tableVersion_.fetch_add(1);
}

void FaultEngine::HandleRemap(uint64_t from, uint64_t to, uint64_t len) {
  {
    std::lock_guard<std::mutex> lock(tableMu_);
    Table added;
    for (auto& r : table_) {
      uint64_t a = std::max(from, r->start), b = std::min(from + len, r->end());
      if (a >= b) continue;
      // The moved part becomes a range of its own at the new address, with its page states.
      size_t pa = (a - r->start) / r->pageSize, n = (b - a) / r->pageSize;
      auto moved = std::make_shared<ServedRange>(r->id, to + (a - from), b - a, r->pageSize, r->source,
                                                 r->sourceOffset + (a - r->start), r->prefetch,
                                                 r->faultAround, r->zeros);
      size_t settled = 0;
      for (size_t k = 0; k < n; k++) {
        uint8_t s = r->states.Get(pa + k);
        if (s == kInFlight) s = kMissing;  // the handler's bytes would land at the old address
        moved->states.Set(k, s);
        if (IsSettled(s)) settled++;
      }
      moved->settled.store(settled);
      for (size_t k = 0; k < n; k++) SetState(r.get(), pa + k, kGone);
      added.push_back(std::move(moved));
    }
    for (auto& m : added) table_.push_back(std::move(m));
    EraseGoneLocked();
    std::sort(table_.begin(), table_.end(), [](const auto& x, const auto& y) { return x->start < y->start; });
    tableVersion_.fetch_add(1);
  }
  KickPrefetch();
}

void FaultEngine::HandleFork(int fd) {
  if (options_.onFork == ForkPolicy::kEmit) {
    Notice n;
    n.kind = Notice::kFork;
    n.fd = fd;
    Notify(std::move(n));
  } else {
    close(fd);  // the child's ranges are unregistered; its missing pages read as zeros
  }
}

// ---- prefetch thread ------------------------------------------------------------------------

void FaultEngine::PrefetchLoop() {
  if (options_.backgroundIdle) {
    struct sched_param param = {};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
  }
  Table local;
  uint64_t version = 0;
  std::vector<uint8_t> scratch;
  std::vector<HandlerRequest> requests;
  int backoffMs = 1;
  while (!stopping_.load()) {
    uint64_t kick = prefetchKick_.load();
    const Table& table = Snapshot(&local, &version);
    bool worked = false;
    for (auto& r : table) {
      if (stopping_.load()) break;
      if (!r->prefetch || r->dropped.load() || r->prefetchFailed.load()) continue;
      bool handler = r->source->kind() == Source::kHandler;
      if (handler && r->inflight.load() >= options_.handlerConcurrency) continue;
      // Demand first: while faults keep coming, pause (a copy here would slow the CPU that the
      // faulting thread or the demand thread is woken on). Nothing is claimed yet.
      const uint64_t yieldNs = static_cast<uint64_t>(options_.prefetchYieldUs) * 1000;
      while (!handler && yieldNs > 0 && !stopping_.load() &&
             NowNs() - lastDemandNs_.load(std::memory_order_relaxed) < yieldNs) {
        stats_.prefetchPauses.fetch_add(1, std::memory_order_relaxed);
        struct timespec pause = {static_cast<time_t>(yieldNs / 1000000000ull),
                                 static_cast<long>(yieldNs % 1000000000ull)};
        nanosleep(&pause, nullptr);
      }
      size_t chunk = std::max<uint64_t>(options_.prefetchChunk / r->pageSize, 1);
      size_t i = r->states.Find(std::min(r->cursor.load(), r->pages), kMissing);
      if (i >= r->pages) i = r->states.Find(0, kMissing);
      if (i >= r->pages) continue;
      size_t n = r->states.ClaimForward(i, i + chunk, kMissing, kInFlight) - i;
      if (n == 0) continue;
      worked = true;
      r->cursor.store(i + n);
      if (handler) {
        r->inflight.fetch_add(1);
        RequestFromHandler(r, i, n, true, &requests);
        FlushRequests(&requests);
        continue;
      }
      size_t done = 0;
      const uint64_t t0 = trace_ ? NowNs() : 0;
      prefetchFilled_ = 0;
      FillStatus s = FillRun(r, i, n, kPrefetch, From::kSource, nullptr, &scratch, nullptr, &done);
      if (trace_ && prefetchFilled_ > 0)
        trace_->Record(kTracePrefetch, r->start + i * r->pageSize, t0, NowNs(), prefetchFilled_, 0);
      if (s == kFilled) {
        backoffMs = 1;
        continue;
      }
      for (size_t k = i + done; k < i + n; k++) r->states.Transition(k, kInFlight, kMissing);
      if (s == kFailed) {
        r->prefetchFailed.store(true);
        continue;
      }
      // EAGAIN: an event is pending; the demand thread reads it. Back off and retry.
      r->cursor.store(i + done);
      stats_.deferred.fetch_add(1, std::memory_order_relaxed);
      struct timespec ts = {0, backoffMs * 1000000L};
      nanosleep(&ts, nullptr);
      backoffMs = std::min(backoffMs * 2, 50);
    }
    if (!worked) {
      std::unique_lock<std::mutex> lock(prefetchMu_);
      prefetchCv_.wait(lock, [&] { return stopping_.load() || prefetchKick_.load() != kick; });
    }
  }
}

// ---- notices --------------------------------------------------------------------------------

void FaultEngine::Notify(Notice notice) {
  {
    std::lock_guard<std::mutex> lock(noticeMu_);
    notices_.push_back(std::move(notice));
  }
  if (!jsScheduled_.exchange(true)) wakeJs_();
}

std::deque<Notice> FaultEngine::TakeNotices() {
  jsScheduled_.store(false);
  progressQueued_.store(false);
  uint64_t v;
  if (requestFd_ >= 0) {
    ssize_t ignored = read(requestFd_, &v, sizeof v);
    (void)ignored;
  }
  std::deque<Notice> out;
  std::lock_guard<std::mutex> lock(noticeMu_);
  out.swap(notices_);
  return out;
}

void FaultEngine::Error(int err, const std::string& syscall, const std::string& detail, uint64_t address) {
  stats_.errors.fetch_add(1, std::memory_order_relaxed);
  Notice n;
  n.kind = Notice::kError;
  n.err = err;
  n.syscall = syscall;
  n.detail = detail;
  n.address = address;
  Notify(std::move(n));
}

void FaultEngine::Progress(bool force) {
  uint64_t now = NowNs();
  uint64_t last = lastProgressNs_.load(std::memory_order_relaxed);
  if (!force && now - last < static_cast<uint64_t>(options_.progressIntervalMs) * 1000000ull) return;
  lastProgressNs_.store(now, std::memory_order_relaxed);
  if (progressQueued_.exchange(true)) return;  // one is already on its way
  Notice n;
  n.kind = Notice::kProgress;
  Notify(std::move(n));
}
