// The event-loop scaffolding shared by every JS object that waits on an fd (EventReader,
// FdWatcher): ONE implementation of open/start/stop/ref/unref/close, of teardown, and of calling
// back into JS from the loop.
//
// PollHandle: a uv_poll_t on the event loop of the environment that made it (the loop from
// napi_get_uv_event_loop, so workers work), for a JS object that may be collected, closed or torn
// down with its environment before libuv has closed the handle. The handle outlives its owner:
// Close() (idempotent) drops the owner's callbacks and asks libuv to close; libuv frees it after.
// An async cleanup hook closes it at environment teardown, before the loop itself goes. With
// `wakeable`, it also owns a uv_async_t: Wake() (any thread) makes the loop call `ready` with
// kWoken, for work that arrived without the fd becoming readable.
//
// PolledObject<T>: the ObjectWrap base of those JS objects. It holds the JS callback and the
// PollHandle, defines stop/ref/unref/close, and on close RELEASES every reference to JS values
// (the callback, and whatever the subclass drops in OnRelease): the callback's closure usually
// holds the JS object that owns this one, so a reference kept past close would keep both alive
// forever (every closed event stream leaked its 4 KiB+ buffer and closure that way).
#pragma once

#include <uv.h>

#include <functional>
#include <utility>
#include <vector>

#include "binding/addon_data.h"
#include "binding/uffd.h"

// Reports a C++ exception caught on a libuv callback of ours (no node-addon-api wrapper there:
// letting it escape would std::terminate the process). While JS can run it becomes an uncaught
// exception, as from any I/O callback; in a dying environment (a worker being terminated, where
// every Node-API call that could run JS fails) there is nobody to tell, and it is dropped.
inline void ReportFromLoop(napi_env env, const Napi::Error& error) {
  napi_value value = nullptr;
  try {
    value = error.Value();
  } catch (...) {
    return;
  }
  if (value != nullptr) napi_fatal_exception(env, value);  // fails harmlessly when JS cannot run
}

class PollHandle {
 public:
  using ReadyCallback = std::function<void(int status, int events)>;
  static constexpr int kWoken = 1 << 30;  // `events` of a ready call made by Wake()

  // Throws a JS error on failure. `onTeardown` runs if the environment goes first (the owner
  // must then forget this handle); `onClosed` runs once libuv has let go of the fd.
  static PollHandle* Open(Napi::Env env, int fd, std::function<void()> onTeardown,
                          std::function<void()> onClosed = nullptr, bool wakeable = false) {
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr)
      ThrowTypeError(env, "no event loop for this environment");
    PollHandle* h = new PollHandle();
    h->env_ = env;
    h->poll_.data = h;
    int rc = uv_poll_init(loop, &h->poll_, fd);
    if (rc != 0) {
      delete h;
      ThrowUffdError(env, -rc, "uv_poll_init");
    }
    h->handles_ = 1;
    if (wakeable) {
      h->async_ = new uv_async_t();
      h->async_->data = h;
      rc = uv_async_init(loop, h->async_, OnWake);
      if (rc != 0) {
        delete h->async_;
        h->async_ = nullptr;
        h->closing_ = true;
        uv_close(reinterpret_cast<uv_handle_t*>(&h->poll_), OnClosed);
        ThrowUffdError(env, -rc, "uv_async_init");
      }
      h->handles_ = 2;
    }
    h->onTeardown_ = std::move(onTeardown);
    h->onClosed_ = std::move(onClosed);
    napi_add_async_cleanup_hook(env, OnEnvTeardown, h, &h->hook_);
    h->data_ = GetAddonData(env);
    h->data_->pollHandles++;
    return h;
  }

  // (Re)starts watching for `events` (UV_READABLE...); returns libuv's status (0 or -errno).
  int Start(int events, ReadyCallback ready) {
    if (closing_) return UV_EBADF;
    ready_ = std::move(ready);
    return uv_poll_start(&poll_, events, OnReady);
  }

  void Stop() {
    if (!closing_) uv_poll_stop(&poll_);
  }

  void Ref() {
    if (closing_) return;
    uv_ref(reinterpret_cast<uv_handle_t*>(&poll_));
    if (async_ != nullptr) uv_ref(reinterpret_cast<uv_handle_t*>(async_));
  }

  void Unref() {
    if (closing_) return;
    uv_unref(reinterpret_cast<uv_handle_t*>(&poll_));
    if (async_ != nullptr) uv_unref(reinterpret_cast<uv_handle_t*>(async_));
  }

  // Any thread (async-signal-safe): the loop calls `ready` with kWoken soon, once per batch of
  // wakes. Only for handles opened `wakeable`, and only until Close().
  void Wake() {
    if (async_ != nullptr && !closing_) uv_async_send(async_);
  }

  // Idempotent; no callback of the owner runs after this returns.
  void Close() {
    if (closing_) return;
    closing_ = true;
    data_->pollHandles--;  // the AddonData outlives every cleanup hook, so it is still there
    ready_ = nullptr;
    onTeardown_ = nullptr;
    uv_poll_stop(&poll_);
    uv_close(reinterpret_cast<uv_handle_t*>(&poll_), OnClosed);
    if (async_ != nullptr) uv_close(reinterpret_cast<uv_handle_t*>(async_), OnClosed);
  }

 private:
  PollHandle() = default;
  ~PollHandle() { delete async_; }

  // The owner's callback must not throw through libuv: see ReportFromLoop.
  void Deliver(int status, int events) {
    if (closing_ || !ready_) return;
    try {
      ready_(status, events);
    } catch (const Napi::Error& e) {
      ReportFromLoop(env_, e);
    }
  }

  static void OnReady(uv_poll_t* handle, int status, int events) {
    static_cast<PollHandle*>(handle->data)->Deliver(status, events);
  }

  static void OnWake(uv_async_t* handle) { static_cast<PollHandle*>(handle->data)->Deliver(0, kWoken); }

  // Runs once per uv handle; the last one frees the PollHandle.
  static void OnClosed(uv_handle_t* handle) {
    PollHandle* h = static_cast<PollHandle*>(handle->data);
    if (--h->handles_ > 0) return;
    if (h->hook_ != nullptr) napi_remove_async_cleanup_hook(h->hook_);
    if (h->onClosed_) h->onClosed_();
    delete h;
  }

  static void OnEnvTeardown(napi_async_cleanup_hook_handle, void* arg) {
    PollHandle* h = static_cast<PollHandle*>(arg);
    auto forget = std::move(h->onTeardown_);
    if (forget) forget();
    h->Close();
  }

  uv_poll_t poll_;
  uv_async_t* async_ = nullptr;
  int handles_ = 0;  // uv handles not yet closed
  napi_env env_ = nullptr;
  napi_async_cleanup_hook_handle hook_ = nullptr;
  bool closing_ = false;
  AddonData* data_ = nullptr;
  ReadyCallback ready_;
  std::function<void()> onTeardown_;
  std::function<void()> onClosed_;
};

