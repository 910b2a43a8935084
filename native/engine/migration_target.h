// The receiving half of a migration. JS does the handshake and the phase changes; this receives
// and installs pages on the channels' reader threads and serves the faults of the target's
// workload through a FaultEngine whose ranges delegate to it (FaultDelegate):
//  - before the switchover nothing is registered and the workload does not run: pages go
//    straight from the socket into place (anonymous memory: the range itself; memfd/hugetlbfs:
//    the page cache, through an unregistered alias mapping). One copy, by the kernel.
//  - after it, a fault on a page not here yet sends a REQUEST on the demand channel from the
//    engine's thread; whichever channel brings the page first installs it (UFFDIO_COPY from a
//    bounce buffer for anonymous memory; for memfd/hugetlbfs, into the page cache through the
//    alias and then UFFDIO_CONTINUE, so no page is copied twice) and that wakes the faulting
//    threads. MINOR faults on pages already in the page cache need only UFFDIO_CONTINUE.
// Every page has one atomic state; a page is filled only by whoever moves it to kFilling, and a
// page installed in the target's mapping (the workload may have written it since) is never
// written again: a late or duplicate copy is read off the wire and dropped (counted).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/fault_engine.h"
#include "engine/latency_histogram.h"
#include "engine/migration_channel.h"
#include "engine/migration_channel_pair.h"
#include "engine/migration_notices.h"
#include "engine/migration_source.h"

namespace migration {

enum TargetPage : uint8_t {
  kTMissing = 0,    // not here (or stale: must be fetched before it is installed)
  kTPresent = 1,    // installed in the target's mapping: never written by us again
  kTCached = 2,     // memfd/hugetlbfs: valid in the page cache, not mapped yet (MINOR -> CONTINUE)
  kTZero = 3,       // valid and all zeros, not installed yet
  kTRequested = 4,  // missing and asked for on the demand channel
  kTFilling = 5,    // being filled by one thread
  kTPoisoned = 6,   // the source is gone: poisoned (touching it raises SIGBUS)
};

struct TargetRange {
  uint64_t address = 0;  // the target's mapping (registered at the switchover)
  uint64_t length = 0;
  uint64_t pageSize = 4096;
  uint64_t pages = 0;
  uint64_t alias = 0;  // memfd/hugetlbfs: an unregistered mapping of the same file; 0: anonymous
  int memfd = -1;      // for FALLOC_FL_PUNCH_HOLE (owned by the mapping, not by us)
};

struct TargetOptions {
  uint32_t pingMs = 100;
  uint32_t spinUs = 0;     // the engine's adaptive spin bound
  uint32_t readSize = 64;  // the engine's messages per read(2)
  // Post-copy (postcopyPriority: src/migration/common.ts postcopyTuning). 0: leave as it is.
  uint32_t postcopyBuffer = 0;  // SO_RCVBUF of the main channel
  int bulkNice = 0;             // the main channel's reader's nice value (below 0 needs CAP_SYS_NICE)
  bool realtimeDemand = false;  // the demand channel's reader and the engine's thread under SCHED_FIFO 1
};

struct TargetStats {
  std::atomic<uint64_t> precopyPages{0}, zeroPages{0}, pushedPages{0}, demandPages{0}, duplicatePages{0},
      discardedPages{0}, faults{0}, requests{0}, resentRequests{0}, continues{0}, poisonedPages{0},
      zeroedPages{0}, errors{0};
};

class TargetSession {
 public:
  TargetSession(std::vector<TargetRange> ranges, TargetOptions options, std::function<void()> wakeJs);
  ~TargetSession();

  // Each returns the channel's generation, which its 'closed' notice carries (notice.id).
  // `initial`: bytes of the stream already read (frames that followed the handshake).
  uint64_t AttachMain(int fd, std::vector<uint8_t> initial = {});
  uint64_t AttachDemand(int fd, std::vector<uint8_t> initial = {});
  void Detach();
  void Close();
  void EnqueueMain(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload);

