// The page-claim table both engines use: one atomic state byte per page of a range, shared by the
// engine's threads without locks. A thread claims work by moving pages from one state to another
// with compare-and-swap, so each page is worked on by exactly one thread at a time. What the
// states mean is each engine's own (FaultPage in fault_engine.h, SnapshotPage in
// snapshot_engine.h); this table only stores and moves them.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <memory>

class PageStates {
 public:
  explicit PageStates(size_t pages, uint8_t initial = 0)
      : pages_(pages), states_(new std::atomic<uint8_t>[pages]) {
    for (size_t i = 0; i < pages; i++) states_[i].store(initial, std::memory_order_relaxed);
  }

  size_t pages() const { return pages_; }
  uint8_t Get(size_t i) const { return states_[i].load(std::memory_order_acquire); }

  // from -> to if the page is in `from`; returns whether it changed.
  bool Transition(size_t i, uint8_t from, uint8_t to) {
    uint8_t expected = from;
    return states_[i].compare_exchange_strong(expected, to, std::memory_order_acq_rel);
  }

  // from -> to, telling what the page was in when it was not in `from` (*seen).
  bool Transition(size_t i, uint8_t from, uint8_t to, uint8_t* seen) {
    *seen = from;
    return states_[i].compare_exchange_strong(*seen, to, std::memory_order_acq_rel);
  }

  // Unconditional; returns the previous state.
  uint8_t Set(size_t i, uint8_t to) { return states_[i].exchange(to, std::memory_order_acq_rel); }

  // Number of pages from `i` (up to `max`) in state `s`.
  size_t RunOf(size_t i, size_t max, uint8_t s) const {
    size_t n = 0;
    while (i + n < pages_ && n < max && Get(i + n) == s) n++;
    return n;
  }

  // First page at or after `i` in state `s`, or pages() if none.
  size_t Find(size_t i, uint8_t s) const {
    while (i < pages_ && Get(i) != s) i++;
    return i;
  }

  // Claims the pages from `i` up to (not including) `end` while they are in `from`, moving each
  // to `to`; stops at the first it cannot claim. Returns the end of the claimed run.
  size_t ClaimForward(size_t i, size_t end, uint8_t from, uint8_t to) {
    while (i < end && i < pages_ && Transition(i, from, to)) i++;
    return i;
  }

  // The same backwards: claims i - 1, i - 2, ... down to `begin`. Returns the claimed run's start.
  size_t ClaimBackward(size_t i, size_t begin, uint8_t from, uint8_t to) {
    while (i > begin && Transition(i - 1, from, to)) i--;
    return i;
  }

  // Whether every page is in state `s`.
  bool All(uint8_t s) const { return RunOf(0, pages_, s) == pages_; }

 private:
  size_t pages_;
  std::unique_ptr<std::atomic<uint8_t>[]> states_;
};
