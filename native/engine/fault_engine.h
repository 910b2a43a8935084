// FaultEngine: the native fault server. Its own threads resolve faults with no JS per fault:
//  - the demand thread reads the uffd (batched reads, adaptive spin before sleeping in poll),
//    serves each fault with fault-around, applies REMOVE/UNMAP/REMAP/FORK events in order,
//    retries ops that met EAGAIN (an event pending) only after reading the events, and copies
//    the bytes JS handlers hand back;
//  - the prefetch thread fills ranges in the background in chunks, claiming pages first so
//    that the demand thread never waits for it: a fault on a page being prefetched is copied
//    (or woken) at once by the demand thread (QEMU's "urgent channel" in one process).
// Everything JS must hear (errors, progress, handler requests, fork fds) goes through a queue
// of notices and one wake-up callback (a threadsafe function in native/binding/fault_engine.cc).
//
// Each range has its own page size (the base page, or a hugetlb page: 2 MiB, 1 GiB): its claim
// table, fault-around window, prefetch chunks and handler requests are in whole pages of that
// size, since the kernel fills hugetlb memory only in whole huge pages. Zeros on hugetlb are
// copied (no ZEROPAGE there).
//
// A range is served in MISSING mode (UFFDIO_COPY into it) or MINOR mode (shared file memory:
// the bytes go into the file's page cache through the engine's own mapping of it, PageCache,
// then UFFDIO_CONTINUE maps them; pages already cached need only the CONTINUE). Every fill goes
// through FillRun, whatever the mode, the source or the thread, and every fill that fails for
// good through FillFailed, where the range's onSourceError applies (retry, poison, zero).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/fault_around.h"
#include "engine/fault_metrics.h"
#include "engine/fault_sources.h"
#include "engine/fault_trace.h"
#include "engine/latency_histogram.h"
#include "engine/page_cache.h"
#include "engine/page_states.h"
#include "engine/util.h"

// What to do with pages of a served range after MADV_DONTNEED/MADV_REMOVE (UFFD_EVENT_REMOVE).
enum class RemovePolicy {
  kZero,        // serve zeros there (a balloon freed them)
  kSource,      // serve the source again (and prefetch it again)
  kUnregister,  // unregister them: later faults are the kernel's own (zeros), never ours
};
// What to do with the child's uffd of a UFFD_EVENT_FORK.
enum class ForkPolicy { kClose, kEmit };

// What to do where a source cannot give a page a thread waits on (onSourceError).
enum class SourceErrorAction {
  kRetry,   // again later, with backoff; past the deadline (if any), `then`
  kPoison,  // UFFDIO_POISON: the thread gets SIGBUS (Linux 6.6+)
  kZero,    // zeros
};
struct SourceErrorPolicy {
  SourceErrorAction action = SourceErrorAction::kRetry;
  uint32_t deadlineMs = 0;  // retry: 0 = for ever
  SourceErrorAction then = SourceErrorAction::kPoison;
  uint32_t backoffMs = 10;  // retry: first delay, doubling up to maxBackoffMs
  uint32_t maxBackoffMs = 1000;
};

// Named as the JS options are (FaultServerOptions), units included.
struct EngineOptions {
  uint64_t faultAround = 0;  // bytes, power of two (a range's window is at least one page); 0: adaptive
  uint64_t faultAroundMax = 2 << 20;    // the adaptive window's largest size, bytes
  uint64_t prefetchChunk = 256 * 1024;  // bytes per background copy (at least one page)
  uint32_t spinUs = 0;                  // upper bound of the adaptive spin (0: never spin)
  uint32_t readSize = 64;               // messages per read(2)
  uint32_t progressIntervalMs = 100;    // minimum interval between progress notices
  RemovePolicy onRemove = RemovePolicy::kZero;
  ForkPolicy onFork = ForkPolicy::kClose;
  bool backgroundIdle = true;       // backgroundPriority 'idle': the prefetch thread under SCHED_IDLE
  uint32_t handlerConcurrency = 4;  // prefetch requests in flight per handler range
  uint32_t prefetchYieldUs = 1000;  // prefetch pauses while demand faults came this recently
  uint64_t hugePageSize = 2 << 20;  // zeros for faults outside every range, where ZEROPAGE is EINVAL
  bool startPaused = false;         // read nothing from the uffd until Resume()
  uint32_t traceCapacity = 0;       // FaultServer { trace }: records buffered between drains (0: off)
};

