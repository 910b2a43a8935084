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

#include "engine/spin_policy.h"
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
  // Named for top -H, perf and benchmarks that pin them (bench/fault-server.js).
  demand_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "uffd-demand");
    DemandLoop();
  });
  prefetch_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "uffd-prefetch");
    PrefetchLoop();
  });
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
    if ((s == kMissing || s == kInFlight || s == kFailing) && r->states.Transition(i, s, kPresent)) changed++;
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
                                             std::vector<uint8_t>* scratch, size_t* done,
                                             FaultTiming* timing) {
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
  // The page a fault waits on, if this run has it: timed, and recorded once it is resolved.
  size_t waited = SIZE_MAX;
  if (timing != nullptr && timing->address != 0) {
    uint64_t a = AlignDown(timing->address, ps);
    if (a >= dst && a < dst + len) waited = page + (a - dst) / ps;
  }
  while (off < len) {
    uint64_t t0 = waited != SIZE_MAX ? NowNs() : 0;
    FillResult f;
    if (r->minor()) {
      f = FillMinor(r.get(), dst + off, r->sourceOffset + page * ps + off, len - off, from,
                    bytes != nullptr ? bytes + off : nullptr, scratch);
    } else {
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
    }
    if (waited != SIZE_MAX) {
      uint64_t spent = NowNs() - t0;
      timing->sourceNs += f.sourceNs;
      timing->fillNs += spent > f.sourceNs ? spent - f.sourceNs : 0;
    }
    if (f.done > 0) {
      size_t n = f.done / ps;
      size_t first = page + off / ps;
      // Counters first: whoever sees the pages present (drained()) sees them counted.
      stats_.bytes.fetch_add(f.done, std::memory_order_relaxed);
      if (f.zero) stats_.zeroPages.fetch_add(n, std::memory_order_relaxed);
      // Zeros asked for (a removed page, onSourceError 'zero') are zeroPages only: no source was
      // read for them (the Firecracker handler's pagesServed, the stats' demandPages).
      if (from != From::kZeros) {
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
      }
      CountPages(r.get(), first, n, origin, f.zero, waited != SIZE_MAX ? timing : nullptr);
      MarkPresent(r.get(), first, n);
      // Only the prefetch thread fills for kPrefetch, only the demand thread for the others.
      if (trace_) (origin == kPrefetch ? prefetchFilled_ : traceFilled_) += f.done;
      off += f.done;
      if (waited != SIZE_MAX && waited < first + n) {
        Record(r.get(), timing);
        waited = SIZE_MAX;
      }
    }
    *done = off / ps;
    if (f.err == 0) continue;
    if (f.err == EAGAIN) {
      if (f.done > 0) continue;  // partial progress: go on with the rest
      return kDeferredOp;        // an event is pending: read it first
    }
    if (f.err == EEXIST) {
      // Someone (the other thread, a racing fault, another range over the same page cache)
      // filled this page first.
      size_t p = page + off / ps;
      stats_.exists.fetch_add(1, std::memory_order_relaxed);
      MarkPresent(r.get(), p, 1);
      if (p == waited) {
        // The thread waiting on it may have faulted before that fill, whose ioctl wakes waiters
        // only when it ends (the prefetch thread's copies a whole chunk): wake it now.
        uint64_t w0 = NowNs();
        WakePages(uffd_, dst + off, ps);
        stats_.wakes.fetch_add(1, std::memory_order_relaxed);
        timing->wakeNs += NowNs() - w0;
        Record(r.get(), timing);
        waited = SIZE_MAX;
      }
      off += ps;
      *done = off / ps;
      continue;
    }
    if (f.err == ENOENT || f.err == ESRCH) {
      // Not registered any more (unregistered behind our back, or the process exited):
      // nothing will fault there through this uffd again.
      for (size_t i = page + off / ps; i < page + count; i++) SetState(r.get(), i, kGone);
      if (f.err == ESRCH) Error(f.err, f.syscall, "the process owning the memory exited", dst + off);
      if (waited != SIZE_MAX) Record(r.get(), timing);
      *done = count;
      return kFailed;
    }
    FillFailed(r, page + off / ps, count - off / ps, f, origin, from, waited != SIZE_MAX ? timing : nullptr);
    return kFailed;
  }
  return kFilled;
}

