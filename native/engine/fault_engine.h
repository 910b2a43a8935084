// FaultEngine: the native fault server. Its own threads resolve faults with no JS per fault:
//  - the demand thread reads the uffd (batched reads, adaptive spin before sleeping in poll),
//    serves each fault with fault-around, applies REMOVE/UNMAP/REMAP/FORK events in order,
//    retries ops that met EAGAIN (an event pending) only after reading the events, and copies
//    the bytes JS handlers hand back;
//  - the prefetch thread fills ranges in the background in chunks, claiming pages first so
//    that the demand thread never waits for it: a fault on a page being prefetched is copied
//    (or woken) at once by the demand thread (QEMU's "urgent channel" in one process).
// Everything JS must hear (errors, progress, handler requests, fork fds) goes through a queue
// of notices and one wake-up callback (a threadsafe function in fault_server.cc).
#pragma once
#include <stddef.h>
#include <stdint.h>

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
#include "engine/fault_sources.h"
#include "engine/latency_histogram.h"
#include "engine/page_states.h"

struct EngineOptions {
  uint64_t faultAround = 0;                   // bytes, power of two >= page; 0: adaptive
  uint64_t faultAroundMax = 2 * 1024 * 1024;  // the adaptive window's largest size, bytes
  uint64_t prefetchChunk = 256 * 1024;        // bytes, multiple of the page
  uint32_t spinUs = 0;                        // upper bound of the adaptive spin (0: never spin)
  uint32_t batch = 64;                        // messages per read(2)
  uint32_t progressMs = 100;                  // minimum interval between progress notices
  bool removeToZero = true;                   // REMOVE: serve zeros (else re-serve the source)
  bool forkEmit = false;                      // FORK: hand the child's uffd to JS (else close it)
  bool prefetchIdle = true;                   // prefetch thread under SCHED_IDLE
  uint32_t handlerConcurrency = 4;            // prefetch requests in flight per handler range
  uint32_t prefetchYieldUs = 1000;            // prefetch pauses while demand faults came this recently
  bool startPaused = false;                   // read nothing from the uffd until Resume()
};

struct ServedRange {
  ServedRange(uint32_t id_, uint64_t start_, uint64_t length_, std::shared_ptr<Source> src,
              uint64_t sourceOffset_, bool prefetch_, uint64_t faultAround_,
              uint64_t faultAroundMax_ = 2 << 20)
      : id(id_),
        start(start_),
        length(length_),
        pages(length_ / 4096),
        source(std::move(src)),
        sourceOffset(sourceOffset_),
        prefetch(prefetch_),
        faultAround(faultAround_),
        around(faultAroundMax_ / 4096),
        states(pages) {}
  const uint32_t id;
  const uint64_t start;
  const uint64_t length;
  const size_t pages;
  const std::shared_ptr<Source> source;
  const uint64_t sourceOffset;
  const bool prefetch;
  const uint64_t faultAround;  // bytes (aligned window), or 0: adaptive (`around`)
  FaultAroundPolicy around;    // demand thread only
  PageStates states;
  std::atomic<size_t> settled{0};
  std::atomic<bool> dropped{false};
  std::atomic<size_t> cursor{0};            // where prefetch continues (follows demand faults)
  std::atomic<uint32_t> inflight{0};        // handler prefetch requests outstanding
  std::atomic<bool> prefetchFailed{false};  // a prefetch fill failed: stop prefetching it
  uint64_t end() const { return start + length; }
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
  enum Kind { kError, kProgress, kFork, kRequests } kind = kError;
  int err = 0;
  std::string syscall;
  std::string detail;
  uint64_t address = 0;
  int fd = -1;
  std::vector<HandlerRequest> requests;
};

