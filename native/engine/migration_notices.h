// What a migration session's threads tell JS (SessionNotice), and the queue both sessions hand
// them over in: JS is woken once per batch, not once per notice (a wake-up is a threadsafe-function
// call; the flag is cleared when JS takes the batch, so a notice queued after that wakes it again).
#pragma once
#include <stdint.h>

#include <atomic>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/util.h"

namespace migration {

struct SessionNotice {
  std::string kind;  // control | closed | round | pushed | complete | error
  std::string channel;
  int err = 0;
  bool protocol = false;
  std::string message;
  uint64_t id = 0;
  uint64_t at = 0;  // control: when the frame was read (CLOCK_MONOTONIC ns)
  std::vector<uint8_t> payload;
};

class NoticeQueue {
 public:
  explicit NoticeQueue(std::function<void()> wakeJs) : wakeJs_(std::move(wakeJs)) {}

  // Any thread.
  void Push(SessionNotice n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      notices_.push_back(std::move(n));
    }
    if (!scheduled_.exchange(true)) wakeJs_();
  }
  // A channel ended: `gen` is what its Attach returned; `protocol` when the peer broke the protocol.
  void PushClosed(const char* channel, uint64_t gen, int err, bool protocol, const std::string& message) {
    SessionNotice n;
    n.id = gen;
    n.kind = "closed";
    n.channel = channel;
    n.err = err;
    n.protocol = protocol;
    n.message = message;
    Push(std::move(n));
  }
  // A CONTROL frame's JSON, for JS (which drives the phases), stamped with when it was read.
  void PushControl(const char* channel, const std::vector<uint8_t>& payload) {
    SessionNotice n;
    n.kind = "control";
    n.at = NowNs();
    n.channel = channel;
    n.payload = payload;
    Push(std::move(n));
  }
  // JS thread: the notices queued so far, appended to `out` in order.
  void TakeInto(std::deque<SessionNotice>* out) {
    scheduled_.store(false);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& n : notices_) out->push_back(std::move(n));
    notices_.clear();
  }

 private:
  std::function<void()> wakeJs_;
  std::mutex mu_;
  std::deque<SessionNotice> notices_;
  std::atomic<bool> scheduled_{false};
};

}  // namespace migration