FillResult FaultEngine::FillMinor(ServedRange* r, uint64_t dst, uint64_t at, uint64_t len, From from,
                                  const uint8_t* bytes, std::vector<uint8_t>* scratch) {
  PageCache& cache = *r->cache;
  const uint64_t ps = r->pageSize;
  const size_t n = len / ps;
  const size_t first = r->cacheFirst + (dst - r->start) / ps;  // in the page cache's writer
  const Filler writer = cache.filler();
  const uint64_t t0 = NowNs();
  for (int attempt = 0;; attempt++) {
    // 1. The page cache: bytes in through the writer where it has none (EEXIST: it has, keep it).
    FillResult failure;
    size_t limit = n;
    size_t k = 0;
    bool worked = false;  // asked the kernel anything (else the page cache had every page: no source stage)
    while (k < n) {
      k += cache.CachedRun(first + k, n - k);
      if (k >= n) break;
      worked = true;
      size_t run = cache.UnknownRun(first + k, n - k);
      if (run > 1 && cache.Probe(first + k, run) > 0) continue;  // some were cached after all
      uint64_t wdst = cache.At(first + k), off = k * ps;
      FillResult f;
      switch (from) {
        case From::kSource:
          f = r->source->Fill(writer, wdst, at + off, run * ps, scratch);
          break;
        case From::kBytes:
          f = writer.Copy(wdst, bytes + off, run * ps);
          break;
        case From::kZeros:
          f = writer.Zero(wdst, run * ps);
          break;
      }
      size_t got = f.done / ps;
      for (size_t j = 0; j < got; j++) cache.MarkCached(first + k + j);
      if (got > 0) {
        r->metrics->cachedPages.fetch_add(got, std::memory_order_relaxed);
        stats_.cachedPages.fetch_add(got, std::memory_order_relaxed);
      }
      k += got;
      if (f.err == 0 || (f.err == EAGAIN && got > 0)) continue;
      if (f.err == EEXIST) {
        cache.MarkCached(first + k);
        k++;
        continue;
      }
      failure = f;  // the source's (or the writer's) failure at page k: map what is cached first
      // The writer's uffd has no events, so never "pending"; and the faulting range is not the
      // one missing if the writer is (ENOENT would read as "unregistered" to FillRun).
      if (failure.err == EAGAIN) failure.err = EIO;
      if (failure.err == ENOENT || failure.err == ESRCH) failure.err = EBADF;
      limit = k;
      break;
    }
    // 2. Map them: no copy.
    const uint64_t cacheNs = worked ? NowNs() - t0 : 0;  // the page cache's part (the CONTINUE is the fill)
    FillResult out;
    if (limit > 0) out = ContinuePages(uffd_, dst, limit * ps);
    out.sourceNs = cacheNs;
    if (out.err == EFAULT && out.done == 0 && attempt == 0) {
      // Not in the page cache after all (a hole punched since: MADV_REMOVE, fallocate): again.
      cache.Forget(first, 1);
      continue;
    }
    out.zero = from == From::kZeros || (from == From::kSource && r->source->kind() == Source::kZero);
    if (out.err == 0 && failure.err != 0) {
      out.err = failure.err;
      out.syscall = failure.syscall;
    }
    return out;
  }
}

void FaultEngine::CountPages(ServedRange* r, size_t first, size_t n, Origin origin, bool zero,
                             const FaultTiming* timing) {
  RangeMetrics& m = *r->metrics;
  if (zero) {
    m.Count(kClassZero, n);
    return;
  }
  if (origin == kPrefetch || (origin == kCompletion && timing == nullptr)) {
    m.Count(kClassPrefetch, n);
    return;
  }
  size_t demand = 0;
  if (timing != nullptr && timing->address != 0) {
    size_t p = (AlignDown(timing->address, r->pageSize) - r->start) / r->pageSize;
    if (p >= first && p < first + n) demand = 1;
  }
  if (demand) m.Count(kClassDemand, demand);
  if (n > demand) m.Count(kClassAround, n - demand);
}

