// FdWatcher: waits, on the event loop of the thread that created it, until an fd is readable
// or writable, then calls back once. It polls a dup() of the fd: libuv allows one watcher per
// fd number, and the fd of a net.Socket already has Node's own watcher, so polling a dup (same
// open file, different number) waits for readiness without stealing Node's registration.
// Nobody busy-waits: the loop sleeps in epoll until the kernel says so. The open/stop/ref/
// unref/close scaffolding is PolledObject's (poll_handle.h).
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <uv.h>

#include "binding/args.h"
#include "binding/poll_handle.h"
#include "binding/uffd.h"

namespace {

class FdWatcher : public PolledObject<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineWithPollMethods(env, "FdWatcher", {InstanceMethod<&FdWatcher::Wait>("wait")});
  }

  // new FdWatcher(fd, callback(events | Error)); events: 1 readable, 2 writable, 4 hang-up.
  FdWatcher(const Napi::CallbackInfo& info) : PolledObject<FdWatcher>(info, "userfaultfd.FdWatcher") {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    SetCallback(info[1]);
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
    try {
      // The dup is closed once libuv has let go of it.
      OpenPoll(dup, [dup]() { close(dup); });
    } catch (...) {
      close(dup);
      throw;
    }
  }

  ~FdWatcher() override { Release(); }

 private:
  void Fire(int status, int events) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    Napi::Value arg;
    if (status < 0) {
      arg = MakeUffdError(env, -status, "poll").Value();
    } else {
      int out = 0;
      if (events & UV_READABLE) out |= 1;
      if (events & UV_WRITABLE) out |= 2;
      if (events & UV_DISCONNECT) out |= 4;
      arg = Napi::Number::New(env, out);
    }
    Call(arg);
  }

  // wait(events): 1 readable, 2 writable (both allowed). Calls back once.
  Napi::Value Wait(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!open()) ThrowUffdError(env, EBADF, "FdWatcher.wait", -1, "the watcher was closed");
    int want = ArgI32(info, 0, "events");
    int events = UV_DISCONNECT;
    if (want & 1) events |= UV_READABLE;
    if (want & 2) events |= UV_WRITABLE;
    StartPoll(events, [this](int status, int ready) {
      StopPoll();  // one-shot: the caller does its syscall, then waits again if needed
      Fire(status, ready);
    });
    return env.Undefined();
  }
};

}  // namespace

void InitFdWatcher(Napi::Env env, Napi::Object exports) {
  exports.Set("FdWatcher", FdWatcher::Define(env));
}
