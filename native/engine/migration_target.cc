#include "engine/migration_target.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "engine/fault_sources.h"
#include "engine/page_hash.h"
#include "kernel/uapi.h"

namespace migration {

namespace {

class RangeDelegate : public FaultDelegate {
 public:
  RangeDelegate(TargetSession* session, uint16_t range) : session_(session), range_(range) {}
  void OnFault(uint64_t address, uint64_t flags) override { session_->OnFault(range_, address, flags); }

 private:
  TargetSession* session_;
  uint16_t range_;
};

bool Valid(uint8_t s) {
  return s == kTPresent || s == kTCached || s == kTZero || s == kTPoisoned || s == kTFilling;
}

// One fill ioctl over [dst, dst + len), continuing after partial progress. EEXIST on a page
// skips it (present already: never overwritten). Returns 0 or the errno that stopped it.
template <typename Op>
int FillAll(uint64_t dst, uint64_t len, uint64_t pageSize, Op op) {
  uint64_t off = 0;
  int eagain = 0;
  while (off < len) {
    FillResult f = op(dst + off, off, len - off);
    off += f.done;
    if (f.err == 0) continue;
    if (f.err == EEXIST) {
      off += pageSize;  // that page is already there
      continue;
    }
    if (f.err == EAGAIN) {
      if (f.done > 0) continue;
      // An event is pending on the uffd (the engine reads it); try again shortly, a bounded
      // number of times.
      if (++eagain > 2000) return EAGAIN;
      struct timespec ts = {0, 500000};
      nanosleep(&ts, nullptr);
      continue;
    }
    return f.err;
  }
  return 0;
}

}  // namespace

TargetSession::TargetSession(std::vector<TargetRange> ranges, TargetOptions options,
                             std::function<void()> wakeJs)
    : ranges_(std::move(ranges)), options_(options), wakeJs_(wakeJs), notices_(std::move(wakeJs)) {
  uint64_t total = 0;
  uint64_t maxPage = 4096;
  for (auto& r : ranges_) {
    shapes_.push_back(RangeShape{r.pages, r.pageSize});
    std::unique_ptr<std::atomic<uint8_t>[]> s(new std::atomic<uint8_t>[r.pages]);
    std::unique_ptr<std::atomic<uint64_t>[]> at(new std::atomic<uint64_t>[r.pages]);
    for (uint64_t i = 0; i < r.pages; i++) {
      s[i].store(kTMissing, std::memory_order_relaxed);
      at[i].store(0, std::memory_order_relaxed);
    }
    states_.push_back(std::move(s));
    requestedAt_.push_back(std::move(at));
    sourceHashes_.emplace_back();
    sourceHashed_.emplace_back();
    total += r.pages;
    maxPage = std::max(maxPage, r.pageSize);
  }
  missing_.store(total);
  zeros_.assign(maxPage, 0);
  // The engine and its ranges now (their page tables are O(size)); its threads start at the
  // switchover, so that the downtime does not grow with the memory.
  EngineOptions eo;
  eo.spinUs = options_.spinUs;
  eo.readSize = options_.readSize;
  engine_.reset(new FaultEngine(eo, wakeJs_));
  for (size_t i = 0; i < ranges_.size(); i++) {
    const TargetRange& r = ranges_[i];
    auto delegate = std::make_shared<RangeDelegate>(this, static_cast<uint16_t>(i));
    // No source, no prefetch, no fault-around: the delegate serves every fault of the range.
    auto served = std::make_shared<ServedRange>(static_cast<uint32_t>(i + 1), r.address, r.length, r.pageSize,
                                                std::shared_ptr<Source>(Source::Zero()), 0, false, r.pageSize,
                                                nullptr, r.pageSize, delegate);
    engine_->AddRange(served);
  }
}

TargetSession::~TargetSession() {
  Close();
}

void TargetSession::Close() {
  Detach();
  StopServing();
}

uint64_t TargetSession::AttachMain(int fd, std::vector<uint8_t> initial) {
  return channels_.Attach(ChannelPair::kMain, fd, options_.pingMs, std::move(initial),
                          [this](FrameChannel* ch, uint64_t gen) { ReaderLoop(ch, false, gen); });
}

uint64_t TargetSession::AttachDemand(int fd, std::vector<uint8_t> initial) {
  return channels_.Attach(ChannelPair::kDemand, fd, options_.pingMs, std::move(initial),
                          [this](FrameChannel* ch, uint64_t gen) { ReaderLoop(ch, true, gen); });
}

void TargetSession::Detach() {
  channels_.Detach();
}

void TargetSession::EnqueueMain(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload) {
  channels_.Enqueue(ChannelPair::kMain, type, range, page, std::move(payload));
}

uint64_t TargetSession::lastReceiveNs() const {
  return channels_.WithChannels([](const FrameChannel* main, const FrameChannel* demand) {
    uint64_t last = UINT64_MAX;
    if (main) last = std::min(last, main->lastReceiveNs.load());
    if (demand) last = std::min(last, demand->lastReceiveNs.load());
    return last == UINT64_MAX ? 0 : last;
  });
}

// ---- serving ----------------------------------------------------------------------------------

void TargetSession::DropUnreceived() {
  // Anonymous memory that holds pages we did not put there (memory handed to us with old
  // contents) must fault on them after the switchover: drop them now, before anything arrives
  // (O(size), so not in the downtime; pages discarded or zeroed later are dropped as that
  // happens).
  for (const TargetRange& r : ranges_)
    if (r.alias == 0) madvise(reinterpret_cast<void*>(r.address), r.length, MADV_DONTNEED);
}

int TargetSession::Populate(std::string* syscall) {
  for (const TargetRange& r : ranges_) {
    if (r.alias != 0) continue;
    if (madvise(reinterpret_cast<void*>(r.address), r.length, 23 /* MADV_POPULATE_WRITE (5.14) */) != 0) {
      *syscall = "madvise(MADV_POPULATE_WRITE)";
      return errno;
    }
  }
  populated_.store(true);
  return 0;
}

int TargetSession::Registered(int uffd, std::string* syscall) {
  if (uffd_ < 0) {
    uffd_ = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
    if (uffd_ < 0) {
      *syscall = "fcntl(F_DUPFD_CLOEXEC)";
      return errno;
    }
  }
  registered_.store(true);
  return 0;
}

int TargetSession::StartServing(int uffd, std::string* syscall) {
  if (serving_.load()) return 0;
  if (uffd_ < 0) {
    uffd_ = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
    if (uffd_ < 0) {
      *syscall = "fcntl(F_DUPFD_CLOEXEC)";
      return errno;
    }
  }
  serving_.store(true);
  channels_.WithChannels([this](FrameChannel* main, FrameChannel*) {
    int v = static_cast<int>(options_.postcopyBuffer);
    if (main && v > 0) setsockopt(main->fd(), SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
  });
  int err = engine_->Start(uffd_, syscall);
  if (err != 0) {
    serving_.store(false);
    close(uffd_);
    uffd_ = -1;
    return err;
  }
  CheckComplete();
  return 0;
}

void TargetSession::StopServing() {
  if (engine_) engine_->Stop();
  serving_.store(false);
  if (uffd_ >= 0) close(uffd_);
  uffd_ = -1;
}

// ---- page states ------------------------------------------------------------------------------

bool TargetSession::Claim(uint16_t range, uint64_t page, uint8_t* was) {
  std::atomic<uint8_t>& s = states_[range][page];
  uint8_t cur = s.load();
  while (cur == kTMissing || cur == kTRequested) {
    if (s.compare_exchange_weak(cur, kTFilling)) {
      *was = cur;
      return true;
    }
  }
  *was = cur;
  return false;
}

void TargetSession::SetValid(uint16_t range, uint64_t page, uint8_t to) {
  uint8_t old = states_[range][page].exchange(to);
  if (!Valid(old) && Valid(to)) missing_.fetch_sub(1);
  if (Valid(old) && !Valid(to)) missing_.fetch_add(1);
}

void TargetSession::Installed(uint16_t range, uint64_t page, uint64_t count, const uint8_t* was,
                              bool demand) {
  uint64_t now = NowNs();
  for (uint64_t i = 0; i < count; i++) {
    if (was != nullptr && was[i] == kTRequested) {
      uint64_t at = requestedAt_[range][page + i].load(std::memory_order_relaxed);
      if (at != 0 && now > at) latency_.Record(now - at);
    }
    // kFilling counts as valid already; present is final.
    states_[range][page + i].store(kTPresent);
    missing_.fetch_sub(1);
  }
  (demand ? stats_.demandPages : stats_.pushedPages).fetch_add(count, std::memory_order_relaxed);
  CheckComplete();
}

void TargetSession::CheckComplete() {
  if (!serving_.load() || missing_.load() != 0 || completeNoticed_.exchange(true)) return;
  SessionNotice n;
  n.kind = "complete";
  notices_.Push(std::move(n));
}

int TargetSession::Continue(uint16_t range, uint64_t page, uint64_t count) {
  const TargetRange& r = ranges_[range];
  stats_.continues.fetch_add(1, std::memory_order_relaxed);
  return FillAll(r.address + page * r.pageSize, count * r.pageSize, r.pageSize,
                 [&](uint64_t dst, uint64_t, uint64_t len) { return ContinuePages(uffd_, dst, len); });
}

int TargetSession::InstallZero(uint16_t range, uint64_t page, uint64_t count, bool minor) {
  const TargetRange& r = ranges_[range];
  uint64_t dst = r.address + page * r.pageSize, len = count * r.pageSize;
  if (r.alias == 0)
    return FillAll(dst, len, r.pageSize,
                   [&](uint64_t d, uint64_t, uint64_t l) { return ZeroPages(uffd_, d, l); });
  // memfd/hugetlbfs: zeros into the page cache (nobody has it mapped yet), then map it.
  memset(reinterpret_cast<void*>(r.alias + page * r.pageSize), 0, len);
  return Continue(range, page, count);
}

// ---- faults (the engine's demand thread) ------------------------------------------------------

void TargetSession::OnFault(uint16_t range, uint64_t address, uint64_t flags) {
  const TargetRange& r = ranges_[range];
  if (address < r.address || address >= r.address + r.length) return;
  uint64_t page = (address - r.address) / r.pageSize;
  bool minor = (flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
  stats_.faults.fetch_add(1, std::memory_order_relaxed);
  if (options_.realtimeDemand && !engineRaised_) {
    // The engine's reading thread is the first hop of every demand fault (the engine has no
    // priority option of its own yet).
    engineRaised_ = true;
    RaiseToRealtime();
  }
  std::atomic<uint8_t>& s = states_[range][page];
  while (true) {
    uint8_t cur = s.load();
    switch (cur) {
      case kTMissing:
        if (!s.compare_exchange_strong(cur, kTRequested)) continue;
        requestedAt_[range][page].store(NowNs(), std::memory_order_relaxed);
        SendRequest(range, page, 1);
        return;
      case kTRequested:
      case kTFilling:
        return;  // its bytes are on the way; installing them wakes this fault
      case kTCached: {
        if (!s.compare_exchange_strong(cur, kTFilling)) continue;
        int err = Continue(range, page, 1);
        s.store(kTPresent);
        if (err != 0) Error(err, "ioctl(UFFDIO_CONTINUE)", "mapping a page-cache page for a MINOR fault");
        return;
      }
      case kTZero: {
        if (!s.compare_exchange_strong(cur, kTFilling)) continue;
        int err = InstallZero(range, page, 1, minor);
        s.store(kTPresent);
        if (err != 0)
          Error(err, r.alias ? "ioctl(UFFDIO_CONTINUE)" : "ioctl(UFFDIO_ZEROPAGE)", "a zero page");
        return;
      }
      case kTPresent: {
        // Installed already: a fault raced with the install, or the workload dropped the page
        // since (MADV_DONTNEED/REMOVE). Zeros then, as for any memory after MADV_DONTNEED.
        uint64_t dst = r.address + page * r.pageSize;
        int err;
        if (minor)
          err = Continue(range, page, 1);
        else if (r.alias == 0)
          err = FillAll(dst, r.pageSize, r.pageSize,
                        [&](uint64_t d, uint64_t, uint64_t l) { return ZeroPages(uffd_, d, l); });
        else
          err = FillAll(dst, r.pageSize, r.pageSize, [&](uint64_t d, uint64_t, uint64_t l) {
            return CopyPages(uffd_, d, zeros_.data(), l);
          });
        WakePages(uffd_, dst, r.pageSize);
        if (err != 0 && err != ENOENT) Error(err, "fill", "re-serving an installed page");
        return;
      }
      case kTPoisoned: {
        uint64_t dst = r.address + page * r.pageSize;
        FillAll(dst, r.pageSize, r.pageSize,
                [&](uint64_t d, uint64_t, uint64_t l) { return PoisonPages(uffd_, d, l); });
        WakePages(uffd_, dst, r.pageSize);
        return;
      }
      default:
        return;
    }
  }
}

void TargetSession::SendRequest(uint16_t range, uint64_t page, uint64_t count) {
  std::shared_ptr<FrameChannel> ch = channels_.Get(ChannelPair::kDemand);
  stats_.requests.fetch_add(1, std::memory_order_relaxed);
  if (!ch) return;  // asked again after the reconnect (ResendRequests)
  uint8_t payload[8];
  StoreU64(payload, count);
  ch->WriteBytes(kRequest, range, page, payload, sizeof payload);
}

void TargetSession::ResendRequests() {
  for (size_t r = 0; r < ranges_.size(); r++) {
    uint64_t pages = ranges_[r].pages;
    for (uint64_t p = 0; p < pages;) {
      if (states_[r][p].load() != kTRequested) {
        p++;
        continue;
      }
      uint64_t n = 1;
      while (p + n < pages && n < 64 && states_[r][p + n].load() == kTRequested) n++;
      SendRequest(static_cast<uint16_t>(r), p, n);
      stats_.resentRequests.fetch_add(1, std::memory_order_relaxed);
      p += n;
    }
  }
}

// ---- receiving --------------------------------------------------------------------------------

int TargetSession::ReceivePages(FrameChannel* ch, const FrameHeader& h, std::vector<uint8_t>* staging,
                                bool demand) {
  const TargetRange& r = ranges_[h.range];
  const uint64_t ps = r.pageSize;
  const uint64_t n = h.length / ps;
  if (!serving_.load()) {
    // Before the switchover: nobody runs on the target memory. A page sent again in a later
    // round simply replaces it.
    if (r.alias == 0 && registered_.load() && !populated_.load()) {
      // Anonymous: UFFDIO_COPY from a bounce buffer allocates the page without zeroing it
      // (cheaper than recv(2) faulting fresh pages in); a page already here is overwritten.
      if (staging->size() < h.length) staging->resize(h.length);
      int err = ch->ReadFull(staging->data(), h.length);
      if (err != 0) return err;
      const uint8_t* src = staging->data();
      uint64_t dst = r.address + h.page * ps, off = 0;
      while (off < h.length) {
        FillResult f = CopyPages(uffd_, dst + off, src + off, h.length - off);
        off += f.done;
        if (f.err == 0) continue;
        if (f.err == EEXIST || f.err == EAGAIN) {
          if (f.err == EEXIST) {
            memcpy(reinterpret_cast<void*>(dst + off), src + off, ps);
            off += ps;
          }
          continue;
        }
        Error(f.err, f.syscall, "installing a pre-copy page");
        break;
      }
    } else {
      // memfd/hugetlbfs: straight from the socket into the page cache, through the alias; or
      // anonymous memory populated beforehand (no page missing: nothing can fault).
      uint64_t base = (r.alias != 0 ? r.alias : r.address) + h.page * ps;
      int err = ch->ReadFull(reinterpret_cast<void*>(base), h.length);
      if (err != 0) return err;
    }
    for (uint64_t i = 0; i < n; i++) SetValid(h.range, h.page + i, r.alias != 0 ? kTCached : kTPresent);
    stats_.precopyPages.fetch_add(n, std::memory_order_relaxed);
    return 0;
  }
  std::vector<uint8_t> was(n);
  std::vector<bool> mine(n);
  for (uint64_t i = 0; i < n; i++) mine[i] = Claim(h.range, h.page + i, &was[i]);
  uint64_t i = 0;
  while (i < n) {
    uint64_t k = i + 1;
    while (k < n && mine[k] == mine[i]) k++;
    uint64_t bytes = (k - i) * ps;
    uint64_t page = h.page + i;
    uint64_t dst = r.address + page * ps;
    int err = 0;
    if (!mine[i]) {
      err = ch->Skip(bytes);
      if (err == 0) stats_.duplicatePages.fetch_add(k - i, std::memory_order_relaxed);
    } else if (r.alias == 0) {
      if (staging->size() < bytes) staging->resize(bytes);
      err = ch->ReadFull(staging->data(), bytes);
      if (err == 0) {
        const uint8_t* src = staging->data();
        int fill = FillAll(dst, bytes, ps, [&](uint64_t d, uint64_t off, uint64_t l) {
          return CopyPages(uffd_, d, src + off, l);
        });
        if (fill != 0) Error(fill, "ioctl(UFFDIO_COPY)", "installing a received page");
        Installed(h.range, page, k - i, was.data() + i, demand);
      }
    } else {
      err = ch->ReadFull(reinterpret_cast<void*>(r.alias + page * ps), bytes);
      if (err == 0) {
        int fill = Continue(h.range, page, k - i);
        if (fill != 0) Error(fill, "ioctl(UFFDIO_CONTINUE)", "mapping a received page");
        Installed(h.range, page, k - i, was.data() + i, demand);
      }
    }
    if (err != 0) {
      // Lost mid-frame: what was claimed and not installed goes back to what it was.
      for (uint64_t j = i; j < n; j++)
        if (mine[j]) states_[h.range][h.page + j].store(was[j]);
      return err;
    }
    i = k;
  }
  return 0;
}

int TargetSession::ApplyZero(uint16_t range, uint64_t page, uint64_t count) {
  const TargetRange& r = ranges_[range];
  const uint64_t ps = r.pageSize;
  stats_.zeroPages.fetch_add(count, std::memory_order_relaxed);
  if (!serving_.load()) {
    // Drop whatever is there (an earlier round, or what the memory held before): unpopulated
    // memory reads as zeros, and a fault after the switchover gets a zero page.
    uint64_t off = page * ps, len = count * ps;
    if (r.alias == 0 && populated_.load()) {
      memset(reinterpret_cast<void*>(r.address + off), 0, len);  // stays present: no fault can come
    } else if (r.alias == 0) {
      madvise(reinterpret_cast<void*>(r.address + off), len, MADV_DONTNEED);
    } else if (fallocate(r.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                         static_cast<off_t>(len)) != 0) {
      memset(reinterpret_cast<void*>(r.alias + off), 0, len);
    }
    for (uint64_t j = 0; j < count; j++) SetValid(range, page + j, kTZero);
    return 0;
  }
  std::vector<uint8_t> was(count);
  for (uint64_t i = 0; i < count;) {
    if (!Claim(range, page + i, &was[i])) {
      stats_.duplicatePages.fetch_add(1, std::memory_order_relaxed);
      i++;
      continue;
    }
    uint64_t k = i + 1;
    while (k < count && Claim(range, page + k, &was[k])) k++;
    int err = InstallZero(range, page + i, k - i, false);
    if (err != 0) Error(err, r.alias ? "ioctl(UFFDIO_CONTINUE)" : "ioctl(UFFDIO_ZEROPAGE)", "a zero page");
    Installed(range, page + i, k - i, was.data() + i, false);
    i = k;
  }
  return 0;
}

int TargetSession::ApplyDiscard(const uint8_t* entries, size_t count, std::string* bad) {
  if (serving_.load()) {
    *bad = "DISCARD after the switchover";
    return EPROTO;
  }
  for (size_t e = 0; e < count; e++) {
    const uint8_t* p = entries + e * 16;
    uint16_t range = static_cast<uint16_t>(p[0] | (p[1] << 8));
    uint64_t n = static_cast<uint64_t>(p[4]) | (static_cast<uint64_t>(p[5]) << 8) |
                 (static_cast<uint64_t>(p[6]) << 16) | (static_cast<uint64_t>(p[7]) << 24);
    uint64_t page = LoadU64(p + 8);
    *bad = CheckRun(range, page, n, shapes_);
    if (!bad->empty()) return EPROTO;
    const TargetRange& r = ranges_[range];
    // A page the source wrote after sending it: stale here. Anonymous memory drops it (it
    // would not fault otherwise); a page-cache page stays until its fault fetches the new one.
    if (r.alias == 0)
      madvise(reinterpret_cast<void*>(r.address + page * r.pageSize), n * r.pageSize, MADV_DONTNEED);
    for (uint64_t i = 0; i < n; i++) SetValid(range, page + i, kTMissing);
    stats_.discardedPages.fetch_add(n, std::memory_order_relaxed);
  }
  return 0;
}

void TargetSession::ReaderLoop(FrameChannel* ch, bool demand, uint64_t gen) {
  const char* name = demand ? "demand" : "main";
  const Role role = demand ? Role::kTargetDemand : Role::kTargetMain;
  std::vector<uint8_t> staging;
  std::vector<uint8_t> payload;
  bool niced = false;
  if (demand && options_.realtimeDemand) RaiseToRealtime();
  while (true) {
    FrameHeader h;
    int err = ch->ReadHeader(&h);
    if (err != 0) return notices_.PushClosed(name, gen, ch->shutDown() ? ECANCELED : err, false, "");
    if (!demand && !niced && options_.bulkNice != 0 && serving_.load()) {
      // Post-copy: the push's pages go before the workload's threads for a CPU, the demand
      // path (SCHED_FIFO) before them.
      SetThreadNice(options_.bulkNice);
      niced = true;
    }
    std::string bad = CheckFrame(h, role, shapes_);
    if (bad.empty() && demand && h.type == kPages && !serving_.load())
      bad = "PAGES on the demand channel before the switchover";
    if (!bad.empty()) {
      ch->Shutdown();
      return notices_.PushClosed(name, gen, EPROTO, true, bad);
    }
    if (h.type == kPages) {
      err = ReceivePages(ch, h, &staging, demand);
      if (err != 0) return notices_.PushClosed(name, gen, ch->shutDown() ? ECANCELED : err, false, "");
      continue;
    }
    payload.resize(h.length);
    err = ch->ReadFull(payload.data(), h.length);
    if (err != 0) return notices_.PushClosed(name, gen, ch->shutDown() ? ECANCELED : err, false, "");
    switch (h.type) {
      case kZero: {
        uint64_t count = LoadU64(payload.data());
        bad = CheckRun(h.range, h.page, count, shapes_);
        if (bad.empty()) ApplyZero(h.range, h.page, count);
        break;
      }
      case kDiscard:
        ApplyDiscard(payload.data(), payload.size() / 16, &bad);
        break;
      case kHashes: {
        std::vector<uint64_t>& hashes = sourceHashes_[h.range];
        std::vector<uint8_t>& got = sourceHashed_[h.range];
        if (hashes.empty()) {
          hashes.assign(ranges_[h.range].pages, 0);
          got.assign(ranges_[h.range].pages, 0);
        }
        for (size_t i = 0; i < payload.size() / 8; i++) {
          hashes[h.page + i] = LoadU64(payload.data() + i * 8);
          got[h.page + i] = 1;
        }
        break;
      }
      case kControl:
        notices_.PushControl(name, payload);
        break;
      case kPing:
        if (h.page == 1) ch->WriteBytes(kPong, 0, 0, payload.data(), payload.size());
        break;
      default:
        break;
    }
    if (!bad.empty()) {
      ch->Shutdown();
      return notices_.PushClosed(name, gen, EPROTO, true, bad);
    }
  }
}

// ---- the end ----------------------------------------------------------------------------------

std::vector<uint8_t> TargetSession::HaveBitmap(uint16_t range) const {
  uint64_t pages = ranges_[range].pages;
  std::vector<uint8_t> bits((pages + 7) / 8, 0);
  for (uint64_t p = 0; p < pages; p++)
    if (Valid(states_[range][p].load())) bits[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
  return bits;
}

uint64_t TargetSession::Settle(bool poison, int* err, std::string* syscall) {
  *err = 0;
  uint64_t done = 0;
  if (uffd_ < 0) return 0;
  for (size_t ri = 0; ri < ranges_.size(); ri++) {
    uint16_t range = static_cast<uint16_t>(ri);
    const TargetRange& r = ranges_[ri];
    for (uint64_t p = 0; p < r.pages;) {
      uint8_t was;
      if (!Claim(range, p, &was)) {
        p++;
        continue;
      }
      uint64_t n = 1;
      uint8_t w;
      while (p + n < r.pages && Claim(range, p + n, &w)) n++;
      uint64_t dst = r.address + p * r.pageSize;
      int e;
      if (poison) {
        e = FillAll(dst, n * r.pageSize, r.pageSize,
                    [&](uint64_t d, uint64_t, uint64_t l) { return PoisonPages(uffd_, d, l); });
        if (e != 0 && *err == 0) *err = e, *syscall = "ioctl(UFFDIO_POISON)";
      } else {
        e = InstallZero(range, p, n, false);
        if (e != 0 && *err == 0)
          *err = e, *syscall = r.alias ? "ioctl(UFFDIO_CONTINUE)" : "ioctl(UFFDIO_ZEROPAGE)";
      }
      for (uint64_t i = 0; i < n; i++) {
        states_[ri][p + i].store(poison ? kTPoisoned : kTPresent);
        missing_.fetch_sub(1);
      }
      (poison ? stats_.poisonedPages : stats_.zeroedPages).fetch_add(n, std::memory_order_relaxed);
      done += n;
      p += n;
    }
  }
  CheckComplete();
  return done;
}

std::vector<uint64_t> TargetSession::Verify(uint16_t range, uint64_t maskOffset, uint64_t maskLength,
                                            bool* haveHashes) {
  std::vector<uint64_t> bad;
  const TargetRange& r = ranges_[range];
  const std::vector<uint64_t>& hashes = sourceHashes_[range];
  const std::vector<uint8_t>& got = sourceHashed_[range];
  *haveHashes = !hashes.empty();
  if (hashes.empty()) return bad;
  // Read through the alias where there is one: no fault on a page not mapped yet.
  uint64_t base = r.alias != 0 ? r.alias : r.address;
  for (uint64_t p = 0; p < r.pages; p++) {
    uint8_t s = states_[range][p].load();
    if (!got[p] || s == kTPoisoned || !Valid(s)) {
      bad.push_back(p);
      continue;
    }
    uint64_t h =
        PageHash(reinterpret_cast<const uint8_t*>(base + p * r.pageSize), r.pageSize, maskOffset, maskLength);
    if (h != hashes[p]) bad.push_back(p);
  }
  return bad;
}

void TargetSession::Error(int err, const std::string& syscall, const std::string& detail) {
  stats_.errors.fetch_add(1, std::memory_order_relaxed);
  SessionNotice n;
  n.kind = "error";
  n.err = err;
  n.channel = syscall;
  n.message = detail;
  notices_.Push(std::move(n));
}

std::deque<SessionNotice> TargetSession::TakeNotices() {
  std::deque<SessionNotice> out;
  if (engine_) {
    for (auto& e : engine_->TakeNotices()) {
      if (e.kind != Notice::kError) continue;
      SessionNotice n;
      n.kind = "error";
      n.err = e.err;
      n.channel = e.syscall;
      n.message = e.detail;
      out.push_back(std::move(n));
    }
  }
  notices_.TakeInto(&out);
  return out;
}

}  // namespace migration
