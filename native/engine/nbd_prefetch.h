// NbdPrefetch: a working set's background reads from an NBD server, in native code. JavaScript
// does the handshake (src/sources/nbd.ts) and hands over the connected sockets (simple or
// structured replies, whichever the connection negotiated); one thread here then pipelines NBD_CMD_READs over
// them, in the order given, and provides each reply's bytes to the FaultEngine, which installs them where
// pages are still missing. A working set is thousands of scattered 4 KiB reads: done in JavaScript, each cost
// ~11 us of promises, parsing and an N-API call, as much as the server's own work.
//
// It never retries and never decides a failure policy: at the first failure (an error reply,
// the connection closed, a malformed reply, no reply within the timeout) it stops, and
// JavaScript reads whatever it did not provide through its own path, which retries, reconnects
// and reports. No page is ever installed from bytes that are not the server's answer to that read.
#pragma once
#include <stdint.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

class FaultEngine;

struct NbdRead {
  uint64_t offset = 0;  // in the export, which is the range's source
  uint32_t length = 0;
};

struct NbdPrefetchOptions {
  // Reads in flight per connection, at most. How many are is adapted to the server: more while
  // replies come back in about the least round trip seen, fewer when they queue up (a local
  // server whose threads all run starves the threads that install the pages; a distant one
  // needs hundreds in flight to cover its round trip).
  uint32_t depth = 1024;
  uint32_t initialWindow = 64;
  uint64_t maxQueued = 64ull << 20;  // no new read while the engine holds this many bytes
  uint32_t timeoutMs = 30000;        // a read not answered within this long: failed
  uint64_t exportSize = 0;           // reads must lie inside it
};

class NbdPrefetch {
 public:
  // Takes the fds (closed by the destructor). `done` runs on the prefetch's thread once it ends.
  NbdPrefetch(FaultEngine* engine, uint32_t rangeId, std::vector<int> fds, std::vector<NbdRead> reads,
              const NbdPrefetchOptions& options, std::function<void()> done);
  ~NbdPrefetch();
  NbdPrefetch(const NbdPrefetch&) = delete;
  NbdPrefetch& operator=(const NbdPrefetch&) = delete;

  // 0, or an errno (the eventfd or the thread could not be made).
  int Start();
  // Ends the thread (reads in flight are abandoned) and joins it. Idempotent.
  void Stop();

  bool finished() const { return finished_.load(); }
  // After finished(): per read, whether its bytes were provided; and the failure, if any.
  std::vector<uint8_t> Provided() const;
  int error() const { return error_; }
  const std::string& detail() const { return detail_; }
  uint64_t bytes() const { return bytes_.load(); }

 private:
  struct Connection;
  void Run();
  bool Fill(Connection& c);
  bool Flush(Connection& c);
  bool Receive(Connection& c);
  bool Parse(Connection& c);
  bool Chunk(Connection& c, uint64_t cookie, uint16_t type, const uint8_t* payload, size_t n);
  bool ReadFailed(uint32_t err, const NbdRead& r);
  void Fail(int err, const std::string& detail);
  void Adapt(Connection& c, uint64_t latencyNs);

  FaultEngine* engine_;
  uint32_t rangeId_;
  std::vector<std::unique_ptr<Connection>> conns_;
  std::vector<NbdRead> reads_;
  std::vector<uint8_t>
      state_;  // per read: kReadTodo, kReadInFlight, kReadProvided (this thread's, until finished)
  std::vector<uint64_t> sentNs_;                 // per read: when it was sent
  std::vector<uint32_t> covered_;                // per read: bytes its reply has brought so far
  std::shared_ptr<std::vector<uint8_t>> zeros_;  // what holes are provided from
  uint64_t rttMinNs_ = UINT64_MAX;
  NbdPrefetchOptions options_;
  std::function<void()> done_;
  size_t next_ = 0;  // the next read to send
  size_t provided_ = 0;
  int stopFd_ = -1;
  std::thread thread_;
  std::atomic<bool> finished_{false};
  std::atomic<uint64_t> bytes_{0};
  int error_ = 0;
  std::string detail_;
  std::once_flag stopped_;
};