// Calls `fn(arg)` from a libuv callback in the async context `context`; a JS exception becomes an
// uncaught exception of the process (as for any other I/O callback), never a silent loss. In a
// dying environment the call fails without an exception pending: nothing to report then.
inline void CallFromLoop(Napi::Env env, const Napi::AsyncContext& context, Napi::Value self,
                         Napi::Function fn, Napi::Value arg) {
  napi_value result;
  napi_value argv[] = {arg};
  napi_status s = napi_make_callback(env, context, self, fn, 1, argv, &result);
  bool pending = false;
  if (s != napi_ok && napi_is_exception_pending(env, &pending) == napi_ok && pending) {
    napi_value error;
    if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
  }
}

template <typename T>
class PolledObject : public Napi::ObjectWrap<T> {
 public:
  using Wrap = Napi::ObjectWrap<T>;
  using Method = Napi::Value (T::*)(const Napi::CallbackInfo&);

  // stop(), ref(), unref(), close() (idempotent) plus the subclass's own methods.
  static Napi::Function DefineWithPollMethods(Napi::Env env, const char* name,
                                              std::vector<typename Wrap::PropertyDescriptor> methods) {
    methods.push_back(Wrap::InstanceMethod("stop", static_cast<Method>(&PolledObject::StopMethod)));
    methods.push_back(Wrap::InstanceMethod("ref", static_cast<Method>(&PolledObject::RefMethod)));
    methods.push_back(Wrap::InstanceMethod("unref", static_cast<Method>(&PolledObject::UnrefMethod)));
    methods.push_back(Wrap::InstanceMethod("close", static_cast<Method>(&PolledObject::CloseMethod)));
    return Wrap::DefineClass(env, name, methods);
  }

 protected:
  PolledObject(const Napi::CallbackInfo& info, const char* resourceName)
      : Wrap(info), context_(info.Env(), resourceName) {}

  ~PolledObject() override { Release(); }

  // The JS function called from the loop; a TypeError unless it is one.
  void SetCallback(Napi::Value fn) {
    if (!fn.IsFunction()) ThrowTypeError(fn.Env(), "callback must be a function");
    callback_ = Napi::Persistent(fn.As<Napi::Function>());
  }

  void OpenPoll(int fd, std::function<void()> onClosed = nullptr, bool wakeable = false) {
    poll_ = PollHandle::Open(
        this->Env(), fd,
        [this]() {
          OnRelease();
          poll_ = nullptr;
        },
        std::move(onClosed), wakeable);
  }

  bool open() const { return poll_ != nullptr; }
  PollHandle* poll() const { return poll_; }

  // Starts (or changes) polling; throws UffdError on failure, EBADF once closed.
  void StartPoll(int events, PollHandle::ReadyCallback ready) {
    if (poll_ == nullptr) ThrowUffdError(this->Env(), EBADF, "uv_poll_start", -1, "closed");
    int rc = poll_->Start(events, std::move(ready));
    if (rc != 0) ThrowUffdError(this->Env(), -rc, "uv_poll_start");
    polling_ = true;
  }

  void StopPoll() {
    if (poll_ != nullptr && polling_) poll_->Stop();
    polling_ = false;
  }

  bool polling() const { return polling_; }

  // Calls the JS callback with `arg` (see CallFromLoop).
  void Call(Napi::Value arg) {
    if (callback_.IsEmpty()) return;
    CallFromLoop(this->Env(), context_, this->Value(), callback_.Value(), arg);
  }

  // Subclasses drop their own references and native state here (runs once, on close,
  // collection or environment teardown).
  virtual void OnRelease() {}

  // Idempotent: closes the poll handle and lets go of every JS value.
  void Release() {
    if (poll_ != nullptr) {
      OnRelease();
      poll_->Close();
      poll_ = nullptr;
    }
    polling_ = false;
    callback_.Reset();
  }

 private:
  Napi::Value StopMethod(const Napi::CallbackInfo& info) {
    StopPoll();
    return info.Env().Undefined();
  }

  Napi::Value RefMethod(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr) poll_->Ref();
    return info.Env().Undefined();
  }

  Napi::Value UnrefMethod(const Napi::CallbackInfo& info) {
    if (poll_ != nullptr) poll_->Unref();
    return info.Env().Undefined();
  }

  Napi::Value CloseMethod(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::AsyncContext context_;
  Napi::FunctionReference callback_;
  PollHandle* poll_ = nullptr;
  bool polling_ = false;
};
