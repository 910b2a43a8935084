#include "engine/nbd_prefetch.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <deque>

#include "engine/fault_engine.h"
#include "engine/util.h"

namespace {

constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdDisc = 2;
constexpr size_t kRequestSize = 28;
// Our cookies carry the top bit (the JS client's handles count from 1): on a connection borrowed
// from it, a reply to one of its reads can never pass for one of ours.
constexpr uint64_t kCookieTag = 1ull << 63;
constexpr size_t kReplySize = 16;
constexpr size_t kChunkHeadSize = 20;  // a structured reply chunk's header
constexpr uint16_t kReplyFlagDone = 1;
constexpr uint16_t kReplyNone = 0;
constexpr uint16_t kReplyOffsetData = 1;
constexpr uint16_t kReplyOffsetHole = 2;
// Replies are read into chunks of this size; a chunk is lent to the engine by the payloads in it
// and freed once the last is installed (one allocation per 256 KiB, no copy per page).
constexpr size_t kChunk = 256 * 1024;
// Less room than this left in a chunk: the next read goes into a new one.
constexpr size_t kMinRoom = 16 * 1024;

enum : uint8_t { kReadTodo = 0, kReadInFlight = 1, kReadProvided = 2 };

void Put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (24 - 8 * i));
}
void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (56 - 8 * i));
}
uint32_t Get32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint64_t Get64(const uint8_t* p) {
  return (uint64_t{Get32(p)} << 32) | Get32(p + 4);
}

void PutRequest(uint8_t* p, uint16_t type, uint64_t cookie, uint64_t offset, uint32_t length) {
  Put32(p, kRequestMagic);
  Put16(p + 4, 0);  // flags
  Put16(p + 6, type);
  Put64(p + 8, cookie);
  Put64(p + 16, offset);
  Put32(p + 24, length);
}

}  // namespace

struct NbdPrefetch::Connection {
  int fd = -1;
  std::vector<uint8_t> out;  // requests not yet written
  size_t outAt = 0;
  std::shared_ptr<std::vector<uint8_t>> in;  // the chunk replies are read into
  size_t inAt = 0;                           // first byte not parsed
  size_t inHave = 0;                         // bytes read into it
  uint32_t inflight = 0;
  double window = 0;     // reads in flight it may have now (see Adapt)
  uint64_t roundNs = 0;  // latencies summed over this round of replies, and their count
  uint32_t roundCount = 0;
  uint64_t lastNs = 0;      // when bytes last came
  std::deque<size_t> sent;  // reads sent, oldest first (answered ones dropped from the front lazily)
};

NbdPrefetch::NbdPrefetch(FaultEngine* engine, uint32_t rangeId, std::vector<int> fds,
                         std::vector<NbdRead> reads, const NbdPrefetchOptions& options,
                         std::function<void()> done)
    : engine_(engine),
      rangeId_(rangeId),
      reads_(std::move(reads)),
      state_(reads_.size(), kReadTodo),
      sentNs_(reads_.size(), 0),
      covered_(reads_.size(), 0),
      options_(options),
      done_(std::move(done)) {
  if (options_.depth < 1) options_.depth = 1;
  options_.initialWindow = std::max<uint32_t>(1, std::min(options_.initialWindow, options_.depth));
  for (int fd : fds) {
    auto c = std::make_unique<Connection>();
    c->fd = fd;
    c->window = options_.initialWindow;
    conns_.push_back(std::move(c));
  }
}

NbdPrefetch::~NbdPrefetch() {
  Stop();
  for (auto& c : conns_)
    if (c->fd >= 0) close(c->fd);
  if (stopFd_ >= 0) close(stopFd_);
}

int NbdPrefetch::Start() {
  stopFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stopFd_ < 0) return errno;
  for (auto& c : conns_) {
    int flags = fcntl(c->fd, F_GETFL);
    if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) < 0) return errno;
  }
  try {
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "uffd-nbd");
      Run();
    });
  } catch (const std::system_error& e) {
    return e.code().value() != 0 ? e.code().value() : EAGAIN;
  }
  return 0;
}

