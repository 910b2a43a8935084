// EventReader: watches a uffd on the event loop of the thread that created it (uv_poll on the
// loop from napi_get_uv_event_loop, so it works in workers) and, each time it is readable,
// drains it with ONE read(2) of up to `batch` messages into a shared ArrayBuffer, then calls the
// JS callback with the count. Backpressure is JS calling stop(); teardown is an async cleanup
// hook so that the uv handle is closed before the loop is (a worker exiting mid-read is safe).
#include <errno.h>
#include <unistd.h>
#include <uv.h>

#include "binding/args.h"
#include "binding/poll_handle.h"
#include "binding/uffd.h"
#include "binding/watchdog.h"
#include "kernel/uapi.h"

namespace {

class EventReader : public Napi::ObjectWrap<EventReader> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "EventReader",
                       {
                           InstanceMethod<&EventReader::Start>("start"),
                           InstanceMethod<&EventReader::Stop>("stop"),
                           InstanceMethod<&EventReader::Ref>("ref"),
                           InstanceMethod<&EventReader::Unref>("unref"),
                           InstanceMethod<&EventReader::Close>("close"),
                       });
  }

  // new EventReader(fd, readSize, callback(count | Error), watchdogMs)
  EventReader(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<EventReader>(info), context_(info.Env(), "userfaultfd.events") {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    int batch = ArgI32(info, 1, "readSize");
    if (batch < 1 || batch > 4096) ThrowRangeError(env, "readSize must be 1..4096");
    if (!info[2].IsFunction()) ThrowTypeError(env, "callback must be a function");
    int watchdogMs = info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : 0;
    callback_ = Napi::Persistent(info[2].As<Napi::Function>());
    batch_ = static_cast<size_t>(batch);
    buffer_ = Napi::Persistent(Napi::ArrayBuffer::New(env, batch_ * sizeof(struct uffd_msg)));
    info.This().As<Napi::Object>().Set("buffer", buffer_.Value());

    env_ = env;
    fd_ = fd;
    poll_ = PollHandle::Open(env, fd, [this]() {
      WatchdogForget(env_, fd_);
      poll_ = nullptr;
    });
    if (watchdogMs > 0) WatchdogWatch(env, fd, watchdogMs);
  }

  ~EventReader() override { Release(); }

 private:
  void Drain(int status) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
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
    CallFromLoop(env, context_, Value(), callback_.Value(), arg);
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr && !polling_) {
      int rc = poll_->Start(UV_READABLE, [this](int status, int) { Drain(status); });
      if (rc != 0) ThrowUffdError(info.Env(), -rc, "uv_poll_start");
      polling_ = true;
    }
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr && polling_) {
      poll_->Stop();
      polling_ = false;
    }
    return info.Env().Undefined();
  }

  Napi::Value Ref(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr) poll_->Ref();
    return info.Env().Undefined();
  }

  Napi::Value Unref(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr) poll_->Unref();
    return info.Env().Undefined();
  }

  // Idempotent. The fd itself belongs to the Userfaultfd and is closed by it, after this.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  void Release() {
    if (poll_ == nullptr) return;
    WatchdogForget(env_, fd_);
    poll_->Close();
    poll_ = nullptr;
  }

  Napi::AsyncContext context_;
  Napi::FunctionReference callback_;
  Napi::Reference<Napi::ArrayBuffer> buffer_;
  size_t batch_ = 0;
  napi_env env_ = nullptr;
  int fd_ = -1;
  bool polling_ = false;
  PollHandle* poll_ = nullptr;
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