// A range whose faults something else serves: a page source whose bytes arrive later, from
// another thread (the migration target: pages fetched from the peer over the network, installed
// by the receiving thread as they arrive, so that a demand fault never queues behind the
// background push). The engine still reads the uffd, batches, spins and handles events; it hands
// each MISSING or MINOR fault of the range to OnFault and does nothing else for it.
class FaultDelegate {
 public:
  virtual ~FaultDelegate() = default;
  // Demand thread; must not block. `address` is the faulting address (not aligned), `flags` the
  // message's UFFD_PAGEFAULT_FLAG_* bits.
  virtual void OnFault(uint64_t address, uint64_t flags) = 0;
};

// A fault-engine page's state in a range's claim table.
enum FaultPage : uint8_t {
  kMissing = 0,   // not known to be present: prefetch and fault-around fill it
  kPresent = 1,   // copied (by us or someone else: EEXIST)
  kRemoved = 2,   // MADV_DONTNEED/REMOVE with the 'zero' policy: served as zeros on demand
  kGone = 3,      // unmapped, moved away by mremap, or unregistered: never served again
  kInFlight = 4,  // claimed: requested from a JS handler, or being copied by the prefetch thread
  kFailing = 5,   // its source failed while a thread waits on it: a retry is scheduled (onSourceError)
  kPoisoned = 6,  // poisoned (onSourceError 'poison'): touching it raises SIGBUS
};

// A state counts as settled when nothing more is to be done for drained(). The table only steers
// work (what fault-around and prefetch skip, when drained() resolves); a fault is always served
// whatever it says, because a page can vanish behind it (MADV_DONTNEED racing a copy), and EEXIST
// from the kernel is the final word on "already present".
inline bool IsSettled(uint8_t s) {
  return s == kPresent || s == kRemoved || s == kGone || s == kPoisoned;
}

struct ServedRange {
  ServedRange(uint32_t id_, uint64_t start_, uint64_t length_, uint64_t pageSize_,
              std::shared_ptr<Source> src, uint64_t sourceOffset_, bool prefetch_, uint64_t faultAround_,
              std::shared_ptr<ZeroRegion> zeros_, uint64_t faultAroundMax_ = 2 << 20,
              std::shared_ptr<FaultDelegate> delegate_ = nullptr)
      : id(id_),
        start(start_),
        length(length_),
        pageSize(pageSize_),
        pages(length_ / pageSize_),
        source(std::move(src)),
        sourceOffset(sourceOffset_),
        prefetch(prefetch_),
        faultAround(faultAround_),
        zeros(std::move(zeros_)),
        faultAroundMax(faultAroundMax_),
        around(std::max<uint64_t>(faultAroundMax_ / pageSize_, 1)),
        delegate(std::move(delegate_)),
        states(pages, kMissing) {}
  const uint32_t id;
  const uint64_t start;
  const uint64_t length;
  const uint64_t pageSize;  // the memory's page size: the base page, or a hugetlb page
  const size_t pages;       // of pageSize
  const std::shared_ptr<Source> source;
  const uint64_t sourceOffset;
  const bool prefetch;
  const uint64_t faultAround;                     // bytes (an aligned window), or 0: adaptive (`around`)
  const std::shared_ptr<ZeroRegion> zeros;        // hugetlb (no ZEROPAGE there): zeros to copy
  const uint64_t faultAroundMax;                  // bytes: the adaptive window's largest size
  FaultAroundPolicy around;                       // in pages of pageSize; demand thread only
  const std::shared_ptr<FaultDelegate> delegate;  // serves this range's faults (then no prefetch)
  PageStates states;
  std::atomic<size_t> settled{0};
  std::atomic<bool> dropped{false};
  std::atomic<size_t> cursor{0};            // where prefetch continues (follows demand faults)
  std::atomic<uint32_t> inflight{0};        // handler prefetch requests outstanding
  std::atomic<bool> prefetchFailed{false};  // a prefetch fill failed: stop prefetching it
  std::atomic<uint32_t> fills{0};           // fills under way (RemoveRange waits for them)
  // Set before AddRange, then constant. MINOR mode: the file's page cache, and the page of it
  // (from its writer's start) where this range starts; null: MISSING mode.
  std::shared_ptr<PageCache> cache;
  size_t cacheFirst = 0;
  SourceErrorPolicy onSourceError;
  // Shared by the parts of a range that mremap split (they keep the range's id).
  std::shared_ptr<RangeMetrics> metrics = std::make_shared<RangeMetrics>();
  uint64_t end() const { return start + length; }
  bool minor() const { return cache != nullptr; }
  Filler filler(int uffd) const { return Filler{uffd, pageSize, zeros.get()}; }
};