  // The switchover: JS has registered the ranges with `uffd` (anonymous: MISSING; memfd and
  // hugetlbfs: MISSING | MINOR). Pages are installed with the fill ioctls from now on and the
  // engine serves faults. 0 or an errno (*syscall set).
  int StartServing(int uffd, std::string* syscall);
  // JS registered the ranges with `uffd` before anything arrived: anonymous pages are installed
  // with UFFDIO_COPY from here on (no zeroing of fresh pages), pre-copy included. 0 or an errno.
  int Registered(int uffd, std::string* syscall);
  // Before anything arrives, for memory handed to us (old contents): drops the anonymous ranges
  // (post-copy: every page will be fetched), or (pre-copy: every page will be overwritten)
  // populates them, after which pre-copy pages are received straight into place.
  void DropUnreceived();
  int Populate(std::string* syscall);
  void StopServing();
  // After a reconnect: asks again for every page still requested.
  void ResendRequests();
  // Bit i: page `first + i` of the range is here (any valid state).
  std::vector<uint8_t> HaveBitmap(uint16_t range) const;
  // The source is gone: every page not here is poisoned (or zero-filled). Returns pages done.
  uint64_t Settle(bool poison, int* err, std::string* syscall);
  // Pages of the range whose hash differs from the source's (HASHES frames); the mask leaves
  // bytes out of each page. Poisoned pages count as different. -1 in *missingHashes if none came.
  std::vector<uint64_t> Verify(uint16_t range, uint64_t maskOffset, uint64_t maskLength, bool* haveHashes);

  uint64_t missing() const { return missing_.load(); }
  bool serving() const { return serving_.load(); }
  std::deque<SessionNotice> TakeNotices();
  const TargetStats& stats() const { return stats_; }
  const LatencyHistogram& latency() const { return latency_; }
  uint64_t wireBytes() const { return channels_.wireBytes(); }
  uint64_t lastReceiveNs() const;
  const EngineStats* engineStats() const { return engine_ ? &engine_->stats() : nullptr; }

  void OnFault(uint16_t range, uint64_t address, uint64_t flags);

 private:
  void ReaderLoop(FrameChannel* ch, bool demand, uint64_t gen);
  int ReceivePages(FrameChannel* ch, const FrameHeader& h, std::vector<uint8_t>* staging, bool demand);
  int ApplyZero(uint16_t range, uint64_t page, uint64_t count);
  int ApplyDiscard(const uint8_t* entries, size_t count, std::string* bad);
  bool Claim(uint16_t range, uint64_t page, uint8_t* was);
  void Installed(uint16_t range, uint64_t page, uint64_t count, const uint8_t* was, bool demand);
  int InstallZero(uint16_t range, uint64_t page, uint64_t count, bool minor);
  int Continue(uint16_t range, uint64_t page, uint64_t count);
  void SendRequest(uint16_t range, uint64_t page, uint64_t count);
  void SetValid(uint16_t range, uint64_t page, uint8_t to);
  void Error(int err, const std::string& syscall, const std::string& detail);
  void CheckComplete();

  std::vector<TargetRange> ranges_;
  std::vector<RangeShape> shapes_;
  TargetOptions options_;
  std::function<void()> wakeJs_;
  int uffd_ = -1;
  std::atomic<bool> registered_{false};
  std::atomic<bool> populated_{false};  // anonymous ranges populated: pre-copy recv(2)s in place
  bool engineRaised_ = false;           // engine thread only
  std::atomic<bool> serving_{false};
  std::unique_ptr<FaultEngine> engine_;

  std::vector<std::unique_ptr<std::atomic<uint8_t>[]>> states_;
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> requestedAt_;
  std::vector<std::vector<uint64_t>> sourceHashes_;
  std::vector<std::vector<uint8_t>> sourceHashed_;
  std::atomic<uint64_t> missing_{0};
  std::atomic<bool> completeNoticed_{false};
  std::vector<uint8_t> zeros_;  // one page of zeros, for hugetlbfs COPY

  ChannelPair channels_;
  NoticeQueue notices_;
  TargetStats stats_;
  LatencyHistogram latency_;
};

}  // namespace migration
