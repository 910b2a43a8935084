// The two channels of a migration session, as the source and the target both hold them: `main`
// (control frames and the bulk of the pages) and `demand` (page requests and their answers, kept
// apart so that a request never queues behind bulk). JS attaches each after its handshake and
// again after a reconnect; Detach() ends both. The wire bytes of detached channels stay counted.
#pragma once
#include <stdint.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/migration_channel.h"

namespace migration {

class ChannelPair {
 public:
  enum Which { kMain, kDemand };

  // Takes over `fd` (its handshake done; `initial`: bytes of the stream already read) and starts
  // the channel, its reader running loop(channel, generation). Replaces the channel attached
  // before, if any. Returns the generation: numbered across both channels from 1, it tells a
  // channel's 'closed' notice from that of the one it replaced.
  uint64_t Attach(Which which, int fd, uint32_t pingMs, std::vector<uint8_t> initial,
                  std::function<void(FrameChannel*, uint64_t)> loop);
  // Shuts both channels down and joins their threads (not from one of them). Idempotent.
  void Detach();
  // JS thread: queues a frame on the channel, if one is attached (never blocks).
  void Enqueue(Which which, uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload);
  // The attached channel or null; holding it keeps its fd open while it is used.
  std::shared_ptr<FrameChannel> Get(Which which) const;
  // Calls f(main, demand) (each null when not attached) under the lock that Attach and Detach
  // take, so neither channel is replaced while f looks at both.
  template <typename F>
  auto WithChannels(F f) const {
    std::lock_guard<std::mutex> lock(mu_);
    return f(main_.get(), demand_.get());
  }
  // Bytes sent and received on every channel so far, detached ones included.
  uint64_t wireBytes() const;

 private:
  std::shared_ptr<FrameChannel>& Slot(Which which) { return which == kMain ? main_ : demand_; }

  mutable std::mutex mu_;
  std::shared_ptr<FrameChannel> main_;
  std::shared_ptr<FrameChannel> demand_;
  uint64_t closedBytes_ = 0;
  std::atomic<uint64_t> nextGen_{0};
};

}  // namespace migration