struct HandlerRequest {
  uint64_t id;
  uint32_t handlerId;
  uint32_t rangeId;
  uint64_t address;
  uint64_t offset;  // in the source (the range's offset + position)
  uint64_t length;
  bool prefetch;
  uint64_t fault = 0;  // the faulting page's address (demand requests)
};

struct Notice {
  enum Kind { kError, kProgress, kFork, kRequests, kPrefetched } kind = kError;
  int err = 0;
  std::string syscall;
  std::string detail;
  uint64_t address = 0;
  int fd = -1;
  std::vector<HandlerRequest> requests;
  // A fill's failure (kError): what was done about it ("retry", "poison", "zero"; "none": no
  // thread waits on the page), and for "retry" when; empty for other errors.
  std::string action;
  uint32_t retryInMs = 0;
  uint64_t id = 0;  // kPrefetched: which native prefetch (nbd_prefetch.h) has ended
};

// Named as FaultServerStats. Page counts are in each range's own pages (a 2 MiB page counts one).
struct EngineStats {
  std::atomic<uint64_t> faults{0}, demandPages{0}, aroundPages{0}, prefetchPages{0}, handlerPages{0},
      zeroPages{0}, bytes{0}, exists{0}, deferred{0}, retries{0}, unhandled{0}, wakes{0}, reads{0}, sleeps{0},
      spinHits{0}, removes{0}, unmaps{0}, remaps{0}, forks{0}, requests{0}, errors{0}, prefetchPauses{0},
      poisonedPages{0}, cachedPages{0}, sourceErrors{0}, blockedNs{0};
  LatencyHistogram stages[kStages];  // every range's, including ranges no longer served
};

// Pages (and bytes) settled out of every served range's.
struct Settlement {
  uint64_t pages = 0, totalPages = 0, bytes = 0, totalBytes = 0;
};

class FaultEngine {
 public:
  FaultEngine(const EngineOptions& options, std::function<void()> wakeJs);
  ~FaultEngine();

  // Dups `uffd` and starts the threads. Returns 0 or an errno (with *syscall set).
  int Start(int uffd, std::string* syscall);
  // Stops and joins the threads; idempotent. Faults still pending stay with the kernel (they
  // are woken when the last reference to the uffd goes).
  void Stop();
  bool running() const { return started_ && !stopping_.load(); }
  // Starts reading the uffd (an engine created with startPaused): for a uffd whose ranges are
  // registered already, so that no fault is read before the ranges serving it are added.
  void Resume();
  // Readable while { handler } requests wait for the JS thread (for the deadlock watchdog).
  int requestFd() const { return requestFd_; }

