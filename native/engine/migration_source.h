// The sending half of a migration (the process that has the memory). JS drives the phases and
// the handshake; this does the per-page work on its own threads:
//  - the pusher sends pre-copy rounds (runs of pages, read straight from the ranges by sendmsg:
//    no copy in user space) and, in post-copy, every page not sent yet, starting where the latest
//    demand fault was (locality), optionally rate-limited;
//  - the demand server (the demand channel's reader) answers the target's page requests on that
//    channel, which never carries the push, so a request never queues behind it;
//  - the main channel's reader hands control frames to JS and applies the target's HAVE bitmap
//    after a reconnect.
// In post-copy, a page is sent once: pusher and demand server claim it in one atomic bitmap, and
// a request for a page already claimed by the push is left to the push (counted). After a lost
// connection, HAVE (what the target really has) replaces the bitmap, so a page lost in flight is
// sent again and a page that arrived never is.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/migration_channel.h"
#include "engine/migration_channel_pair.h"
#include "engine/migration_notices.h"

namespace migration {

struct SourceRange {
  uint64_t address = 0;
  uint64_t length = 0;
  uint64_t pageSize = 4096;
  uint64_t pages = 0;
};

struct Run {
  uint16_t range = 0;
  uint64_t page = 0;
  uint64_t count = 0;
};

struct SourceOptions {
  uint32_t pingMs = 100;
  uint64_t chunkBytes = 256 * 1024;  // bytes per PAGES frame (at least one page)
  // Post-copy (postcopyPriority: src/migration/common.ts postcopyTuning). 0: leave as it is.
  uint64_t pushChunkBytes = 0;  // bytes per PAGES frame of the push (0: chunkBytes)
  uint32_t postcopyBuffer = 0;  // SO_SNDBUF of the main channel
  uint32_t notsentLowat = 0;    // TCP_NOTSENT_LOWAT of the main channel
  int pushNice = 0;             // the pusher's nice value (below 0 needs CAP_SYS_NICE)
  bool realtimeDemand = false;  // the demand channel's thread under SCHED_FIFO 1 (where permitted)
};

struct SourceStats {
  std::atomic<uint64_t> precopyPages{0}, precopyZeroPages{0}, pushedPages{0}, demandPages{0}, zeroPages{0},
      requests{0}, requestsForSent{0}, resentPages{0}, rounds{0}, pushBytes{0};
};

class SourceSession {
 public:
  SourceSession(std::vector<SourceRange> ranges, SourceOptions options, std::function<void()> wakeJs);
  ~SourceSession();

  // Channels handed over by JS after the handshake (the fd is owned from here on).
  // Each returns the channel's generation, which its 'closed' notice carries (notice.id).
  // `initial`: bytes of the stream already read (frames that followed the handshake).
  uint64_t AttachMain(int fd, std::vector<uint8_t> initial = {});
  uint64_t AttachDemand(int fd, std::vector<uint8_t> initial = {});
  // Connection lost (or closing): shuts both channels, joins their threads, pauses the push.
  void Detach();
  void Close();

  void EnqueueMain(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload);
  void EnqueueDemand(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload);

  // Pre-copy: the pusher sends these runs on the main channel, then notices round `id`.
  void SendRuns(uint64_t id, std::vector<Run> runs);
  // Post-copy: every page not in `toCome` counts as sent; the rest is served on demand and, with
  // `push`, pushed in the background.
  void StartPostcopy(const std::vector<Run>& toCome, bool push);
  void ResumePush();
  void SetPush(bool on);
  // Post-copy: the main channel's send buffer and unsent-bytes bound (a short queue of push
  // packets ahead of a demand page's in the network stack, without capping the window).
  void TuneMainForPostcopy();
  void SetPushRate(uint64_t bytesPerSecond) { pushRate_.store(bytesPerSecond); }

  std::deque<SessionNotice> TakeNotices();
  const SourceStats& stats() const { return stats_; }
  uint64_t unsent() const;
  uint64_t wireBytes() const { return channels_.wireBytes(); }
  uint64_t lastReceiveNs() const;

 private:
  void MainLoop(FrameChannel* ch, uint64_t gen);
  void DemandLoop(FrameChannel* ch, uint64_t gen);
  // The next whole frame a reader takes, checked for its channel (`role`). False when the channel
  // ended or broke the protocol, its 'closed' notice pushed: the reader returns.
  bool ReadFrame(FrameChannel* ch, const char* name, Role role, uint64_t gen, FrameHeader* h,
                 std::vector<uint8_t>* payload);
  void PushLoop();
  // Sends [page, page + count) of a range as PAGES/ZERO frames of at most chunkBytes. 0 or errno.
  int SendPages(FrameChannel* ch, uint16_t range, uint64_t page, uint64_t count, bool demand);
  // Claims the unsent pages of [page, page + count) and sends them as contiguous runs.
  int ServeRequest(FrameChannel* ch, uint16_t range, uint64_t page, uint64_t count);
  bool Claim(uint16_t range, uint64_t page);
  bool NextUnsent(uint16_t* range, uint64_t* page);
  void ApplyHave(uint16_t range, uint64_t first, const uint8_t* bits, size_t bytes);

  std::vector<SourceRange> ranges_;
  std::vector<RangeShape> shapes_;
  SourceOptions options_;
  ChannelPair channels_;

  // Post-copy bitmap of pages sent (or known to be at the target).
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> sent_;
  std::atomic<uint64_t> unsent_{0};
  std::atomic<bool> postcopy_{false};
  std::atomic<bool> push_{false};
  std::atomic<bool> pushPaused_{false};
  std::atomic<uint32_t> cursorRange_{0};
  std::atomic<uint64_t> cursorPage_{0};
  std::atomic<uint64_t> pushRate_{0};

  std::mutex pushMu_;
  std::condition_variable pushCv_;
  struct Round {
    uint64_t id;
    std::vector<Run> runs;
  };
  std::deque<Round> rounds_;
  bool stopping_ = false;
  std::thread pusher_;

  NoticeQueue notices_;
  SourceStats stats_;
};

}  // namespace migration
