// Per-page state of a served range, shared by the demand and prefetch threads without locks.
// It only steers work (what fault-around and prefetch skip, when drained() resolves); a fault
// is always served whatever the map says, because a page can vanish behind it (MADV_DONTNEED
// racing a copy), and EEXIST from the kernel is the final word on "already present".
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <memory>

enum PageState : uint8_t {
  kMissing = 0,   // not known to be present: prefetch and fault-around fill it
  kPresent = 1,   // copied (by us or someone else: EEXIST)
  kRemoved = 2,   // MADV_DONTNEED/REMOVE with the 'zero' policy: served as zeros on demand
  kGone = 3,      // unmapped, or moved away by mremap: never served again
  kInFlight = 4,  // requested from a JS handler, not yet copied
};

// A state counts as settled when nothing more is to be done for drained().
inline bool Settled(uint8_t s) {
  return s == kPresent || s == kRemoved || s == kGone;
}

class PageStates {
 public:
  explicit PageStates(size_t pages) : pages_(pages), states_(new std::atomic<uint8_t>[pages]) {
    for (size_t i = 0; i < pages; i++) states_[i].store(kMissing, std::memory_order_relaxed);
  }

  size_t pages() const { return pages_; }
  uint8_t Get(size_t i) const { return states_[i].load(std::memory_order_relaxed); }

  // from -> to if the page is in `from`; returns whether it changed.
  bool Transition(size_t i, uint8_t from, uint8_t to) {
    uint8_t expected = from;
    return states_[i].compare_exchange_strong(expected, to, std::memory_order_relaxed);
  }

  // Unconditional; returns the previous state.
  uint8_t Set(size_t i, uint8_t to) { return states_[i].exchange(to, std::memory_order_relaxed); }

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

 private:
  size_t pages_;
  std::unique_ptr<std::atomic<uint8_t>[]> states_;
};
