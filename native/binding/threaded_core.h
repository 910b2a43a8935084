// The lifecycle shared by the JS objects whose native threads report to JS through one threadsafe
// function (FaultEngine, MigrationSourceHandle, MigrationTargetHandle). The object holds its core
// by shared_ptr, the threads' wake-ups hold it weakly (a wake-up after the core is gone does
// nothing). The threads are stopped and joined once, on close(), on garbage collection (the
// object's destructor) or at environment teardown (cleanup hook), whichever comes first; the TSFN
// is released only after that, so no thread can call it once it is released.
#pragma once
#include <napi.h>

#include <functional>
#include <memory>

class ThreadedCore {
 public:
  virtual ~ThreadedCore() = default;

  // In the object's constructor, before the threads start: the TSFN that calls `notify` (`name`
  // is what async hooks and diagnostics show). It keeps the event loop alive until unref() or
  // close(), as an open handle does.
  void Open(Napi::Env e, Napi::Function notify, const char* name) {
    env = e;
    tsfn = Napi::ThreadSafeFunction::New(e, notify, name, 0, 1);
  }
  // Once the threads run: at environment teardown, close if nothing did before.
  void Hook() {
    napi_add_env_cleanup_hook(env, OnTeardown, this);
    hooked_ = true;
  }
  // The threads could not start: nothing to stop, only the TSFN to let go.
  void Abandon() {
    tsfn.Release();
    closed = true;
  }
  // Idempotent.
  void Close() {
    if (closed) return;
    closed = true;
    Stop();  // joins the threads: nothing calls the TSFN after this
    tsfn.Release();
    if (hooked_) napi_remove_env_cleanup_hook(env, OnTeardown, this);
    hooked_ = false;
  }
  // ref()/unref(): whether the pending notices keep the event loop alive. No-ops once closed.
  void Ref(Napi::Env e) {
    if (!closed) tsfn.Ref(e);
  }
  void Unref(Napi::Env e) {
    if (!closed) tsfn.Unref(e);
  }

  Napi::ThreadSafeFunction tsfn;
  napi_env env = nullptr;
  bool closed = false;

 protected:
  // Stops and joins the threads, and frees what only they used (JS thread).
  virtual void Stop() = 0;

 private:
  static void OnTeardown(void* arg) {
    ThreadedCore* core = static_cast<ThreadedCore*>(arg);
    core->hooked_ = false;
    core->Close();
  }

  bool hooked_ = false;
};

// The function the threads call when they have something for JS: it schedules
// deliver(core, env, notify) on the JS thread, where it runs if the core still exists and the
// environment is not being torn down. Runs on any thread; the TSFN outlives the threads.
template <typename Core, typename Deliver>
std::function<void()> TsfnWaker(const std::shared_ptr<Core>& core, Deliver deliver) {
  std::weak_ptr<Core> weak = core;
  return [weak, deliver]() {
    auto c = weak.lock();
    if (!c) return;
    c->tsfn.NonBlockingCall([weak, deliver](Napi::Env env, Napi::Function notify) {
      auto cc = weak.lock();
      if (!cc || env == nullptr) return;
      deliver(*cc, env, notify);
    });
  };
}

// Calls notify(make()) from a TSFN callback. No C++ exception may leave that callback
// (std::terminate): a listener that threw is an uncaught exception, as from any event; at
// environment teardown, when JS can no longer run, what it would have been told is dropped.
template <typename Make>
void CallListener(Napi::Env env, Napi::Function notify, Make make) {
  try {
    notify.Call({make()});
  } catch (const Napi::Error&) {
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
    }
  }
}

// The JS object over such a core: close(), ref() and unref(), and the close on garbage collection.
// Derived defines its class with CloseMethod(), RefMethod() and UnrefMethod() among its own.
template <typename Derived, typename Core>
class ThreadedWrap : public Napi::ObjectWrap<Derived> {
 public:
  explicit ThreadedWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Derived>(info) {}
  ~ThreadedWrap() override {
    if (core_) core_->Close();
  }

 protected:
  using Wrap = Napi::ObjectWrap<Derived>;
  static typename Wrap::PropertyDescriptor CloseMethod() {
    return Wrap::InstanceMethod("close", &ThreadedWrap::Close);
  }
  static typename Wrap::PropertyDescriptor RefMethod() {
    return Wrap::InstanceMethod("ref", &ThreadedWrap::Ref);
  }
  static typename Wrap::PropertyDescriptor UnrefMethod() {
    return Wrap::InstanceMethod("unref", &ThreadedWrap::Unref);
  }

  std::shared_ptr<Core> core_;

 private:
  Napi::Value Close(const Napi::CallbackInfo& info) {
    core_->Close();
    return info.Env().Undefined();
  }
  Napi::Value Ref(const Napi::CallbackInfo& info) {
    core_->Ref(info.Env());
    return info.Env().Undefined();
  }
  Napi::Value Unref(const Napi::CallbackInfo& info) {
    core_->Unref(info.Env());
    return info.Env().Undefined();
  }
};