  // JS thread. AddRange fails with EEXIST when the range overlaps one being served.
  int AddRange(std::shared_ptr<ServedRange> range);
  // Stops serving every range inside [start, end); returns how many. When it returns, no fill
  // uses those ranges' sources any more (memory the caller owns may go).
  int RemoveRange(uint64_t start, uint64_t end);
  // Bytes for a handler request (ok = false: the handler failed; its pages are retried on the
  // next fault).
  void Complete(uint64_t requestId, std::vector<uint8_t> bytes, bool ok);
  // Bytes that JS fetched in the background (remote sources, working-set replay): the source's
  // bytes at [sourceOffset, sourceOffset + size) for range `rangeId` (every part of it, after
  // mremap), installed by the demand thread between demand work where whole pages are still
  // missing. `data` stays valid while `hold` lives: the engine drops `hold` once it is done with
  // them (no copy of megabytes on the JS thread). Returns the bytes now queued (JS paces itself).
  uint64_t Provide(uint32_t rangeId, uint64_t sourceOffset, const uint8_t* data, uint64_t size,
                   std::shared_ptr<void> hold);
  // Drops what Provide() queued and nothing installed (after Stop()).
  void DropProvided();
  uint64_t providedQueued() const { return providedBytes_.load(std::memory_order_relaxed); }
  // Working-set record: while on, every demand fault's (range id, source offset of its base page)
  // is kept in arrival order (with one-page fault-around and no prefetch: the first-touch order).
  void RecordTouches(bool on) { recording_.store(on); }
  std::vector<std::pair<uint32_t, uint64_t>> TakeTouches();
  // A demand request its handler could not answer, resolved by the range's policy: the faulting
  // page poisoned or zeroed (kRetry: as Complete(id, {}, false)).
  void Resolve(uint64_t requestId, SourceErrorAction action);
  // Calls f(range) for every range served (the parts of a range mremap split share its metrics).
  template <typename F>
  void ForEachRange(F f) {
    std::lock_guard<std::mutex> lock(tableMu_);
    for (auto& r : table_) f(*r);
  }
  std::deque<Notice> TakeNotices();
  // Queues a notice for JS (any thread): the engine's own, and its helpers' (NbdPrefetch's end).
  void Notify(Notice notice);
  // Queues a notice for JS (any thread): the engine's own, and its helpers' (NbdPrefetch's end).
  Settlement Settled();
  // Zeros to copy into hugetlb ranges of `pageSize` (shared by every range of that size).
  std::shared_ptr<ZeroRegion> ZerosFor(uint64_t pageSize, int* err);
  const EngineStats& stats() const { return stats_; }
  const LatencyHistogram& latency() const { return stats_.stages[kStageTotal]; }
  // Null unless options.traceCapacity > 0.
  FaultTrace* trace() const { return trace_.get(); }
  uint32_t spinBudgetNs() const { return spinBudgetNs_.load(std::memory_order_relaxed); }

 private:
  // Why a fill runs: for a fault (its page first, then forward), around a fault (backward), in
  // the background, or with a handler's bytes.
  enum Origin { kDemand, kAround, kPrefetch, kCompletion };
  // What a fill puts in place.
  enum class From {
    kSource,  // the range's source
    kBytes,   // bytes a JS handler handed back
    kZeros,   // zeros (a removed page under the 'zero' policy)
  };
  struct Deferred {
    std::shared_ptr<ServedRange> range;  // null: zeros at `address` (a fault outside every range)
    uint64_t address;
    size_t page;
    size_t count;
    Origin origin;
    From from;
    std::shared_ptr<std::vector<uint8_t>> bytes;  // From::kBytes
    FaultTiming timing;                           // the fault waiting on it (address 0: none)
  };
  struct Completion {
    uint64_t id;
    std::vector<uint8_t> bytes;
    bool ok;
    bool resolve = false;  // Resolve(): `action` instead of bytes
    SourceErrorAction action = SourceErrorAction::kRetry;
  };
  struct Provided {
    uint32_t rangeId = 0;
    uint64_t sourceOffset = 0;
    const uint8_t* data = nullptr;
    uint64_t size = 0;
    std::shared_ptr<void> hold;
  };
  struct Pending {
    std::shared_ptr<ServedRange> range;
    size_t page;
    size_t count;
    bool prefetch;
    FaultTiming timing;      // the fault that asked (demand requests)
    uint64_t requestNs = 0;  // when it was asked for
    uint32_t waiters = 0;    // later faults on its pages, and the sum of their read times
    uint64_t waitersReadNs = 0;
  };
  // A page whose source failed while a thread waits on it, to be filled again (onSourceError 'retry').
  struct Failing {
    std::shared_ptr<ServedRange> range;
    size_t page;
    uint64_t firstNs;  // the first failure: the deadline counts from it
    uint64_t dueNs;
    uint32_t backoffMs;
    FaultTiming timing;
  };
  using Table = std::vector<std::shared_ptr<ServedRange>>;