void FaultEngine::Record(ServedRange* r, FaultTiming* t) {
  if (t == nullptr || t->address == 0) return;
  const uint64_t done = NowNs();
  RangeMetrics& m = *r->metrics;
  uint64_t blocked = done - t->readNs;
  if (t->waiters > 0) blocked += t->waiters * done - t->waitersReadNs;
  m.blockedNs.fetch_add(blocked, std::memory_order_relaxed);
  stats_.blockedNs.fetch_add(blocked, std::memory_order_relaxed);
  const uint64_t read = t->startNs > t->readNs ? t->startNs - t->readNs : 0;
  // Only the demand thread records stages (prefetch fills carry no timing).
  for (LatencyHistogram* h : {m.stages, stats_.stages}) {
    h[kStageRead].RecordOwned(read);
    h[kStageSource].RecordOwned(t->sourceNs);
    h[kStageFill].RecordOwned(t->fillNs);
    if (t->wakeNs > 0) h[kStageWake].RecordOwned(t->wakeNs);
    h[kStageTotal].RecordOwned(done - t->readNs);
  }
  t->address = 0;  // recorded: once
}

void FaultEngine::FillFailed(const std::shared_ptr<ServedRange>& r, size_t page, size_t count,
                             const FillResult& f, Origin origin, From from, FaultTiming* timing) {
  const uint64_t ps = r->pageSize;
  const uint64_t address = r->start + page * ps;
  r->metrics->sourceErrors.fetch_add(1, std::memory_order_relaxed);
  stats_.sourceErrors.fetch_add(1, std::memory_order_relaxed);
  std::string what = "filling " + Hex(address) +
                     (from == From::kSource  ? " from source offset " + Hex(r->sourceOffset + page * ps)
                      : from == From::kBytes ? std::string(" with a handler's bytes")
                                             : std::string(" with zeros"));
  if (f.why != nullptr)
    what += std::string(": ") + f.why;
  else if (f.err == EINVAL && ps == BasePageSize())
    what += " (is it hugetlb memory served with the base page size? pass its pageSize)";
  else if (f.err == EFAULT && from == From::kSource && r->source->kind() == Source::kFile)
    what += ": the source file's pages cannot be read (truncated after it was opened?)";
  const bool waited = timing != nullptr && timing->address != 0 && AlignDown(timing->address, ps) == address;
  if (!waited) {
    // Nobody waits on this page here (fault-around, prefetch): it stays missing, and a fault on
    // it meets the range's policy then.
    SourceError(f, what, address, "none", 0);
    return;
  }
  const SourceErrorPolicy& policy = r->onSourceError;
  SourceErrorAction action = policy.action;
  const uint64_t now = NowNs();
  const uint64_t firstNs = retrying_.active ? retrying_.firstNs : now;
  if (from == From::kZeros) action = SourceErrorAction::kRetry;  // zeros failed: try the source again
  if (action == SourceErrorAction::kRetry && policy.deadlineMs > 0 &&
      now - firstNs >= static_cast<uint64_t>(policy.deadlineMs) * 1000000ull)
    action = policy.then;
  ApplySourcePolicy(r, page, action, f, what, timing, firstNs);
}

void FaultEngine::ApplySourcePolicy(const std::shared_ptr<ServedRange>& r, size_t page,
                                    SourceErrorAction action, const FillResult& f, const std::string& what,
                                    FaultTiming* timing, uint64_t firstNs) {
  const uint64_t address = r->start + page * r->pageSize;
  switch (action) {
    case SourceErrorAction::kRetry: {
      const SourceErrorPolicy& policy = r->onSourceError;
      uint32_t backoff = retrying_.active && retrying_.backoffMs > 0
                             ? std::min(retrying_.backoffMs * 2, std::max(policy.maxBackoffMs, 1u))
                             : std::max(policy.backoffMs, 1u);
      SetState(r.get(), page, kFailing);
      failing_.push_back(Failing{r, page, firstNs, NowNs() + backoff * 1000000ull, backoff, *timing});
      timing->address = 0;  // recorded when a retry resolves it
      SourceError(f, what, address, "retry", backoff);
      return;
    }
    case SourceErrorAction::kPoison:
      SourceError(f, what, address, "poison", 0);
      Poison(r, page, timing);
      return;
    case SourceErrorAction::kZero:
      SourceError(f, what, address, "zero", 0);
      FillOrDefer(r, page, 1, kDemand, From::kZeros, nullptr, timing);
      return;
  }
}

