// Adaptive spinning of the demand thread: spin on the uffd before sleeping only while spins
// hit (a message arrives during the spin). A hit saves the faulting thread a wake-up of the
// demand thread, ~40-57 us when it runs on another CPU; when it shares the demand thread's CPU,
// a spin only keeps it off that CPU, and spins miss. The policy keeps a moving average of hits
// (1/16 weight per spin) and spins the full budget while at least a tenth of spins hit, none
// otherwise, probing with half the budget every 1024 sleeps to notice when that changes. (Two
// faulting threads on the other CPU hit ~37% of spins, and spinning still pays there; on the
// engine's CPU spins never hit, and a probe costs the faulting thread 1/1024 of its length.) (A
// budget halved on every miss, the previous policy, gave up on the cross-CPU placement after a
// few slow round trips: 0.63x of a C handler spinning a fixed 50 us.)
#pragma once

#include <stdint.h>

class SpinPolicy {
 public:
  explicit SpinPolicy(uint64_t maxNs) : maxNs_(maxNs) {}

  /** The spin budget (ns) of the idle period starting now. */
  uint64_t Begin() {
    if (maxNs_ == 0) return 0;
    if (score_ >= kOn) return maxNs_;
    if (++sleepsSinceProbe_ < kProbeEvery) return 0;
    sleepsSinceProbe_ = 0;
    return maxNs_ / 2;
  }
  /** A message came while spinning. */
  void Hit() { score_ += (kOne - score_) >> 4; }
  /** The spin ended without a message (the thread goes to sleep). */
  void Miss() { score_ -= score_ >> 4; }

 private:
  static constexpr uint32_t kOne = 1024;      // score of a 100% hit rate
  static constexpr uint32_t kOn = kOne / 10;  // spin while >= 10% of spins hit
  static constexpr int kProbeEvery = 1024;    // sleeps between probes while not spinning
  const uint64_t maxNs_;
  uint32_t score_ = kOne / 2;
  int sleepsSinceProbe_ = 0;
};
