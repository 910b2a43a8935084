#include "engine/migration_source.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>

#include <algorithm>

#include "engine/page_hash.h"

namespace migration {

SourceSession::SourceSession(std::vector<SourceRange> ranges, SourceOptions options,
                             std::function<void()> wakeJs)
    : ranges_(std::move(ranges)), options_(options), notices_(std::move(wakeJs)) {
  for (auto& r : ranges_) {
    shapes_.push_back(RangeShape{r.pages, r.pageSize});
    size_t words = (r.pages + 63) / 64;
    std::unique_ptr<std::atomic<uint64_t>[]> bits(new std::atomic<uint64_t>[words]);
    for (size_t i = 0; i < words; i++) bits[i].store(0);
    sent_.push_back(std::move(bits));
  }
  pusher_ = std::thread([this] { PushLoop(); });
}

SourceSession::~SourceSession() {
  Close();
}

void SourceSession::Close() {
  Detach();
  {
    std::lock_guard<std::mutex> lock(pushMu_);
    if (stopping_) return;
    stopping_ = true;
  }
  pushCv_.notify_all();
  if (pusher_.joinable()) pusher_.join();
}

uint64_t SourceSession::AttachMain(int fd, std::vector<uint8_t> initial) {
  uint64_t gen = channels_.Attach(ChannelPair::kMain, fd, options_.pingMs, std::move(initial),
                                  [this](FrameChannel* ch, uint64_t g) { MainLoop(ch, g); });
  pushCv_.notify_all();
  return gen;
}

uint64_t SourceSession::AttachDemand(int fd, std::vector<uint8_t> initial) {
  return channels_.Attach(ChannelPair::kDemand, fd, options_.pingMs, std::move(initial),
                          [this](FrameChannel* ch, uint64_t g) { DemandLoop(ch, g); });
}

void SourceSession::Detach() {
  // The push stays paused until JS resumes it after a reconnect (HAVE first says what arrived).
  pushPaused_.store(true);
  channels_.Detach();
}

void SourceSession::EnqueueMain(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload) {
  channels_.Enqueue(ChannelPair::kMain, type, range, page, std::move(payload));
}

void SourceSession::EnqueueDemand(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload) {
  channels_.Enqueue(ChannelPair::kDemand, type, range, page, std::move(payload));
}

uint64_t SourceSession::lastReceiveNs() const {
  return channels_.WithChannels([](const FrameChannel* main, const FrameChannel* demand) {
    uint64_t last = 0;
    if (main) last = main->lastReceiveNs.load();
    if (demand) last = std::min(last == 0 ? UINT64_MAX : last, demand->lastReceiveNs.load());
    return last;
  });
}

uint64_t SourceSession::unsent() const {
  return unsent_.load();
}

// ---- sending ----------------------------------------------------------------------------------

int SourceSession::SendPages(FrameChannel* ch, uint16_t range, uint64_t page, uint64_t count, bool demand) {
  const SourceRange& r = ranges_[range];
  const uint64_t ps = r.pageSize;
  const uint64_t perFrame = std::max<uint64_t>(1, options_.chunkBytes / ps);
  uint64_t i = page, end = page + count;
  while (i < end) {
    const uint8_t* at = reinterpret_cast<const uint8_t*>(r.address + i * ps);
    bool zero = PageIsZero(at, ps);
    uint64_t n = 1;
    while (i + n < end && n < perFrame &&
           PageIsZero(reinterpret_cast<const uint8_t*>(r.address + (i + n) * ps), ps) == zero)
      n++;
    int err;
    if (zero) {
      uint8_t payload[8];
      StoreU64(payload, n);
      err = ch->WriteBytes(kZero, range, i, payload, sizeof payload);
      stats_.zeroPages.fetch_add(n, std::memory_order_relaxed);
    } else {
      err = ch->WriteBytes(kPages, range, i, at, n * ps);
    }
    if (err != 0) return err;
    if (!demand) stats_.pushBytes.fetch_add(zero ? 0 : n * ps, std::memory_order_relaxed);
    i += n;
  }
  return 0;
}

bool SourceSession::Claim(uint16_t range, uint64_t page) {
  uint64_t bit = 1ull << (page % 64);
  uint64_t old = sent_[range][page / 64].fetch_or(bit);
  if (old & bit) return false;
  unsent_.fetch_sub(1);
  return true;
}

bool SourceSession::NextUnsent(uint16_t* range, uint64_t* page) {
  if (unsent_.load() == 0) return false;
  uint32_t r0 = cursorRange_.load() % ranges_.size();
  // From the cursor to the end of its range, then the other ranges, then the cursor's start.
  for (size_t k = 0; k <= ranges_.size(); k++) {
    uint32_t r = static_cast<uint32_t>((r0 + k) % ranges_.size());
    uint64_t pages = ranges_[r].pages;
    uint64_t from = k == 0 ? std::min(cursorPage_.load(), pages) : 0;
    uint64_t to = k == ranges_.size() ? std::min(cursorPage_.load(), pages) : pages;
    for (uint64_t p = from; p < to;) {
      uint64_t w = sent_[r][p / 64].load(std::memory_order_relaxed) | ((1ull << (p % 64)) - 1);
      if (w == ~0ull) {
        p = (p / 64 + 1) * 64;
        continue;
      }
      uint64_t found = (p / 64) * 64 + static_cast<uint64_t>(__builtin_ctzll(~w));
      if (found >= to) break;
      *range = static_cast<uint16_t>(r);
      *page = found;
      return true;
    }
  }
  return false;
}

void SourceSession::SendRuns(uint64_t id, std::vector<Run> runs) {
  {
    std::lock_guard<std::mutex> lock(pushMu_);
    rounds_.push_back(Round{id, std::move(runs)});
  }
  pushCv_.notify_all();
}

void SourceSession::StartPostcopy(const std::vector<Run>& toCome, bool push) {
  uint64_t total = 0;
  for (size_t r = 0; r < ranges_.size(); r++) {
    size_t words = (ranges_[r].pages + 63) / 64;
    for (size_t w = 0; w < words; w++) sent_[r][w].store(~0ull);
  }
  // Word at a time: this runs in the downtime, and must not grow with the memory's size more
  // than it must (a whole range to come is pages / 64 stores).
  for (const Run& run : toCome) {
    uint64_t p = run.page, end = run.page + run.count;
    while (p < end) {
      uint64_t w = p / 64, lo = p % 64;
      uint64_t n = std::min<uint64_t>(64 - lo, end - p);
      uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
      uint64_t old = sent_[run.range][w].fetch_and(~mask);
      total += static_cast<uint64_t>(__builtin_popcountll(old & mask));
      p += n;
    }
  }
  unsent_.store(total);
  push_.store(push);
  postcopy_.store(true);
  pushCv_.notify_all();
  if (total == 0) {
    SessionNotice n;
    n.kind = "pushed";
    notices_.Push(std::move(n));
  }
}

void SourceSession::SetPush(bool on) {
  if (on) TuneMainForPostcopy();
  push_.store(on);
  pushCv_.notify_all();
}

void SourceSession::ResumePush() {
  pushPaused_.store(false);
  pushCv_.notify_all();
}

void SourceSession::TuneMainForPostcopy() {
  const int buffer = static_cast<int>(options_.postcopyBuffer),
            lowat = static_cast<int>(options_.notsentLowat);
  channels_.WithChannels([buffer, lowat](FrameChannel* main, FrameChannel*) {
    if (main == nullptr) return;
    if (buffer > 0) setsockopt(main->fd(), SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
    if (lowat > 0) setsockopt(main->fd(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
  });
}

void SourceSession::PushLoop() {
  bool niced = false;
  uint64_t rateStart = 0, rateBytes = 0;
  bool pushedNoticed = false;
  while (true) {
    Round round;
    bool haveRound = false;
    std::shared_ptr<FrameChannel> ch;
    {
      std::unique_lock<std::mutex> lock(pushMu_);
      pushCv_.wait_for(lock, std::chrono::milliseconds(50), [&] {
        if (stopping_) return true;
        if (!rounds_.empty()) return true;
        return postcopy_.load() && push_.load() && !pushPaused_.load() && unsent_.load() > 0;
      });
      if (stopping_) return;
      if (!rounds_.empty()) {
        round = std::move(rounds_.front());
        rounds_.pop_front();
        haveRound = true;
      }
    }
    ch = channels_.Get(ChannelPair::kMain);
    if (haveRound) {
      int err = ch ? 0 : ENOTCONN;
      uint64_t pages = 0;
      for (const Run& run : round.runs) {
        if (err != 0) break;
        err = SendPages(ch.get(), run.range, run.page, run.count, false);
        pages += run.count;
      }
      if (err == 0) {
        stats_.precopyPages.fetch_add(pages, std::memory_order_relaxed);
        stats_.rounds.fetch_add(1, std::memory_order_relaxed);
      }
      SessionNotice n;
      n.kind = "round";
      n.id = round.id;
      n.err = err;
      notices_.Push(std::move(n));
      continue;
    }
    if (!postcopy_.load() || !push_.load() || pushPaused_.load() || !ch) continue;
    if (options_.pushNice != 0 && !niced) {
      // Post-copy: the push goes before the workload's threads for a CPU (they share one where
      // both ends run on a host), the demand path (SCHED_FIFO) before the push.
      SetThreadNice(options_.pushNice);
      niced = true;
    }
    uint16_t range;
    uint64_t page;
    if (!NextUnsent(&range, &page)) {
      if (!pushedNoticed && unsent_.load() == 0) {
        pushedNoticed = true;
        SessionNotice n;
        n.kind = "pushed";
        notices_.Push(std::move(n));
      }
      continue;
    }
    pushedNoticed = false;
    const uint64_t ps = ranges_[range].pageSize;
    const uint64_t chunk = options_.pushChunkBytes > 0 ? options_.pushChunkBytes : options_.chunkBytes;
    const uint64_t maxPages = std::max<uint64_t>(1, chunk / ps);
    uint64_t n = 0;
    while (n < maxPages && page + n < ranges_[range].pages && Claim(range, page + n)) n++;
    if (n == 0) continue;
    cursorRange_.store(range);
    cursorPage_.store(page + n);
    int err = SendPages(ch.get(), range, page, n, false);
    if (err != 0) {
      // The connection is gone; HAVE after the reconnect says which of these arrived.
      pushPaused_.store(true);
      continue;
    }
    stats_.pushedPages.fetch_add(n, std::memory_order_relaxed);
    uint64_t rate = pushRate_.load();
    if (rate > 0) {
      uint64_t now = NowNs();
      if (rateStart == 0 || now - rateStart > 1000000000ull) rateStart = now, rateBytes = 0;
      rateBytes += n * ps;
      uint64_t due = rateStart + rateBytes * 1000000000ull / rate;
      if (due > now) {
        uint64_t wait = std::min<uint64_t>(due - now, 100000000ull);
        struct timespec ts = {static_cast<time_t>(wait / 1000000000ull),
                              static_cast<long>(wait % 1000000000ull)};
        nanosleep(&ts, nullptr);
      }
    }
  }
}

int SourceSession::ServeRequest(FrameChannel* ch, uint16_t range, uint64_t page, uint64_t count) {
  stats_.requests.fetch_add(1, std::memory_order_relaxed);
  uint64_t i = page, end = page + count;
  while (i < end) {
    if (!Claim(range, i)) {
      stats_.requestsForSent.fetch_add(1, std::memory_order_relaxed);
      i++;
      continue;
    }
    uint64_t n = 1;
    while (i + n < end && Claim(range, i + n)) n++;
    int err = SendPages(ch, range, i, n, true);
    if (err != 0) return err;
    stats_.demandPages.fetch_add(n, std::memory_order_relaxed);
    i += n;
  }
  // The push follows the latest demand: the next pages are the likeliest next faults.
  cursorRange_.store(range);
  cursorPage_.store(end);
  return 0;
}

void SourceSession::ApplyHave(uint16_t range, uint64_t first, const uint8_t* bits, size_t bytes) {
  uint64_t pages = ranges_[range].pages;
  for (size_t b = 0; b < bytes; b++) {
    for (int k = 0; k < 8; k++) {
      uint64_t p = first + b * 8 + static_cast<uint64_t>(k);
      if (p >= pages) return;
      bool have = (bits[b] >> k) & 1;
      uint64_t bit = 1ull << (p % 64);
      if (have) {
        if (!(sent_[range][p / 64].fetch_or(bit) & bit)) unsent_.fetch_sub(1);
      } else if (sent_[range][p / 64].fetch_and(~bit) & bit) {
        unsent_.fetch_add(1);
        stats_.resentPages.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
}

// ---- readers ----------------------------------------------------------------------------------

bool SourceSession::ReadFrame(FrameChannel* ch, const char* name, Role role, uint64_t gen, FrameHeader* h,
                              std::vector<uint8_t>* payload) {
  int err = ch->ReadHeader(h);
  if (err != 0) {
    notices_.PushClosed(name, gen, ch->shutDown() ? ECANCELED : err, false, "");
    return false;
  }
  std::string bad = CheckFrame(*h, role, shapes_);
  if (!bad.empty()) {
    ch->Shutdown();
    notices_.PushClosed(name, gen, EPROTO, true, bad);
    return false;
  }
  payload->resize(h->length);
  err = ch->ReadFull(payload->data(), h->length);
  if (err != 0) {
    notices_.PushClosed(name, gen, ch->shutDown() ? ECANCELED : err, false, "");
    return false;
  }
  return true;
}

void SourceSession::MainLoop(FrameChannel* ch, uint64_t gen) {
  std::vector<uint8_t> payload;
  while (true) {
    FrameHeader h;
    if (!ReadFrame(ch, "main", Role::kSourceMain, gen, &h, &payload)) return;
    switch (h.type) {
      case kControl:
        notices_.PushControl("main", payload);
        break;
      case kHave: {
        uint64_t pages = ranges_[h.range].pages;
        if (h.length > (pages - h.page + 7) / 8) {
          ch->Shutdown();
          return notices_.PushClosed("main", gen, EPROTO, true, "HAVE bitmap longer than the range");
        }
        ApplyHave(h.range, h.page, payload.data(), payload.size());
        break;
      }
      case kPing:
        if (h.page == 1) ch->WriteBytes(kPong, 0, 0, payload.data(), payload.size());
        break;
      default:
        break;  // PONG: liveness only
    }
  }
}

void SourceSession::DemandLoop(FrameChannel* ch, uint64_t gen) {
  if (options_.realtimeDemand) RaiseToRealtime();
  std::vector<uint8_t> payload;
  while (true) {
    FrameHeader h;
    if (!ReadFrame(ch, "demand", Role::kSourceDemand, gen, &h, &payload)) return;
    if (h.type == kRequest) {
      uint64_t count = LoadU64(payload.data());
      std::string bad = CheckRun(h.range, h.page, count, shapes_);
      if (bad.empty() && !postcopy_.load()) bad = "page REQUEST before the switchover";
      if (!bad.empty()) {
        ch->Shutdown();
        return notices_.PushClosed("demand", gen, EPROTO, true, bad);
      }
      int err = ServeRequest(ch, h.range, h.page, count);
      if (err != 0) return notices_.PushClosed("demand", gen, ch->shutDown() ? ECANCELED : err, false, "");
    } else if (h.type == kControl) {
      notices_.PushControl("demand", payload);
    } else if (h.type == kPing && h.page == 1) {
      ch->WriteBytes(kPong, 0, 0, payload.data(), payload.size());
    }
  }
}

std::deque<SessionNotice> SourceSession::TakeNotices() {
  std::deque<SessionNotice> out;
  notices_.TakeInto(&out);
  return out;
}

}  // namespace migration
