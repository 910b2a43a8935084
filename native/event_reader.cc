// EventReader: watches a uffd on the event loop of the thread that created it (uv_poll on the
// loop from napi_get_uv_event_loop, so it works in workers) and, each time it is readable,
// drains it with ONE read(2) of up to `batch` messages into a shared ArrayBuffer, then calls the
// JS callback with the count. Backpressure is JS calling stop(); teardown is an async cleanup
// hook so that the uv handle is closed before the loop is (a worker exiting mid-read is safe).
#include <errno.h>
#include <unistd.h>
#include <uv.h>

#include "args.h"
#include "uapi.h"
#include "uffd.h"
#include "watchdog.h"

namespace {

class EventReader;

// Outlives the JS object until libuv has closed the handle.
struct PollState {
  uv_poll_t poll;
  napi_env env = nullptr;
  napi_async_cleanup_hook_handle hook = nullptr;
  EventReader* owner = nullptr;
  bool closing = false;
  bool polling = false;
  int fd = -1;
};

void OnClosed(uv_handle_t* handle) {
  PollState* state = static_cast<PollState*>(handle->data);
  if (state->hook != nullptr) napi_remove_async_cleanup_hook(state->hook);
  delete state;
}

void BeginClose(PollState* state) {
  if (state->closing) return;
  state->closing = true;
  WatchdogForget(state->env, state->fd);
  uv_poll_stop(&state->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->poll), OnClosed);
}

void ForgetOwner(PollState* state);

void OnEnvTeardown(napi_async_cleanup_hook_handle, void* arg) {
  PollState* state = static_cast<PollState*>(arg);
  ForgetOwner(state);
  BeginClose(state);
}

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

  // new EventReader(fd, batch, callback(count | Error), watchdogMs)
  EventReader(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<EventReader>(info), context_(info.Env(), "userfaultfd.events") {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    int batch = ArgI32(info, 1, "batch");
    if (batch < 1 || batch > 4096) ThrowRangeError(env, "batch must be 1..4096");
    if (!info[2].IsFunction()) ThrowTypeError(env, "callback must be a function");
    int watchdogMs = info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : 0;
    callback_ = Napi::Persistent(info[2].As<Napi::Function>());
    batch_ = static_cast<size_t>(batch);
    buffer_ = Napi::Persistent(Napi::ArrayBuffer::New(env, batch_ * sizeof(struct uffd_msg)));
    info.This().As<Napi::Object>().Set("buffer", buffer_.Value());

    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr)
      ThrowTypeError(env, "no event loop for this environment");
    state_ = new PollState();
    state_->env = env;
    state_->owner = this;
    state_->fd = fd;
    state_->poll.data = state_;
    int rc = uv_poll_init(loop, &state_->poll, fd);
    if (rc != 0) {
      delete state_;
      state_ = nullptr;
      ThrowUffdError(env, -rc, "uv_poll_init");
    }
    napi_add_async_cleanup_hook(env, OnEnvTeardown, state_, &state_->hook);
    if (watchdogMs > 0) WatchdogWatch(env, fd, watchdogMs);
  }

  // The state is about to be freed by libuv: never touch it again.
  void ForgetState() { state_ = nullptr; }

  ~EventReader() override {
    if (state_ != nullptr) {
      state_->owner = nullptr;
      BeginClose(state_);
    }
  }

 private:
  static void OnReadable(uv_poll_t* handle, int status, int) {
    PollState* state = static_cast<PollState*>(handle->data);
    if (state->owner == nullptr || state->closing) return;
    state->owner->Drain(status);
  }

  void Drain(int status) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    Napi::Value arg;
    if (status < 0) {
      arg = MakeUffdError(env, -status, "poll").Value();
    } else {
      ssize_t n;
      do {
        n = read(state_->fd, buffer_.Value().Data(), batch_ * sizeof(struct uffd_msg));
      } while (n < 0 && errno == EINTR);
      if (n < 0 && errno == EAGAIN) return;  // another reader (or a woken fault) took it
      if (n < 0) {
        arg = MakeUffdError(env, errno, "read").Value();
      } else {
        arg = Napi::Number::New(env, static_cast<double>(n / sizeof(struct uffd_msg)));
      }
    }
    napi_value result;
    napi_value argv[] = {arg};
    napi_status s = napi_make_callback(env, context_, Value(), callback_.Value(), 1, argv, &result);
    if (s == napi_pending_exception) {
      napi_value error;
      napi_get_and_clear_last_exception(env, &error);
      napi_fatal_exception(env, error);
    }
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (state_ == nullptr || state_->closing) return info.Env().Undefined();
    if (!state_->polling) {
      int rc = uv_poll_start(&state_->poll, UV_READABLE, OnReadable);
      if (rc != 0) ThrowUffdError(info.Env(), -rc, "uv_poll_start");
      state_->polling = true;
    }
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (state_ != nullptr && !state_->closing && state_->polling) {
      uv_poll_stop(&state_->poll);
      state_->polling = false;
    }
    return info.Env().Undefined();
  }

  Napi::Value Ref(const Napi::CallbackInfo& info) {
    if (state_ != nullptr && !state_->closing) uv_ref(reinterpret_cast<uv_handle_t*>(&state_->poll));
    return info.Env().Undefined();
  }

  Napi::Value Unref(const Napi::CallbackInfo& info) {
    if (state_ != nullptr && !state_->closing) uv_unref(reinterpret_cast<uv_handle_t*>(&state_->poll));
    return info.Env().Undefined();
  }

  // Idempotent. The fd itself belongs to the Userfaultfd and is closed by it, after this.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (state_ != nullptr) {
      state_->owner = nullptr;
      BeginClose(state_);
      state_ = nullptr;
    }
    return info.Env().Undefined();
  }

  Napi::AsyncContext context_;
  Napi::FunctionReference callback_;
  Napi::Reference<Napi::ArrayBuffer> buffer_;
  size_t batch_ = 0;
  PollState* state_ = nullptr;
};

void ForgetOwner(PollState* state) {
  if (state->owner != nullptr) state->owner->ForgetState();
  state->owner = nullptr;
}

}  // namespace

void InitEventReader(Napi::Env env, Napi::Object exports) {
  exports.Set("EventReader", EventReader::Define(env));
}