void FaultEngine::Poison(const std::shared_ptr<ServedRange>& r, size_t page, FaultTiming* timing) {
  const uint64_t ps = r->pageSize;
  const uint64_t address = r->start + page * ps;
  uint64_t t0 = NowNs();
  FillResult p = PoisonPages(uffd_, address, ps);
  if (timing != nullptr && timing->address != 0) timing->fillNs += NowNs() - t0;
  if (p.err == 0) {
    r->metrics->Count(kClassPoisoned, 1);
    stats_.poisonedPages.fetch_add(1, std::memory_order_relaxed);
    uint8_t prev = r->states.Set(page, kPoisoned);
    if (!IsSettled(prev)) Progress(r->settled.fetch_add(1) + 1 == r->pages);
    Record(r.get(), timing);
    return;
  }
  if (p.err == EEXIST) {
    // Present after all (filled meanwhile): the waiter only needs waking.
    MarkPresent(r.get(), page, 1);
    WakePages(uffd_, address, ps);
    Record(r.get(), timing);
    return;
  }
  if (p.err == EAGAIN) {
    // An event is pending: after reading it, the page is tried again (and poisoned if it fails).
    SetState(r.get(), page, kFailing);
    failing_.push_back(Failing{r, page, 0, NowNs() + 1000000ull, 1, timing ? *timing : FaultTiming{}});
    if (timing != nullptr) timing->address = 0;
    return;
  }
  // EINVAL: no UFFDIO_POISON in this kernel (Linux < 6.6). Zeros, rather than a thread blocked
  // for ever. (serve() refuses 'poison' where the kernel lacks it; this is the last resort.)
  Error(p.err, p.syscall,
        "poisoning " + Hex(address) + " (UFFDIO_POISON needs Linux 6.6+): zeros served instead", address);
  FillOrDefer(r, page, 1, kDemand, From::kZeros, nullptr, timing);
}

