// FaultTrace: a bounded buffer of fixed-size records of what the fault engine put in place (a
// fault served from its source or as zeros, pages filled around a fault or in the background),
// drained by JS (FaultServer { trace }) into a Chrome trace-event file. Written by the engine's
// two threads under a mutex (uncontended but for the drain, which only swaps vectors); when JS
// drains too slowly, records beyond the capacity are counted as dropped, never blocking a fault.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <mutex>
#include <vector>

// The layout JS reads (src/engines/fault-trace.ts): 40 bytes, little-endian, no padding inside.
struct FaultTraceRecord {
  uint64_t address;  // the faulting address (demand, zero), or the first byte filled (around, prefetch)
  uint64_t startNs;  // CLOCK_MONOTONIC: when the fault was read (demand, zero), or the fill began
  uint64_t durNs;    // the wait: read to resolved (demand, zero), or the fill's duration
  uint64_t bytes;    // bytes put in place (0: already present, filled by someone else)
  uint32_t tid;      // the faulting thread (the uffd_msg's ptid: 0 without UFFD_FEATURE_THREAD_ID)
  uint8_t kind;      // FaultTraceKind
  uint8_t pad[3];
};
static_assert(sizeof(FaultTraceRecord) == 40, "FaultTraceRecord is read by JS as 40 bytes");

// Named as in the trace file's `kind`.
enum FaultTraceKind : uint8_t {
  kTraceDemand = 0,    // a fault served from its source (the page, and the window after it)
  kTraceAround = 1,    // pages before the faulting one, filled after it was woken (fault-around)
  kTracePrefetch = 2,  // a background chunk (or a { handler } prefetch request's bytes)
  kTraceZero = 3,      // a fault served as zeros (a removed page, or outside every range)
};

class FaultTrace {
 public:
  explicit FaultTrace(size_t capacity) : capacity_(capacity) {}

  void Record(uint8_t kind, uint64_t address, uint64_t startNs, uint64_t endNs, uint64_t bytes,
              uint32_t tid) {
    FaultTraceRecord r = {address, startNs,  endNs > startNs ? endNs - startNs : 0, bytes, tid,
                          kind,    {0, 0, 0}};
    std::lock_guard<std::mutex> lock(mu_);
    if (records_.size() >= capacity_) {
      dropped_++;
      return;
    }
    records_.push_back(r);
  }

  // Takes every record so far (and how many were dropped since the last drain).
  std::vector<FaultTraceRecord> Drain(uint64_t* dropped) {
    std::vector<FaultTraceRecord> out;
    std::lock_guard<std::mutex> lock(mu_);
    out.swap(records_);
    *dropped = dropped_;
    dropped_ = 0;
    return out;
  }

 private:
  const size_t capacity_;
  std::mutex mu_;
  std::vector<FaultTraceRecord> records_;
  uint64_t dropped_ = 0;
};