  void DemandLoop();
  void PrefetchLoop();
  void HandleMessages(const void* msgs, size_t count, uint64_t readNs);
  void HandleFault(const std::shared_ptr<ServedRange>& r, uint64_t address, uint64_t readNs, bool minor,
                   uint32_t tid);
  void HandleRemove(uint64_t start, uint64_t end);
  void HandleUnmap(uint64_t start, uint64_t end);
  void HandleRemap(uint64_t from, uint64_t to, uint64_t len);
  void HandleFork(int fd);
  void RetryDeferred();
  void ProcessCompletions();
  // Installs queued Provide() bytes, at most `budget` bytes per call; returns whether any remain.
  bool ProcessProvided(uint64_t budget);
  void InstallProvided(const std::shared_ptr<ServedRange>& r, const Provided& p);
  void RequestFromHandler(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, bool prefetch,
                          std::vector<HandlerRequest>* out, const FaultTiming* timing = nullptr);
  // A fault on a page a handler request is fetching: counted as one of its waiters.
  void WaitOnRequest(ServedRange* r, size_t page, uint64_t readNs);
  void FlushRequests(std::vector<HandlerRequest>* requests);

  // Fills pages [page, page + count) of r, one ioctl per contiguous stretch (MINOR: the page
  // cache first), skipping pages that turn out present (EEXIST). Marks pages present as they
  // are done. *done: pages handled before a deferral (EAGAIN: an event is pending) or a failure.
  // `timing`: the fault waiting on one of the pages (timed and recorded once that page is
  // resolved, then its address is 0); null for fills nobody waits on.
  enum FillStatus { kFilled, kDeferredOp, kFailed };
  FillStatus FillRun(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, Origin origin,
                     From from, const uint8_t* bytes, std::vector<uint8_t>* scratch, size_t* done,
                     FaultTiming* timing = nullptr);
  // One step of a MINOR fill at dst: the source's bytes (or `bytes`, or zeros) into the page
  // cache where it has none, then UFFDIO_CONTINUE.
  FillResult FillMinor(ServedRange* r, uint64_t dst, uint64_t at, uint64_t len, From from,
                       const uint8_t* bytes, std::vector<uint8_t>* scratch);
  // Demand-thread wrapper: a deferral is queued for retry after the pending events are read.
  FillStatus FillOrDefer(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, Origin origin,
                         From from, std::shared_ptr<std::vector<uint8_t>> bytes,
                         FaultTiming* timing = nullptr);
  // A fill of pages [page, page + count) that failed for good at `page` (not EEXIST, EAGAIN or an
  // address space that is gone): the one place where failing sources are handled. Every failure
  // is an error notice with its address and cause; where the fault in `timing` waits on `page`,
  // the range's onSourceError decides (a retry, SIGBUS, zeros).
  void FillFailed(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, const FillResult& f,
                  Origin origin, From from, FaultTiming* timing);
  // onSourceError for the page a fault waits on.
  void ApplySourcePolicy(const std::shared_ptr<ServedRange>& r, size_t page, SourceErrorAction action,
                         const FillResult& f, const std::string& what, FaultTiming* timing, uint64_t firstNs);
  void Poison(const std::shared_ptr<ServedRange>& r, size_t page, FaultTiming* timing);
  // Fills due again after a source failure (demand thread); the poll timeout until the next (-1: none).
  void RetryFailing();
  int FailingTimeoutMs() const;
  // The fault in `timing` resolved: its stages, blocked time and count into r's metrics and the engine's.
  void Record(ServedRange* r, FaultTiming* timing);
  void CountPages(ServedRange* r, size_t first, size_t n, Origin origin, bool zero,
                  const FaultTiming* timing);
  size_t MarkPresent(ServedRange* r, size_t first, size_t count);
  void SetState(ServedRange* r, size_t page, uint8_t to);
  // Zeros for a fault outside every served range (its page size unknown: the base page, else a
  // huge page where ZEROPAGE is EINVAL).
  void ZeroUnserved(uint64_t address);
  // Zeros for a removed page (the 'zero' policy).
  void ZeroRemoved(const std::shared_ptr<ServedRange>& r, size_t page, FaultTiming* timing);
  void Unregister(ServedRange* r, uint64_t start, uint64_t end);
  void KickPrefetch();

