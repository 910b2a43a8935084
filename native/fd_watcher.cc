// FdWatcher: waits, on the event loop of the thread that created it, until an fd is readable
// or writable, then calls back once. It polls a dup() of the fd: libuv allows one watcher per
// fd number, and the fd of a net.Socket already has Node's own watcher, so polling a dup (same
// open file, different number) waits for readiness without stealing Node's registration.
// Nobody busy-waits: the loop sleeps in epoll until the kernel says so.
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <uv.h>

#include "args.h"
#include "uffd.h"

namespace {

class FdWatcher;

// Outlives the JS object until libuv has closed the handle (then the dup is closed).
struct WatchState {
  uv_poll_t poll;
  napi_async_cleanup_hook_handle hook = nullptr;
  FdWatcher* owner = nullptr;
  bool closing = false;
  int dup = -1;
};

void OnClosed(uv_handle_t* handle) {
  WatchState* state = static_cast<WatchState*>(handle->data);
  if (state->hook != nullptr) napi_remove_async_cleanup_hook(state->hook);
  if (state->dup >= 0) close(state->dup);
  delete state;
}

void BeginClose(WatchState* state) {
  if (state->closing) return;
  state->closing = true;
  uv_poll_stop(&state->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->poll), OnClosed);
}

void ForgetOwner(WatchState* state);

void OnEnvTeardown(napi_async_cleanup_hook_handle, void* arg) {
  WatchState* state = static_cast<WatchState*>(arg);
  ForgetOwner(state);
  BeginClose(state);
}

class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher",
                       {
                           InstanceMethod<&FdWatcher::Wait>("wait"),
                           InstanceMethod<&FdWatcher::Stop>("stop"),
                           InstanceMethod<&FdWatcher::Ref>("ref"),
                           InstanceMethod<&FdWatcher::Unref>("unref"),
                           InstanceMethod<&FdWatcher::Close>("close"),
                       });
  }

  // new FdWatcher(fd, callback(events | Error)); events: 1 readable, 2 writable, 4 hang-up.
  FdWatcher(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<FdWatcher>(info), context_(info.Env(), "userfaultfd.FdWatcher") {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    if (!info[1].IsFunction()) ThrowTypeError(env, "callback must be a function");
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr)
      ThrowTypeError(env, "no event loop for this environment");
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
    callback_ = Napi::Persistent(info[1].As<Napi::Function>());
    state_ = new WatchState();
    state_->owner = this;
    state_->dup = dup;
    state_->poll.data = state_;
    int rc = uv_poll_init(loop, &state_->poll, dup);
    if (rc != 0) {
      close(dup);
      delete state_;
      state_ = nullptr;
      ThrowUffdError(env, -rc, "uv_poll_init");
    }
    napi_add_async_cleanup_hook(env, OnEnvTeardown, state_, &state_->hook);
  }

  void ForgetState() { state_ = nullptr; }

  ~FdWatcher() override {
    if (state_ != nullptr) {
      state_->owner = nullptr;
      BeginClose(state_);
    }
  }

 private:
  static void OnReady(uv_poll_t* handle, int status, int events) {
    WatchState* state = static_cast<WatchState*>(handle->data);
    if (state->owner == nullptr || state->closing) return;
    uv_poll_stop(handle);  // one-shot: the caller does its syscall, then waits again if needed
    state->owner->Fire(status, events);
  }

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
    napi_value result;
    napi_value argv[] = {arg};
    napi_status s = napi_make_callback(env, context_, Value(), callback_.Value(), 1, argv, &result);
    if (s == napi_pending_exception) {
      napi_value error;
      napi_get_and_clear_last_exception(env, &error);
      napi_fatal_exception(env, error);
    }
  }

  // wait(events): 1 readable, 2 writable (both allowed). Calls back once.
  Napi::Value Wait(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (state_ == nullptr || state_->closing) ThrowUffdError(env, EBADF, "FdWatcher.wait", -1, "the watcher was closed");
    int want = ArgI32(info, 0, "events");
    int events = UV_DISCONNECT;
    if (want & 1) events |= UV_READABLE;
    if (want & 2) events |= UV_WRITABLE;
    int rc = uv_poll_start(&state_->poll, events, OnReady);
    if (rc != 0) ThrowUffdError(env, -rc, "uv_poll_start");
    return env.Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (state_ != nullptr && !state_->closing) uv_poll_stop(&state_->poll);
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

  // Idempotent: stops polling; the dup is closed once libuv has let go of it.
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
  WatchState* state_ = nullptr;
};

void ForgetOwner(WatchState* state) {
  if (state->owner != nullptr) state->owner->ForgetState();
  state->owner = nullptr;
}

}  // namespace

void InitFdWatcher(Napi::Env env, Napi::Object exports) {
  exports.Set("FdWatcher", FdWatcher::Define(env));
}
