// A workload over a range of memory on native threads, for `userfaultfd migrate` (the demo and
// its send/receive halves), its tests and its benchmark: writers dirtying random pages at a set
// rate (the source's workload, and the target's once it resumed) and readers touching random
// pages as fast as they can. Every access is timed (an access over 2 us counts as a fault). A
// SIGBUS in a workload thread (a page poisoned because the source was lost) is caught: the
// thread records it and stops, where it would otherwise kill the process.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "engine/latency_histogram.h"
#include "engine/util.h"

struct WorkloadOptions {
  uint64_t writeRate = 0;    // bytes of pages dirtied per second by all writers (0: flat out)
  uint64_t writeOffset = 0;  // where in each page the u64 stamp goes
  uint64_t tag = 1;          // stamps are tag << 40 | thread << 32 | count
  uint64_t seed = 1;
  int writers = 0;
  int readers = 0;
};

class Workload {
 public:
  Workload(uint64_t base, uint64_t length, uint64_t pageSize, const WorkloadOptions& options);
  ~Workload();

  // Parks the writers; true once all are parked (readers go on).
  bool Pause(int timeoutMs);
  void Resume();
  // Ends the threads. Returns how many did not end in time (blocked in a fault nobody resolves):
  // those are left behind, detached, holding their own reference to the shared state.
  int Stop(int timeoutMs);

  struct State;
  const State& state() const { return *state_; }
  uint64_t writes() const;
  uint64_t reads() const;
  uint64_t sigbus() const;
  uint64_t sigbusAddress() const;
  int running() const;
  const LatencyHistogram& faults() const;
  uint64_t pages() const;
  uint64_t stamp(uint64_t page) const;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::thread> threads_;
};