  const Table& Snapshot(Table* local, uint64_t* version);
  std::shared_ptr<ServedRange> Lookup(const Table& table, uint64_t address) const;
  void DropGoneRanges();
  bool EraseGoneLocked();
  void Error(int err, const std::string& syscall, const std::string& detail, uint64_t address = 0);
  // A fill's failure, with what was done about it (onSourceError: "retry", "poison", "zero"; "": nothing).
  void SourceError(const FillResult& f, const std::string& detail, uint64_t address, const char* action,
                   uint32_t retryInMs);
  void Progress(bool force);

  EngineOptions options_;
  std::function<void()> wakeJs_;
  int uffd_ = -1;
  int wakeFd_ = -1;     // eventfd: stop, completions, deferred retries
  int requestFd_ = -1;  // eventfd: requests not yet taken by JS
  bool started_ = false;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> paused_{false};
  std::thread demand_;
  std::thread prefetch_;

  std::mutex tableMu_;
  Table table_;
  std::atomic<uint64_t> tableVersion_{1};
  std::map<uint64_t, std::shared_ptr<ZeroRegion>> zeros_;  // by page size (tableMu_)

  // Demand thread only.
  Table demandTable_;
  uint64_t demandVersion_ = 0;
  std::vector<Deferred> deferred_;
  std::vector<Failing> failing_;
  // While RetryFailing refills a page: its first failure and last backoff (FillFailed carries them on).
  struct {
    bool active = false;
    uint64_t firstNs = 0;
    uint32_t backoffMs = 0;
  } retrying_;
  std::vector<uint8_t> demandScratch_;
  std::shared_ptr<ZeroRegion> unservedZeros_;

  // Prefetch thread coordination.
  std::mutex prefetchMu_;
  std::condition_variable prefetchCv_;
  std::atomic<uint64_t> prefetchKick_{0};
  std::atomic<uint32_t> demandBusy_{0};
  std::atomic<uint64_t> lastDemandNs_{0};  // when the demand thread last read a fault

  std::mutex requestMu_;
  std::map<uint64_t, Pending> requests_;
  uint64_t nextRequest_ = 1;
  std::deque<Completion> completions_;
  std::atomic<bool> completionsPending_{false};
  std::deque<Provided> provided_;  // under requestMu_
  std::atomic<uint64_t> providedBytes_{0};
  std::atomic<bool> recording_{false};
  std::mutex touchMu_;
  std::vector<std::pair<uint32_t, uint64_t>> touches_;

  std::mutex noticeMu_;
  std::deque<Notice> notices_;
  std::atomic<bool> jsScheduled_{false};
  std::atomic<uint64_t> lastProgressNs_{0};
  std::atomic<bool> progressQueued_{false};
  std::vector<HandlerRequest> batchRequests_;  // demand thread: flushed after each read
  std::atomic<bool> unhandledReported_{false};

  std::atomic<uint32_t> spinBudgetNs_{0};
  EngineStats stats_;

  // FaultServer { trace } (null: off), and bytes filled since the last record, per thread: the
  // demand thread's and the prefetch thread's.
  std::unique_ptr<FaultTrace> trace_;
  uint64_t traceFilled_ = 0, prefetchFilled_ = 0;
};