void NbdPrefetch::Stop() {
  std::call_once(stopped_, [this] {
    if (stopFd_ >= 0) {
      uint64_t one = 1;
      ssize_t ignored = write(stopFd_, &one, sizeof one);
      (void)ignored;
    }
    if (thread_.joinable()) thread_.join();
  });
}

std::vector<uint8_t> NbdPrefetch::Provided() const {
  std::vector<uint8_t> out(state_.size());
  for (size_t i = 0; i < state_.size(); i++) out[i] = state_[i] == kReadProvided ? 1 : 0;
  return out;
}

void NbdPrefetch::Fail(int err, const std::string& detail) {
  if (error_ != 0) return;
  error_ = err != 0 ? err : EIO;
  detail_ = detail;
}

// Queues requests while the connection has room and the engine keeps up.
bool NbdPrefetch::Fill(Connection& c) {
  const uint64_t now = NowNs();
  while (c.inflight < static_cast<uint32_t>(c.window) && next_ < reads_.size() &&
         engine_->providedQueued() <= options_.maxQueued) {
    const NbdRead& r = reads_[next_];
    if (r.length == 0 || r.offset + r.length > options_.exportSize) {
      Fail(EINVAL, "a read outside the export");
      return false;
    }
    size_t at = c.out.size();
    c.out.resize(at + kRequestSize);
    PutRequest(c.out.data() + at, kCmdRead, kCookieTag | next_, r.offset, r.length);
    sentNs_[next_] = now;
    c.sent.push_back(next_);
    state_[next_++] = kReadInFlight;
    c.inflight++;
  }
  return true;
}

