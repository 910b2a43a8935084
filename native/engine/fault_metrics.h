// What the fault engine measures per served range: the time faulting threads spent blocked
// (QEMU's postcopy blocktime), latency histograms per stage of serving a fault, and pages by
// class. Each fault is timed in one FaultTiming, filled in place as it is served and recorded
// once (FaultEngine::Record): a trace of every fault (address, kind, thread, wait) takes the
// same record from that one place, at the cost of a copy into a ring.
#pragma once
#include <stdint.h>

#include <atomic>

#include "engine/latency_histogram.h"

// The stages of serving one fault, in order.
enum FaultStage : uint8_t {
  kStageRead,    // from the read(2) that returned the message to the start of its handling
  kStageSource,  // getting the bytes: pread, a JS handler's round trip, filling the page cache (MINOR)
  kStageFill,   // the fill ioctl on the faulting uffd (COPY, ZEROPAGE, CONTINUE, POISON; it wakes the thread)
  kStageWake,   // an explicit UFFDIO_WAKE (a page someone else filled)
  kStageTotal,  // read to resolved: how long the thread was blocked, as far as the engine sees
  kStages,
};

// Pages by class: why a page was put in place and with what. Disjoint: each page counts once.
enum PageClass : uint8_t {
  kClassDemand,    // the faulting page, with source bytes
  kClassAround,    // fault-around pages, with source bytes
  kClassPrefetch,  // background pages (prefetch, a handler's prefetch answer), with source bytes
  kClassZero,      // zeros (a zero source, past the source's end, onRemove 'zero', onSourceError 'zero')
  kClassRemoved,   // pages taken away by MADV_DONTNEED/MADV_REMOVE (EVENT_REMOVE)
  kClassPoisoned,  // poisoned (onSourceError 'poison'): a touch raises SIGBUS
  kClasses,
};

// One fault as it is served (ns on CLOCK_MONOTONIC; stage fields are durations).
struct FaultTiming {
  uint64_t address = 0;
  uint32_t tid = 0;      // with UFFD_FEATURE_THREAD_ID, else 0
  bool minor = false;    // a MINOR fault (else MISSING)
  uint64_t readNs = 0;   // when the read(2) that returned it started
  uint64_t startNs = 0;  // when its handling started
  uint64_t sourceNs = 0;
  uint64_t fillNs = 0;
  uint64_t wakeNs = 0;
  // Other faults that waited on the same page (a handler's answer, a retry): their count and
  // the sum of their read times, for the blocked time.
  uint32_t waiters = 0;
  uint64_t waitersReadNs = 0;
};

struct RangeMetrics {
  std::atomic<uint64_t> faults{0};        // fault messages in the range (one per blocked thread)
  std::atomic<uint64_t> blockedNs{0};     // their blocked time, read to resolved
  std::atomic<uint64_t> cachedPages{0};   // MINOR: pages this range put into the page cache
  std::atomic<uint64_t> sourceErrors{0};  // fills that failed for the source's sake
  std::atomic<uint64_t> pages[kClasses] = {};
  LatencyHistogram stages[kStages];

  void Count(PageClass c, uint64_t n) { pages[c].fetch_add(n, std::memory_order_relaxed); }
};
