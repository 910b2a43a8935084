#include "engine/migration_channel.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <string.h>

#include <algorithm>
#include <chrono>

namespace migration {

bool RaiseToRealtime() {
  struct sched_param param = {};
  param.sched_priority = 1;
  return pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) == 0;
}

bool SetThreadNice(int nice) {
  return setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice) == 0;
}

FrameChannel::FrameChannel(int fd, uint32_t pingMs) : fd_(fd), pingMs_(pingMs) {
  lastReceiveNs.store(NowNs());
  lastSendNs_.store(NowNs());
}

FrameChannel::~FrameChannel() {
  Shutdown();
  Join();
  if (fd_ >= 0) close(fd_);
}

void FrameChannel::Start(std::function<void()> loop) {
  reader_ = std::thread(std::move(loop));
  keeper_ = std::thread([this] { KeeperLoop(); });
}

int FrameChannel::ReadFull(void* buf, size_t n) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  if (pendingAt_ < pending_.size()) {
    size_t k = std::min(n, pending_.size() - pendingAt_);
    memcpy(p, pending_.data() + pendingAt_, k);
    pendingAt_ += k;
    p += k;
    n -= k;
    bytesIn.fetch_add(k, std::memory_order_relaxed);
  }
  while (n > 0) {
    ssize_t got = recv(fd_, p, n, MSG_WAITALL);
    if (got > 0) {
      p += got;
      n -= static_cast<size_t>(got);
      bytesIn.fetch_add(static_cast<uint64_t>(got), std::memory_order_relaxed);
      lastReceiveNs.store(NowNs(), std::memory_order_relaxed);
      continue;
    }
    if (got == 0) return EPIPE;
    if (errno == EINTR) continue;
    return errno;
  }
  return 0;
}

int FrameChannel::Skip(size_t n) {
  uint8_t sink[16384];
  while (n > 0) {
    size_t chunk = n < sizeof sink ? n : sizeof sink;
    int err = ReadFull(sink, chunk);
    if (err != 0) return err;
    n -= chunk;
  }
  return 0;
}

int FrameChannel::ReadHeader(FrameHeader* h) {
  uint8_t raw[kHeaderSize];
  int err = ReadFull(raw, sizeof raw);
  if (err == 0) *h = DecodeHeader(raw);
  return err;
}

int FrameChannel::Write(const FrameHeader& h, const struct iovec* payload, int count) {
  uint8_t raw[kHeaderSize];
  EncodeHeader(h, raw);
  struct iovec iov[8];
  if (count > 7) return EINVAL;
  iov[0] = {raw, sizeof raw};
  for (int i = 0; i < count; i++) iov[i + 1] = payload[i];
  int n = count + 1;
  struct iovec* cur = iov;
  std::lock_guard<std::mutex> lock(writeMu_);
  if (shutdown_.load()) return EPIPE;
  while (n > 0) {
    struct msghdr msg = {};
    msg.msg_iov = cur;
    msg.msg_iovlen = static_cast<size_t>(n);
    ssize_t sent = sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    bytesOut.fetch_add(static_cast<uint64_t>(sent), std::memory_order_relaxed);
    size_t left = static_cast<size_t>(sent);
    while (n > 0 && left >= cur->iov_len) {
      left -= cur->iov_len;
      cur++;
      n--;
    }
    if (n > 0) {
      cur->iov_base = static_cast<uint8_t*>(cur->iov_base) + left;
      cur->iov_len -= left;
    }
  }
  lastSendNs_.store(NowNs(), std::memory_order_relaxed);
  return 0;
}

int FrameChannel::WriteBytes(uint8_t type, uint16_t range, uint64_t page, const void* data, size_t length) {
  FrameHeader h;
  h.type = type;
  h.range = range;
  h.page = page;
  h.length = static_cast<uint32_t>(length);
  struct iovec iov = {const_cast<void*>(data), length};
  return Write(h, &iov, length > 0 ? 1 : 0);
}

void FrameChannel::Enqueue(uint8_t type, uint16_t range, uint64_t page, std::vector<uint8_t> payload) {
  Queued q;
  q.header.type = type;
  q.header.range = range;
  q.header.page = page;
  q.header.length = static_cast<uint32_t>(payload.size());
  q.payload = std::move(payload);
  {
    std::lock_guard<std::mutex> lock(queueMu_);
    queue_.push_back(std::move(q));
  }
  queueCv_.notify_one();
}

void FrameChannel::KeeperLoop() {
  while (!shutdown_.load()) {
    std::deque<Queued> batch;
    {
      std::unique_lock<std::mutex> lock(queueMu_);
      queueCv_.wait_for(lock, std::chrono::milliseconds(pingMs_ > 0 ? pingMs_ : 1000),
                        [&] { return shutdown_.load() || !queue_.empty(); });
      batch.swap(queue_);
    }
    for (auto& q : batch) {
      struct iovec iov = {q.payload.data(), q.payload.size()};
      if (Write(q.header, &iov, q.payload.empty() ? 0 : 1) != 0) return;
    }
    uint64_t now = NowNs();
    if (pingMs_ > 0 && now - lastSendNs_.load(std::memory_order_relaxed) >= pingMs_ * 1000000ull) {
      uint8_t stamp[8];
      StoreU64(stamp, now);
      if (WriteBytes(kPing, 0, 0, stamp, sizeof stamp) != 0) return;
    }
  }
}

void FrameChannel::Shutdown() {
  if (shutdown_.exchange(true)) return;
  ::shutdown(fd_, SHUT_RDWR);
  { std::lock_guard<std::mutex> lock(queueMu_); }
  queueCv_.notify_all();
}

void FrameChannel::Join() {
  if (reader_.joinable() && reader_.get_id() != std::this_thread::get_id()) reader_.join();
  if (keeper_.joinable() && keeper_.get_id() != std::this_thread::get_id()) keeper_.join();
}

}  // namespace migration