bool NbdPrefetch::Flush(Connection& c) {
  while (c.outAt < c.out.size()) {
    // send(MSG_NOSIGNAL): a server gone is an EPIPE here, never a SIGPIPE for the process
    ssize_t n = send(c.fd, c.out.data() + c.outAt, c.out.size() - c.outAt, MSG_NOSIGNAL);
    if (n > 0) {
      c.outAt += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    Fail(n < 0 ? errno : EPIPE, "send(NBD_CMD_READ)");
    return false;
  }
  c.out.clear();
  c.outAt = 0;
  return true;
}

// Reads what the socket has (a few chunks at most: the other connections get their turn).
bool NbdPrefetch::Receive(Connection& c) {
  for (int turn = 0; turn < 8; turn++) {
    if (!c.in || c.in->size() - c.inHave < kMinRoom) {
      // a new chunk, with the unparsed tail: the old one may be lent to the engine
      size_t tail = c.inHave - c.inAt;
      auto fresh = std::make_shared<std::vector<uint8_t>>(std::max(kChunk, tail + kMinRoom));
      if (tail > 0) memcpy(fresh->data(), c.in->data() + c.inAt, tail);
      c.in = std::move(fresh);
      c.inAt = 0;
      c.inHave = tail;
    }
    ssize_t n = read(c.fd, c.in->data() + c.inHave, c.in->size() - c.inHave);
    if (n > 0) {
      c.inHave += static_cast<size_t>(n);
      c.lastNs = NowNs();
      if (!Parse(c)) return false;
      continue;
    }
    if (n == 0) {
      Fail(ECONNRESET, "the server closed the connection");
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
    Fail(errno, "read(NBD reply)");
    return false;
  }
  return true;
}

// Every whole message in the chunk: simple replies, and structured reply chunks (a connection
// that negotiated them: data, holes, errors), whose bytes go to the engine as they come.
bool NbdPrefetch::Parse(Connection& c) {
  for (;;) {
    size_t have = c.inHave - c.inAt;
    if (have < 4) break;
    const uint8_t* h = c.in->data() + c.inAt;
    uint32_t magic = Get32(h);
    bool structured = magic == kStructuredReplyMagic;
    if (!structured && magic != kSimpleReplyMagic) {
      Fail(EPROTO, "bad reply magic " + Hex(magic));
      return false;
    }
    size_t head = structured ? kChunkHeadSize : kReplySize;
    if (have < head) break;
    uint64_t tagged = Get64(h + 8);
    uint64_t cookie = tagged & ~kCookieTag;
    if ((tagged & kCookieTag) == 0 || cookie >= reads_.size() || state_[cookie] != kReadInFlight) {
      Fail(EPROTO, "a reply for a read not in flight (" + Hex(tagged) + ")");
      return false;
    }
    const NbdRead& r = reads_[cookie];
    uint32_t err = structured ? 0 : Get32(h + 4);
    if (err != 0) return ReadFailed(err, r);
    size_t payload = structured ? Get32(h + 16) : r.length;
    if (payload > uint64_t{r.length} + 64 * 1024) {
      Fail(EPROTO, "a reply chunk larger than its read");
      return false;
    }
    size_t whole = head + payload;
    if (have < whole) {
      // Wait for the rest; make room for all of it now if this chunk cannot hold it.
      if (c.in->size() - c.inAt < whole) {
        auto fresh = std::make_shared<std::vector<uint8_t>>(std::max(kChunk, whole + kMinRoom));
        memcpy(fresh->data(), h, have);
        c.in = std::move(fresh);
        c.inAt = 0;
        c.inHave = have;
      }
      break;
    }
    c.inAt += whole;
    bool done = true;
    if (structured) {
      uint16_t flags = static_cast<uint16_t>((h[4] << 8) | h[5]);
      uint16_t type = static_cast<uint16_t>((h[6] << 8) | h[7]);
      done = (flags & kReplyFlagDone) != 0;
      if (!Chunk(c, cookie, type, h + head, payload)) return false;
    } else {
      engine_->Provide(rangeId_, r.offset, h + kReplySize, r.length, std::shared_ptr<void>(c.in));
      covered_[cookie] = r.length;
    }
    if (!done) continue;
    if (covered_[cookie] != r.length) {
      Fail(EPROTO, "a reply that did not cover its read at " + Hex(r.offset));
      return false;
    }
    Adapt(c, c.lastNs > sentNs_[cookie] ? c.lastNs - sentNs_[cookie] : 0);
    state_[cookie] = kReadProvided;
    provided_++;
    bytes_.fetch_add(r.length, std::memory_order_relaxed);
    c.inflight--;
  }
  return true;
}

bool NbdPrefetch::ReadFailed(uint32_t err, const NbdRead& r) {
  // NBD's error values are Linux errno values (EIO, ENOMEM, EINVAL, ...)
  Fail(err != 0 && err < 4096 ? static_cast<int>(err) : EIO,
       "the server failed a read at " + Hex(r.offset) + " (+" + std::to_string(r.length) + ")");
  return false;
}

// One structured reply chunk of read `cookie`: data and holes (zeros) provided where they fall
// inside the read (the engine installs the whole pages among them: a page split between chunks
// is left to a fault), errors fail the prefetch, unknown informational chunks are skipped.
bool NbdPrefetch::Chunk(Connection& c, uint64_t cookie, uint16_t type, const uint8_t* p, size_t n) {
  const NbdRead& r = reads_[cookie];
  auto inside = [&](uint64_t at, uint64_t len) { return at >= r.offset && at + len <= r.offset + r.length; };
  switch (type) {
    case kReplyNone:
      return true;
    case kReplyOffsetData: {
      if (n < 8 || !inside(Get64(p), n - 8)) break;
      engine_->Provide(rangeId_, Get64(p), p + 8, n - 8, std::shared_ptr<void>(c.in));
      covered_[cookie] += static_cast<uint32_t>(n - 8);
      return true;
    }
    case kReplyOffsetHole: {
      if (n != 12 || !inside(Get64(p), Get32(p + 8))) break;
      uint64_t at = Get64(p);
      uint32_t size = Get32(p + 8);
      if (!zeros_ || zeros_->size() < size) zeros_ = std::make_shared<std::vector<uint8_t>>(size);
      engine_->Provide(rangeId_, at, zeros_->data(), size, zeros_);
      covered_[cookie] += size;
      return true;
    }
    default:
      if (type & 0x8000) return ReadFailed(n >= 4 ? Get32(p) : EIO, r);
      return true;  // an informational chunk this client does not know: the spec lets it be ignored
  }
  Fail(EPROTO,
       "a malformed reply chunk (type " + std::to_string(type) + ") for the read at " + Hex(r.offset));
  return false;
}

// Once per round (a window's worth of replies): replies that took about the least round trip
// seen mean the server has room, so the window grows; replies that queued (over twice that, plus
// a millisecond) shrink it. Delay-based, as TCP Vegas: a loss-free way to find the depth that
// covers the round trip without piling reads up in the server.
void NbdPrefetch::Adapt(Connection& c, uint64_t latencyNs) {
  rttMinNs_ = std::min(rttMinNs_, latencyNs);
  c.roundNs += latencyNs;
  if (++c.roundCount < std::max<uint32_t>(8, static_cast<uint32_t>(c.window))) return;
  uint64_t mean = c.roundNs / c.roundCount;
  c.roundNs = 0;
  c.roundCount = 0;
  if (mean > 2 * rttMinNs_ + 1000000)
    c.window = std::max(4.0, c.window * 0.7);
  else
    c.window = std::min<double>(options_.depth, c.window * 1.5);
}

void NbdPrefetch::Run() {
  std::vector<pollfd> fds(conns_.size() + 1);
  bool stopped = false;
  while (error_ == 0 && provided_ < reads_.size()) {
    bool throttled = false;
    for (auto& c : conns_) {
      if (!Fill(*c) || !Flush(*c)) break;
      if (next_ < reads_.size() && c->inflight < static_cast<uint32_t>(c->window)) throttled = true;
    }
    if (error_ != 0) break;
    fds[0] = {stopFd_, POLLIN, 0};
    for (size_t i = 0; i < conns_.size(); i++) {
      Connection& c = *conns_[i];
      fds[i + 1] = {c.fd, static_cast<short>(POLLIN | (c.outAt < c.out.size() ? POLLOUT : 0)), 0};
    }
    // Throttled (the engine holds maxQueued bytes): look again soon. Else wake for the timeout.
    int wait = throttled ? 2 : static_cast<int>(std::min<uint32_t>(options_.timeoutMs, 100));
    int n = poll(fds.data(), fds.size(), wait);
    if (n < 0 && errno != EINTR) {
      Fail(errno, "poll");
      break;
    }
    if (fds[0].revents != 0) {
      stopped = true;
      break;
    }
    uint64_t now = NowNs();
    for (size_t i = 0; i < conns_.size() && error_ == 0; i++) {
      Connection& c = *conns_[i];
      short ev = n > 0 ? fds[i + 1].revents : 0;
      if ((ev & POLLOUT) && !Flush(c)) break;
      if ((ev & (POLLIN | POLLHUP | POLLERR)) && !Receive(c)) break;
      // The oldest read in flight must be answered within the timeout (as in the JS client).
      while (!c.sent.empty() && state_[c.sent.front()] != kReadInFlight) c.sent.pop_front();
      if (!c.sent.empty() && now > sentNs_[c.sent.front()] &&
          now - sentNs_[c.sent.front()] > uint64_t{options_.timeoutMs} * 1000000ull)
        Fail(ETIMEDOUT, "no reply to a read within " + std::to_string(options_.timeoutMs) + " ms");
    }
  }
  if (stopped && error_ == 0) Fail(ECANCELED, "stopped");
  // A clean end: tell the server goodbye (best effort), then let the connections go.
  for (auto& c : conns_) {
    if (error_ == 0 && c->outAt == c->out.size()) {
      uint8_t disc[kRequestSize];
      PutRequest(disc, kCmdDisc, 0, 0, 0);
      ssize_t ignored = send(c->fd, disc, sizeof disc, MSG_NOSIGNAL);
      (void)ignored;
    }
    close(c->fd);
    c->fd = -1;
    c->in.reset();
  }
  finished_.store(true);
  if (done_) done_();
}
