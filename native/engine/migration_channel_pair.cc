#include "engine/migration_channel_pair.h"

namespace migration {

uint64_t ChannelPair::Attach(Which which, int fd, uint32_t pingMs, std::vector<uint8_t> initial,
                             std::function<void(FrameChannel*, uint64_t)> loop) {
  auto ch = std::make_shared<FrameChannel>(fd, pingMs);
  ch->Prefill(std::move(initial));
  {
    std::lock_guard<std::mutex> lock(mu_);
    Slot(which) = ch;
  }
  FrameChannel* raw = ch.get();
  uint64_t gen = nextGen_.fetch_add(1) + 1;
  ch->Start([loop = std::move(loop), raw, gen] { loop(raw, gen); });
  return gen;
}

void ChannelPair::Detach() {
  std::shared_ptr<FrameChannel> m, d;
  {
    std::lock_guard<std::mutex> lock(mu_);
    m.swap(main_);
    d.swap(demand_);
  }
  if (m) m->Shutdown();
  if (d) d->Shutdown();
  if (m) m->Join();
  if (d) d->Join();
  // Another thread (the source's pusher) may still hold a reference while it finishes a failed
  // write; it lets go at once.
  std::lock_guard<std::mutex> lock(mu_);
  if (m) closedBytes_ += m->bytesOut.load() + m->bytesIn.load();
  if (d) closedBytes_ += d->bytesOut.load() + d->bytesIn.load();
}

void ChannelPair::Enqueue(Which which, uint8_t type, uint16_t range, uint64_t page,
                          std::vector<uint8_t> payload) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::shared_ptr<FrameChannel>& ch = which == kMain ? main_ : demand_;
  if (ch) ch->Enqueue(type, range, page, std::move(payload));
}

std::shared_ptr<FrameChannel> ChannelPair::Get(Which which) const {
  std::lock_guard<std::mutex> lock(mu_);
  return which == kMain ? main_ : demand_;
}

uint64_t ChannelPair::wireBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = closedBytes_;
  if (main_) total += main_->bytesOut.load() + main_->bytesIn.load();
  if (demand_) total += demand_->bytesOut.load() + demand_->bytesIn.load();
  return total;
}

}  // namespace migration