struct EngineStats {
  std::atomic<uint64_t> faults{0}, demandPages{0}, aroundPages{0}, prefetchPages{0}, handlerPages{0},
      zeroPages{0}, bytes{0}, eexist{0}, deferred{0}, retries{0}, unhandled{0}, wakes{0}, reads{0}, sleeps{0},
      spinHits{0}, removes{0}, unmaps{0}, remaps{0}, forks{0}, requests{0}, errors{0}, prefetchPauses{0};
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
  // Stops serving every range inside [start, end); returns how many.
  int RemoveRange(uint64_t start, uint64_t end);
  // Bytes for a handler request (ok = false: the handler failed; its pages are retried on the
  // next fault).
  void Complete(uint64_t requestId, std::vector<uint8_t> bytes, bool ok);
  // Bytes that JS fetched in the background (remote sources, working-set replay): the source's
  // bytes at [sourceOffset, sourceOffset + size) for range `rangeId` (every part of it, after
  // mremap), installed by the demand thread between demand work where pages are still missing.
  // `data` stays valid while `hold` lives: the engine drops `hold` once it is done with them
  // (no copy of megabytes on the JS thread). Returns the bytes now queued (JS paces itself).
  uint64_t Provide(uint32_t rangeId, uint64_t sourceOffset, const uint8_t* data, uint64_t size,
                   std::shared_ptr<void> hold);
  // Drops what Provide() queued and nothing installed (after Stop()).
  void DropProvided();
  uint64_t providedQueued() const { return providedBytes_.load(std::memory_order_relaxed); }
  // Working-set record: while on, every demand fault's (range id, source offset) is kept in
  // arrival order (with 4 KiB fault-around and no prefetch, that is the first-touch order).
  void RecordTouches(bool on) { recording_.store(on); }
  std::vector<std::pair<uint32_t, uint64_t>> TakeTouches();
  std::deque<Notice> TakeNotices();
  void SettledTotal(uint64_t* settled, uint64_t* total);
  const EngineStats& stats() const { return stats_; }
  const LatencyHistogram& latency() const { return latency_; }
  uint32_t spinBudgetNs() const { return spinBudgetNs_.load(std::memory_order_relaxed); }

 private:
  enum Origin { kDemand, kAround, kPrefetch, kCompletion };
  struct Deferred {
    std::shared_ptr<ServedRange> range;  // null: a zero page at `address` (unhandled fault)
    uint64_t address;
    size_t page;
    size_t count;
    Origin origin;
    std::shared_ptr<std::vector<uint8_t>> bytes;  // handler completion bytes (else: the source)
  };
  struct Completion {
    uint64_t id;
    std::vector<uint8_t> bytes;
    bool ok;
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
  };
  using Table = std::vector<std::shared_ptr<ServedRange>>;

  void DemandLoop();
  void PrefetchLoop();
  bool WaitReadable();
  void HandleMessages(const void* msgs, size_t count, uint64_t readNs);
  void HandleFault(uint64_t address, uint64_t readNs);
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
                          std::vector<HandlerRequest>* out);
  void FlushRequests(std::vector<HandlerRequest>* requests);

  // Fills pages [page, page + count) of r, one ioctl per contiguous stretch, skipping pages
  // that turn out present (EEXIST). Marks pages present as they are done. *done: pages handled
  // before a deferral (EAGAIN: an event is pending) or a failure.
  enum FillStatus { kFilled, kDeferredOp, kFailed };
  FillStatus FillRun(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, Origin origin,
                     const uint8_t* bytes, std::vector<uint8_t>* scratch, bool* firstExisted, size_t* done);
  // Demand-thread wrapper: a deferral is queued for retry after the pending events are read.
  void FillOrDefer(const std::shared_ptr<ServedRange>& r, size_t page, size_t count, Origin origin,
                   std::shared_ptr<std::vector<uint8_t>> bytes, bool* firstExisted);
  size_t MarkPresent(ServedRange* r, size_t first, size_t count);
  void SetState(ServedRange* r, size_t page, uint8_t to);
  void ZeroFault(uint64_t page);
  void KickPrefetch();

  const Table& Snapshot(Table* local, uint64_t* version);
  std::shared_ptr<ServedRange> Lookup(const Table& table, uint64_t address) const;
  void DropGoneRanges();
  bool EraseGoneLocked();
  void Error(int err, const std::string& syscall, const std::string& detail, uint64_t address = 0);
  void Notify(Notice notice);
  void Progress(bool force);
  void CheckDrained();

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
  std::atomic<uint64_t> total_{0};
  std::atomic<uint64_t> settled_{0};

  // Demand thread only.
  Table demandTable_;
  uint64_t demandVersion_ = 0;
  std::vector<Deferred> deferred_;
  std::vector<uint8_t> demandScratch_;

  // Prefetch thread coordination.
  std::mutex prefetchMu_;
  std::condition_variable prefetchCv_;
  std::atomic<uint64_t> prefetchKick_{0};
  std::atomic<uint32_t> demandBusy_{0};
  std::atomic<uint64_t> lastDemandNs_{0};  // when the demand thread last read a fault
  std::atomic<uint64_t> eventsRead_{0};

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
  LatencyHistogram latency_;
};

uint64_t EngineNowNs();
