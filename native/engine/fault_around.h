// Adaptive fault-around, per served range: a readahead-like window. A fault right after where
// an earlier fault's window ended (a sequential reader reaching the end of what was filled for
// it) doubles that stream's window, up to the maximum; any other fault starts a new stream with
// a one-page window, so random access installs only the pages it touches. Several streams are
// followed at once (threads reading different parts of one range in order), least recently used
// replaced. The demand thread alone uses it: no locks.
#pragma once
#include <stddef.h>
#include <stdint.h>

class FaultAroundPolicy {
 public:
  static const size_t kStreams = 8;

  explicit FaultAroundPolicy(size_t maxPages) : maxPages_(maxPages < 1 ? 1 : maxPages) {}

  // Pages to fill from `page` forward (>= 1) for a fault at `page`.
  size_t Window(size_t page) {
    clock_++;
    Stream* lru = &streams_[0];
    for (Stream& s : streams_) {
      if (s.window != 0 && page >= s.next && page < s.next + s.window) {
        // sequential: the reader went past its window
        s.window = s.window * 2 < maxPages_ ? s.window * 2 : maxPages_;
        s.next = page + s.window;
        s.used = clock_;
        return s.window;
      }
      if (s.used < lru->used) lru = &s;
    }
    lru->next = page + 1;
    lru->window = 1;
    lru->used = clock_;
    return 1;
  }

 private:
  struct Stream {
    size_t next = 0;    // first page past the stream's last window
    size_t window = 0;  // pages of its last window (0: unused)
    uint64_t used = 0;
  };
  size_t maxPages_;
  uint64_t clock_ = 0;
  Stream streams_[kStreams];
};
