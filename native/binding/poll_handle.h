// PollHandle: a uv_poll_t on the event loop of the environment that made it (the loop from
// napi_get_uv_event_loop, so workers work), for a JS object that may be collected, closed or torn
// down with its environment before libuv has closed the handle. The handle outlives its owner:
// Close() (idempotent) drops the owner's callbacks and asks libuv to close; libuv frees it after.
// An async cleanup hook closes it at environment teardown, before the loop itself goes.
#pragma once

#include <uv.h>

#include <functional>
#include <utility>

#include "binding/addon_data.h"
#include "binding/uffd.h"

class PollHandle {
 public:
  using ReadyCallback = std::function<void(int status, int events)>;

  // Throws a JS error on failure. `onTeardown` runs if the environment goes first (the owner
  // must then forget this handle); `onClosed` runs once libuv has let go of the fd.
  static PollHandle* Open(Napi::Env env, int fd, std::function<void()> onTeardown,
                          std::function<void()> onClosed = nullptr) {
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr)
      ThrowTypeError(env, "no event loop for this environment");
    PollHandle* h = new PollHandle();
    h->poll_.data = h;
    int rc = uv_poll_init(loop, &h->poll_, fd);
    if (rc != 0) {
      delete h;
      ThrowUffdError(env, -rc, "uv_poll_init");
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
    if (!closing_) uv_ref(reinterpret_cast<uv_handle_t*>(&poll_));
  }

  void Unref() {
    if (!closing_) uv_unref(reinterpret_cast<uv_handle_t*>(&poll_));
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
  }

 private:
  PollHandle() = default;

  static void OnReady(uv_poll_t* handle, int status, int events) {
    PollHandle* h = static_cast<PollHandle*>(handle->data);
    if (h->closing_ || !h->ready_) return;
    h->ready_(status, events);
  }

  static void OnClosed(uv_handle_t* handle) {
    PollHandle* h = static_cast<PollHandle*>(handle->data);
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
  napi_async_cleanup_hook_handle hook_ = nullptr;
  bool closing_ = false;
  AddonData* data_ = nullptr;
  ReadyCallback ready_;
  std::function<void()> onTeardown_;
  std::function<void()> onClosed_;
};

// Calls `fn(arg)` from a libuv callback in the async context `context`; a JS exception becomes an
// uncaught exception of the process (as for any other I/O callback), never a silent loss.
inline void CallFromLoop(Napi::Env env, const Napi::AsyncContext& context, Napi::Value self,
                         Napi::Function fn, Napi::Value arg) {
  napi_value result;
  napi_value argv[] = {arg};
  napi_status s = napi_make_callback(env, context, self, fn, 1, argv, &result);
  if (s == napi_pending_exception) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error);
  }
}
