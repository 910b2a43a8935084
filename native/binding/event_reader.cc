// EventReader: watches a uffd on the event loop of the thread that created it (uv_poll on the
// loop from napi_get_uv_event_loop, so it works in workers) and, each time it is readable,
// drains it with ONE read(2) of up to `batch` messages into a shared ArrayBuffer, then calls the
// JS callback with the count. Backpressure is JS calling stop(); teardown is an async cleanup
// hook so that the uv handle is closed before the loop is (a worker exiting mid-read is safe).
// The open/stop/ref/unref/close scaffolding is PolledObject's (poll_handle.h).
//
// With EVENT_FORK, a fork(2) by this very thread (child_process.spawn/exec: libuv forks on the
// calling thread) would wait in the kernel for its own FORK event to be read, and only this
// thread reads it: a permanent hang. The fork guard below reads the uffd on a helper thread
// for the duration of such a fork, and hands what it read to JS afterwards.
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "binding/args.h"
#include "binding/poll_handle.h"
#include "binding/uffd.h"
#include "binding/watchdog.h"
#include "kernel/uapi.h"

namespace {

// --- fork guard ------------------------------------------------------------------------------
// pthread_atfork handlers are process-wide and can never be removed, so the guards live in a
// process-wide registry (the one static state of this file). `prepare` runs on the forking
// thread before the fork: for each guard of that thread it starts a helper that reads the uffd
// (the kernel installs the child's uffd in this process when the FORK message is read, and only
// then lets the fork return). `parent` stops and joins the helpers, and wakes the loop to deliver
// what they read. Between prepare and parent, glibc holds malloc's locks: the helper allocates
// nothing (its buffer is preallocated) and takes no lock.
struct ForkGuard {
  int fd = -1;
  pthread_t loopThread;
  PollHandle* poll = nullptr;         // to wake the loop
  std::vector<struct uffd_msg> side;  // read by the helper during a fork
  size_t sideCount = 0;               // filled by the helper (joined before use)
  size_t sideTaken = 0;               // handed to JS so far (loop thread)
  std::atomic<bool> stop{false};
  int stopFd = -1;  // eventfd: wakes the helper's poll to stop
  pthread_t helper;
  bool helperRunning = false;
};

constexpr size_t kSideCapacity = 1024;  // messages: far more than can be pending during a fork
constexpr int kMaxForkGuardsPerThread = 64;

std::mutex registryMu;
std::vector<ForkGuard*>* registry = nullptr;  // never freed: the atfork handlers outlive everything
std::once_flag atforkOnce;
// Guards whose helper runs during the current fork of this thread: plain data, so that nothing
// is destroyed in the child (which has none of these threads).
thread_local ForkGuard* forking[kMaxForkGuardsPerThread];
thread_local int forkingCount = 0;

void* HelperMain(void* arg) {
  ForkGuard* g = static_cast<ForkGuard*>(arg);
  while (!g->stop.load(std::memory_order_acquire) && g->sideCount < kSideCapacity) {
    struct pollfd fds[2] = {{g->fd, POLLIN, 0}, {g->stopFd, POLLIN, 0}};
    int r = poll(fds, 2, -1);
    if (r < 0 && errno != EINTR) break;
    if (r <= 0 || !(fds[0].revents & (POLLIN | POLLERR | POLLHUP))) continue;
    ssize_t n = read(g->fd, &g->side[g->sideCount], (kSideCapacity - g->sideCount) * sizeof(struct uffd_msg));
    if (n > 0)
      g->sideCount += static_cast<size_t>(n) / sizeof(struct uffd_msg);
    else if (n < 0 && errno != EAGAIN && errno != EINTR)
      break;  // closed under us: nothing to guard
  }
  return nullptr;
}

void PrepareFork() {
  pthread_t self = pthread_self();
  std::lock_guard<std::mutex> lock(registryMu);
  forkingCount = 0;
  for (ForkGuard* g : *registry) {
    if (!pthread_equal(g->loopThread, self) || forkingCount == kMaxForkGuardsPerThread) continue;
    if (g->sideCount >= kSideCapacity) continue;
    g->stop.store(false);
    g->stopFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (g->stopFd < 0) continue;
    if (pthread_create(&g->helper, nullptr, HelperMain, g) != 0) {
      close(g->stopFd);
      g->stopFd = -1;
      continue;
    }
    g->helperRunning = true;
    forking[forkingCount++] = g;
  }
}

void AfterForkParent() {
  for (int i = 0; i < forkingCount; i++) {
    ForkGuard* g = forking[i];
    g->stop.store(true, std::memory_order_release);
    uint64_t one = 1;
    ssize_t ignored = write(g->stopFd, &one, sizeof(one));
    (void)ignored;
    pthread_join(g->helper, nullptr);
    g->helperRunning = false;
    close(g->stopFd);
    g->stopFd = -1;
    if (g->sideCount > g->sideTaken && g->poll != nullptr) g->poll->Wake();
  }
  forkingCount = 0;
}

void AfterForkChild() {
  // The helpers do not exist here; their eventfds are close-on-exec. Forget them.
  forkingCount = 0;
}

void RegisterForkGuard(ForkGuard* g) {
  std::call_once(atforkOnce, []() {
    registry = new std::vector<ForkGuard*>();
    pthread_atfork(PrepareFork, AfterForkParent, AfterForkChild);
  });
  std::lock_guard<std::mutex> lock(registryMu);
  registry->push_back(g);
}

void UnregisterForkGuard(ForkGuard* g) {
  std::lock_guard<std::mutex> lock(registryMu);
  registry->erase(std::remove(registry->begin(), registry->end(), g), registry->end());
}

// --- the reader ------------------------------------------------------------------------------
class EventReader : public PolledObject<EventReader> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineWithPollMethods(env, "EventReader", {InstanceMethod<&EventReader::Start>("start")});
  }

  // new EventReader(fd, readSize, callback(count | Error), watchdogMs, forkGuard)
  EventReader(const Napi::CallbackInfo& info) : PolledObject<EventReader>(info, "userfaultfd.events") {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    int batch = ArgI32(info, 1, "readSize");
    if (batch < 1 || batch > 4096) ThrowRangeError(env, "readSize must be 1..4096");
    SetCallback(info[2]);
    int watchdogMs = info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : 0;
    bool forkGuard = info[4].ToBoolean();
    batch_ = static_cast<size_t>(batch);
    buffer_ = Napi::Persistent(Napi::ArrayBuffer::New(env, batch_ * sizeof(struct uffd_msg)));
    info.This().As<Napi::Object>().Set("buffer", buffer_.Value());
    env_ = env;
    fd_ = fd;
    OpenPoll(fd, nullptr, forkGuard);
    if (forkGuard) {
      guard_ = new ForkGuard();
      guard_->fd = fd;
      guard_->loopThread = pthread_self();
      guard_->poll = poll();
      guard_->side.resize(kSideCapacity);
      RegisterForkGuard(guard_);
    }
    if (watchdogMs > 0) WatchdogWatch(env, fd, watchdogMs);
  }

  ~EventReader() override { Release(); }

 private:
  void Drain(int status, int events) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (guard_ != nullptr && guard_->sideTaken < guard_->sideCount) {
      if (polling()) DeliverSide();
      return;
    }
    if (events == PollHandle::kWoken) return;
    Napi::Value arg;
    if (status < 0) {
      arg = MakeUffdError(env, -status, "poll").Value();
    } else {
      ssize_t n;
      do {
        n = read(fd_, buffer_.Value().Data(), batch_ * sizeof(struct uffd_msg));
      } while (n < 0 && errno == EINTR);
      if (n < 0 && errno == EAGAIN) return;  // another reader (or a woken fault) took it
      if (n < 0) {
        arg = MakeUffdError(env, errno, "read").Value();
      } else {
        arg = Napi::Number::New(env, static_cast<double>(n / sizeof(struct uffd_msg)));
      }
    }
    Call(arg);
  }

  // Hands what the fork guard read to JS, one batch per loop turn.
  void DeliverSide() {
    size_t n = std::min(batch_, guard_->sideCount - guard_->sideTaken);
    memcpy(buffer_.Value().Data(), &guard_->side[guard_->sideTaken], n * sizeof(struct uffd_msg));
    guard_->sideTaken += n;
    if (guard_->sideTaken == guard_->sideCount)
      guard_->sideTaken = guard_->sideCount = 0;
    else
      poll()->Wake();
    Call(Napi::Number::New(Env(), static_cast<double>(n)));
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (open() && !polling()) {
      StartPoll(UV_READABLE, [this](int status, int events) { Drain(status, events); });
      if (guard_ != nullptr && guard_->sideTaken < guard_->sideCount) poll()->Wake();
    }
    return info.Env().Undefined();
  }

  void OnRelease() override {
    WatchdogForget(env_, fd_);
    if (guard_ != nullptr) {
      UnregisterForkGuard(guard_);
      ReleaseSide();
      delete guard_;
      guard_ = nullptr;
    }
    buffer_.Reset();
  }

  // Messages the fork guard read that JS never got: a child's uffd nobody will serve is closed,
  // and a faulting thread is woken to fault again (the next reader gets it).
  void ReleaseSide() {
    for (size_t i = guard_->sideTaken; i < guard_->sideCount; i++) {
      const struct uffd_msg& m = guard_->side[i];
      if (m.event == UFFD_EVENT_FORK) {
        close(static_cast<int>(m.arg.fork.ufd));
      } else if (m.event == UFFD_EVENT_PAGEFAULT) {
        long page = sysconf(_SC_PAGESIZE);
        struct uffdio_range range = {m.arg.pagefault.address & ~static_cast<uint64_t>(page - 1),
                                     static_cast<uint64_t>(page)};
        ioctl(fd_, UFFDIO_WAKE, &range);
      }
    }
    guard_->sideTaken = guard_->sideCount = 0;
  }

  Napi::Reference<Napi::ArrayBuffer> buffer_;
  size_t batch_ = 0;
  napi_env env_ = nullptr;
  int fd_ = -1;
  ForkGuard* guard_ = nullptr;
};

}  // namespace

void InitEventReader(Napi::Env env, Napi::Object exports) {
  exports.Set("EventReader", EventReader::Define(env));
  // Internal: how many uv poll handles (event readers, fd watchers) this environment has open.
  exports.Set("openPollHandles", Napi::Function::New(
                                     env,
                                     [](const Napi::CallbackInfo& info) {
                                       return Napi::Number::New(info.Env(),
                                                                GetAddonData(info.Env())->pollHandles);
                                     },
                                     "openPollHandles"));
}
