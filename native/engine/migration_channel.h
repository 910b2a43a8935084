// One connected stream socket of a migration, carrying frames (migration_wire.h) after the
// handshake that JS did on it. It owns the fd and two threads:
//  - the reader, running the session's loop (which reads frames with ReadFull/Skip);
//  - the keeper, writing frames queued from the JS thread (which must never block on a socket)
//    and a PING whenever nothing was sent for `pingMs`, so that the peer can tell a silent link
//    from an idle one.
// Any thread may also Write() a frame directly (the pusher, the engine's demand thread): frames
// are written whole under one mutex, so they never interleave.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/migration_wire.h"
#include "engine/util.h"

namespace migration {

// The calling thread to SCHED_FIFO priority 1 (the demand path: it must not wait behind bulk
// work for a CPU). Best effort: without CAP_SYS_NICE it stays as it was. Returns whether it did.
bool RaiseToRealtime();
// The calling thread's nice value (bulk work in post-copy: ahead of the workload's threads for a
// CPU, behind the demand path). Best effort: below 0 needs CAP_SYS_NICE. Returns whether it did.
bool SetThreadNice(int nice);

class FrameChannel {
 public:
  FrameChannel(int fd, uint32_t pingMs);
  ~FrameChannel();
  FrameChannel(const FrameChannel&) = delete;
  FrameChannel& operator=(const FrameChannel&) = delete;

  // Bytes read off the socket before the channel was handed over (frames that followed the
  // handshake in the same segment): the reader takes them first. Before Start() only.
  void Prefill(std::vector<uint8_t> bytes) { pending_ = std::move(bytes); }
  // Starts the reader (running `loop`) and the keeper. `loop` returns when the channel ends.
  void Start(std::function<void()> loop);

  // Reader thread only. 0, or an errno (EPIPE: the peer closed the connection).
  int ReadFull(void* buf, size_t n);
  int Skip(size_t n);
  int ReadHeader(FrameHeader* h);

  // Any thread: writes one whole frame (header + payload pieces). 0 or an errno.
  int Write(const FrameHeader& h, const struct iovec* payload = nullptr, int count = 0);
  int WriteBytes(uint8_t type, uint16_t range, uint64_t page, const void* data, size_t length);
  // JS thread: queues a frame for the keeper (never blocks).
  void Enqueue(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload);

  // Unblocks every read and write (shutdown(2)); the threads then end. Idempotent.
  void Shutdown();
  // Joins both threads (not from one of them).
  void Join();
  bool shutDown() const { return shutdown_.load(); }
  int fd() const { return fd_; }

  std::atomic<uint64_t> lastReceiveNs{0};
  std::atomic<uint64_t> bytesIn{0};
  std::atomic<uint64_t> bytesOut{0};

 private:
  void KeeperLoop();

  int fd_;
  uint32_t pingMs_;
  std::vector<uint8_t> pending_;  // Prefill()'s bytes not read yet (reader thread)
  size_t pendingAt_ = 0;
  std::atomic<bool> shutdown_{false};
  std::mutex writeMu_;
  std::atomic<uint64_t> lastSendNs_{0};
  std::mutex queueMu_;
  std::condition_variable queueCv_;
  struct Queued {
    FrameHeader header;
    std::vector<uint8_t> payload;
  };
  std::deque<Queued> queue_;
  std::thread reader_;
  std::thread keeper_;
};

}  // namespace migration