void FaultEngine::RetryFailing() {
  if (failing_.empty()) return;
  const uint64_t now = NowNs();
  std::vector<Failing> due;
  for (auto it = failing_.begin(); it != failing_.end();) {
    if (it->dueNs <= now) {
      due.push_back(std::move(*it));
      it = failing_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& e : due) {
    ServedRange* r = e.range.get();
    if (r->dropped.load()) continue;  // unregistered: the kernel woke its waiters
    if (r->states.Get(e.page) != kFailing) {
      // Changed meanwhile (removed, unmapped, filled): let the waiters fault again.
      WakePages(uffd_, r->start + e.page * r->pageSize, r->pageSize);
      continue;
    }
    stats_.retries.fetch_add(1, std::memory_order_relaxed);
    retrying_.active = true;
    retrying_.firstNs = e.firstNs;
    retrying_.backoffMs = e.backoffMs;
    FillOrDefer(e.range, e.page, 1, kDemand, From::kSource, nullptr, &e.timing);
    retrying_.active = false;
  }
}

int FaultEngine::FailingTimeoutMs() const {
  if (failing_.empty()) return -1;
  uint64_t now = NowNs(), next = UINT64_MAX;
  for (auto& e : failing_) next = std::min(next, e.dueNs);
  if (next <= now) return 0;
  return static_cast<int>(std::min<uint64_t>((next - now + 999999) / 1000000, 60000));
}

FaultEngine::FillStatus FaultEngine::FillOrDefer(const std::shared_ptr<ServedRange>& r, size_t page,
                                                 size_t count, Origin origin, From from,
                                                 std::shared_ptr<std::vector<uint8_t>> bytes,
                                                 FaultTiming* timing) {
  size_t done = 0;
  FillStatus s =
      FillRun(r, page, count, origin, from, bytes ? bytes->data() : nullptr, &demandScratch_, &done, timing);
  if (s != kDeferredOp) return s;
  std::shared_ptr<std::vector<uint8_t>> rest;
  if (bytes) rest = std::make_shared<std::vector<uint8_t>>(bytes->begin() + done * r->pageSize, bytes->end());
  Deferred d{r, 0, page + done, count - done, origin, from, std::move(rest), FaultTiming{}};
  if (timing != nullptr) {
    d.timing = *timing;  // recorded when the deferred fill resolves it
    timing->address = 0;
  }
  deferred_.push_back(std::move(d));
  stats_.deferred.fetch_add(1, std::memory_order_relaxed);
  return s;
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
    } else if (!d.range->dropped.load()) {
      FillOrDefer(d.range, d.page, d.count, d.origin, d.from, d.bytes, &d.timing);
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
  SpinPolicy spin(static_cast<uint64_t>(options_.spinUs) * 1000);
  uint64_t idleSince = 0;
  uint64_t budget = 0;  // the spin budget of the idle period under way
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
    const uint64_t readNs = NowNs();
    if (!dead) n = read(uffd_, msgs.data(), msgs.size() * sizeof(struct uffd_msg));
    if (n > 0) {
      if (idleSince != 0 && budget > 0) {
        // A spin hit: the message came while spinning.
        stats_.spinHits.fetch_add(1, std::memory_order_relaxed);
        spin.Hit();
      }
      idleSince = 0;
      stats_.reads.fetch_add(1, std::memory_order_relaxed);
      demandBusy_.store(1, std::memory_order_relaxed);
      HandleMessages(msgs.data(), static_cast<size_t>(n) / sizeof(struct uffd_msg), readNs);
      demandBusy_.store(0, std::memory_order_relaxed);
      if (!deferred_.empty()) RetryDeferred();  // the events that blocked them were just read
      if (!failing_.empty()) RetryFailing();
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
    if (!failing_.empty()) {
      // Pages whose source failed while threads wait on them: filled again when due.
      RetryFailing();
      int due = FailingTimeoutMs();
      if (due >= 0) timeout = timeout < 0 ? due : std::min(timeout, due);
    }
    uint64_t now = NowNs();
    if (idleSince == 0) {
      // Adaptive spin (spin_policy.h): a sleeping reader costs one more wake-up per fault.
      idleSince = now;
      budget = dead || timeout >= 0 ? 0 : spin.Begin();
      spinBudgetNs_.store(static_cast<uint32_t>(budget), std::memory_order_relaxed);
    }
    if (timeout < 0 && now - idleSince < budget) {
      for (int i = 0; i < 16; i++) CpuRelax();
      continue;
    }
    if (budget > 0) spin.Miss();
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
        if (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
          // Write protection is its waiter's business (a range registered MINOR + WP keeps its
          // WP faults): whoever protected the page resolves them with UFFDIO_WRITEPROTECT.
          stats_.unhandled.fetch_add(1, std::memory_order_relaxed);
          if (!unhandledReported_.exchange(true))
            Error(EINVAL, "read",
                  "the fault server serves MISSING and MINOR faults; a WP fault at " +
                      Hex(m.arg.pagefault.address) + " is left to its waiter",
                  m.arg.pagefault.address);
          break;
        }
        {
          // One lookup serves both questions: is the range delegated, and how to serve it.
          const std::shared_ptr<ServedRange> r =
              Lookup(Snapshot(&demandTable_, &demandVersion_), m.arg.pagefault.address);
          if (r != nullptr && r->delegate != nullptr) {
            r->delegate->OnFault(m.arg.pagefault.address, m.arg.pagefault.flags);
            break;
          }
          HandleFault(r, m.arg.pagefault.address, readNs,
                      (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0, m.arg.pagefault.feat.ptid);
        }
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

void FaultEngine::HandleFault(const std::shared_ptr<ServedRange>& r, uint64_t address, uint64_t readNs,
                              bool minor, uint32_t tid) {
  if (minor && (r == nullptr || !r->minor())) {
    // Registered MINOR by someone else: theirs to resolve.
    stats_.unhandled.fetch_add(1, std::memory_order_relaxed);
    if (!unhandledReported_.exchange(true))
      Error(EINVAL, "read",
            "a MINOR fault at " + Hex(address) +
                " outside every range served with { mode: 'minor' } is left to its waiter",
            address);
    return;
  }
  size_t i = r ? (address - r->start) / r->pageSize : 0;
  uint8_t state = r ? r->states.Get(i) : static_cast<uint8_t>(kGone);
  traceFilled_ = 0;
  if (state == kGone) {
    // Registered with this uffd but served by no range: zeros, and say so once.
    stats_.unhandled.fetch_add(1, std::memory_order_relaxed);
    if (!unhandledReported_.exchange(true))
      Error(ENOENT, "ioctl(UFFDIO_ZEROPAGE)",
            "fault at " + Hex(address) + " outside every served range: served as zeros", address);
    ZeroUnserved(address);
    if (trace_) trace_->Record(kTraceZero, address, readNs, NowNs(), traceFilled_, tid);
    return;
  }
  FaultTiming t;
  t.address = address;
  t.tid = tid;
  t.minor = minor;
  t.readNs = readNs;
  t.startNs = NowNs();
  r->metrics->faults.fetch_add(1, std::memory_order_relaxed);
  if (recording_.load(std::memory_order_relaxed)) {
    // At base-page granularity whatever the range's page size (a working set outlives it).
    std::lock_guard<std::mutex> lock(touchMu_);
    touches_.emplace_back(r->id, r->sourceOffset + AlignDown(address - r->start, BasePageSize()));
  }
  // A MINOR fault says the page is in the page cache (pushed before serving, say).
  if (minor) r->cache->MarkCached(r->cacheFirst + i);
  if (state == kRemoved) {
    ZeroRemoved(r, i, &t);
    if (trace_) trace_->Record(kTraceZero, address, readNs, NowNs(), traceFilled_, tid);
    return;
  }
  if (state == kFailing) {
    // Its source failed; a retry is due (which wakes every waiter).
    for (auto& e : failing_)
      if (e.range == r && e.page == i) {
        e.timing.waiters++;
        e.timing.waitersReadNs += readNs;
      }
    return;
  }
  if (state == kPoisoned) {
    Poison(r, i, &t);  // its marker went (MADV_DONTNEED): poisoned again
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
    if (state == kInFlight) {
      WaitOnRequest(r.get(), i, readNs);  // the handler's bytes will wake it
      return;
    }
    SetState(r.get(), i, kInFlight);
    size_t last = r->states.ClaimForward(i + 1, we, kMissing, kInFlight);
    size_t first = r->states.ClaimBackward(i, ws, kMissing, kInFlight);
    RequestFromHandler(r, first, last - first, false, &batchRequests_, &t);
    return;
  }
  // The faulting page and forward (recorded in FillRun once the faulting page is in), then back.
  size_t forward = 1 + r->states.RunOf(i + 1, we - i - 1, kMissing);
  FillOrDefer(r, i, forward, kDemand, From::kSource, nullptr, &t);
  const uint64_t now = trace_ ? NowNs() : 0;
  if (trace_) trace_->Record(kTraceDemand, address, readNs, now, traceFilled_, tid);
  size_t back = i;
  while (back > ws && r->states.Get(back - 1) == kMissing) back--;
  if (back < i) {
    traceFilled_ = 0;
    FillOrDefer(r, back, i - back, kAround, From::kSource, nullptr, nullptr);
    if (trace_) trace_->Record(kTraceAround, r->start + back * r->pageSize, now, NowNs(), traceFilled_, tid);
  }
}

void FaultEngine::ZeroRemoved(const std::shared_ptr<ServedRange>& r, size_t i, FaultTiming* timing) {
  // The 'zero' policy. MINOR: zeros into the page cache where it has nothing (MADV_REMOVE punched
  // a hole); where it still has the page (MADV_DONTNEED only unmapped it), that page is mapped again.
  FillOrDefer(r, i, 1, kDemand, From::kZeros, nullptr, timing);
}

void FaultEngine::RequestFromHandler(const std::shared_ptr<ServedRange>& r, size_t page, size_t count,
                                     bool prefetch, std::vector<HandlerRequest>* out,
                                     const FaultTiming* timing) {
  HandlerRequest q;
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    q.id = nextRequest_++;
    Pending p{r, page, count, prefetch, FaultTiming{}, NowNs(), 0, 0};
    if (timing != nullptr) p.timing = *timing;
    requests_[q.id] = p;
  }
  if (timing != nullptr) q.fault = AlignDown(timing->address, r->pageSize);
  q.handlerId = r->source->handlerId();
  q.rangeId = r->id;
  q.address = r->start + page * r->pageSize;
  q.offset = r->sourceOffset + page * r->pageSize;
  q.length = count * r->pageSize;
  q.prefetch = prefetch;
  stats_.requests.fetch_add(1, std::memory_order_relaxed);
  out->push_back(q);
}

void FaultEngine::WaitOnRequest(ServedRange* r, size_t page, uint64_t readNs) {
  std::lock_guard<std::mutex> lock(requestMu_);
  for (auto& [id, p] : requests_) {
    if (p.range.get() != r || page < p.page || page >= p.page + p.count) continue;
    p.timing.waiters++;
    p.timing.waitersReadNs += readNs;
    return;
  }
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

void FaultEngine::Resolve(uint64_t requestId, SourceErrorAction action) {
  {
    std::lock_guard<std::mutex> lock(requestMu_);
    completions_.push_back(Completion{requestId, {}, false, true, action});
  }
  completionsPending_.store(true);
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
    if (FillRun(r, i, run, kPrefetch, From::kBytes, bytes, &demandScratch_, &filled) == kDeferredOp) {
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
    ServedRange* r = p.range.get();
    const uint64_t ps = r->pageSize;
    if (c.resolve && !p.prefetch && c.action != SourceErrorAction::kRetry) {
      // onSourceError for the faulting page; the rest of the window goes back to missing, and
      // whoever waits there is woken to fault again (and meet the policy on its own page).
      size_t fp = p.timing.address != 0 ? (AlignDown(p.timing.address, ps) - r->start) / ps : p.page;
      if (fp < p.page || fp >= p.page + p.count) fp = p.page;
      for (size_t i = p.page; i < p.page + p.count; i++)
        if (i != fp) r->states.Transition(i, kInFlight, kMissing);
      if (fp > p.page) WakePages(uffd_, r->start + p.page * ps, (fp - p.page) * ps);
      if (fp + 1 < p.page + p.count)
        WakePages(uffd_, r->start + (fp + 1) * ps, (p.page + p.count - fp - 1) * ps);
      p.timing.sourceNs += NowNs() - p.requestNs;
      r->metrics->sourceErrors.fetch_add(1, std::memory_order_relaxed);
      stats_.sourceErrors.fetch_add(1, std::memory_order_relaxed);
      if (c.action == SourceErrorAction::kPoison)
        Poison(p.range, fp, &p.timing);
      else
        FillOrDefer(p.range, fp, 1, kDemand, From::kZeros, nullptr, &p.timing);
      continue;
    }
    if (!c.ok || c.resolve) {
      // Back to missing; threads waiting on those pages fault again (else nothing would wake them).
      for (size_t i = p.page; i < p.page + p.count; i++) r->states.Transition(i, kInFlight, kMissing);
      WakePages(uffd_, r->start + p.page * ps, p.count * ps);
      if (p.prefetch) r->prefetchFailed.store(true);
      continue;
    }
    c.bytes.resize(p.count * ps, 0);
    auto bytes = std::make_shared<std::vector<uint8_t>>(std::move(c.bytes));
    if (!p.prefetch) p.timing.sourceNs += NowNs() - p.requestNs;
    // For the trace, before the fill records (and clears) the fault's timing.
    const uint64_t t0 = trace_ ? NowNs() : 0, faultAddress = p.timing.address, faultNs = p.timing.readNs;
    const uint32_t faultTid = p.timing.tid;
    traceFilled_ = 0;
    FillOrDefer(p.range, p.page, p.count, kCompletion, From::kBytes, bytes, p.prefetch ? nullptr : &p.timing);
    if (trace_) {
      // A demand request's record spans the fault's whole wait: read, handler, copy.
      if (p.prefetch)
        trace_->Record(kTracePrefetch, p.range->start + p.page * p.range->pageSize, t0, NowNs(), traceFilled_,
                       0);
      else
        trace_->Record(kTraceDemand, faultAddress, faultNs, NowNs(), traceFilled_, faultTid);
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
    r->metrics->Count(kClassRemoved, pb - pa);
    // MINOR: a hole may have been punched (MADV_REMOVE): those pages are filled again if need be
    // (the writer's EEXIST says where the page cache still has them).
    if (r->minor()) r->cache->Forget(r->cacheFirst + pa, pb - pa);
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
                                                 r->faultAround, r->zeros, r->faultAroundMax, r->delegate);
      moved->cache = r->cache;
      moved->cacheFirst = r->cacheFirst + pa;
      moved->onSourceError = r->onSourceError;
      moved->metrics = r->metrics;
      size_t settled = 0;
      for (size_t k = 0; k < n; k++) {
        uint8_t s = r->states.Get(pa + k);
        // the handler's bytes (or a retry) would land at the old address
        if (s == kInFlight || s == kFailing) s = kMissing;
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
      if (!r->prefetch || r->delegate || r->dropped.load() || r->prefetchFailed.load()) continue;
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
      FillStatus s = FillRun(r, i, n, kPrefetch, From::kSource, nullptr, &scratch, &done);
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

void FaultEngine::SourceError(const FillResult& f, const std::string& detail, uint64_t address,
                              const char* action, uint32_t retryInMs) {
  stats_.errors.fetch_add(1, std::memory_order_relaxed);
  Notice n;
  n.kind = Notice::kError;
  n.err = f.err;
  n.syscall = f.syscall;
  n.detail = detail;
  n.address = address;
  n.action = action;
  n.retryInMs = retryInMs;
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
