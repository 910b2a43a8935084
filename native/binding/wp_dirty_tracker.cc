// WpDirtyTracker for JS: DirtyTracker's synchronous mode (engine/wp_dirty_tracker.h).
//   new WpDirtyTracker(uffd, start, length, pageSize, missing)  write-protects, starts the thread
//   tracker.collect(reprotect) -> BigUint64Array [start, end)*
//   tracker.stats() -> { wpFaults, missingFaults }
//   tracker.stop()  joins the thread (idempotent); also on environment teardown
#include <napi.h>

#include <memory>

#include "binding/args.h"
#include "binding/uffd.h"
#include "engine/wp_dirty_tracker.h"

namespace {

void OnEnvTeardown(void* arg) {
  static_cast<WpDirtyTracker*>(arg)->Stop();
}

class WpDirtyTrackerWrap : public Napi::ObjectWrap<WpDirtyTrackerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "WpDirtyTracker",
                       {
                           InstanceMethod<&WpDirtyTrackerWrap::Collect>("collect"),
                           InstanceMethod<&WpDirtyTrackerWrap::Stats>("stats"),
                           InstanceMethod<&WpDirtyTrackerWrap::Stop>("stop"),
                       });
  }

  WpDirtyTrackerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<WpDirtyTrackerWrap>(info) {
    Napi::Env env = info.Env();
    int uffd = ArgFd(info, 0);
    uint64_t start = ArgU64(info, 1, "start");
    uint64_t length = ArgU64(info, 2, "length");
    uint64_t pageSize = ArgU64(info, 3, "pageSize");
    bool missing = info[4].ToBoolean();
    if (pageSize < 4096 || (pageSize & (pageSize - 1)) != 0)
      ThrowRangeError(env, "pageSize must be a power of two >= 4096");
    if (length == 0 || length % pageSize != 0 || start % pageSize != 0)
      ThrowRangeError(env, "the range must be non-empty and aligned to the page size");
    tracker_ = std::make_unique<WpDirtyTracker>(uffd, start, length, pageSize, missing);
    WpDirtyError error;
    if (!tracker_->Start(&error)) {
      tracker_.reset();
      ThrowUffdError(env, error.err, error.syscall, -1, error.detail);
    }
    env_ = env;
    napi_add_env_cleanup_hook(env, OnEnvTeardown, tracker_.get());
  }

  ~WpDirtyTrackerWrap() override { Release(); }

 private:
  void Release() {
    if (!tracker_) return;
    napi_remove_env_cleanup_hook(env_, OnEnvTeardown, tracker_.get());
    tracker_->Stop();
    tracker_.reset();
  }

  WpDirtyTracker* Live(Napi::Env env) {
    if (!tracker_) ThrowTypeError(env, "the dirty tracker was stopped");
    return tracker_.get();
  }

  Napi::Value Collect(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    WpDirtyTracker* t = Live(env);
    std::vector<uint64_t> runs;
    WpDirtyError error;
    if (!t->Collect(info[0].ToBoolean(), &runs, &error))
      ThrowUffdError(env, error.err, error.syscall, -1, error.detail);
    auto out = Napi::BigUint64Array::New(env, runs.size());
    for (size_t i = 0; i < runs.size(); i++) out[i] = runs[i];
    return out;
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    WpDirtyTracker* t = Live(env);
    Napi::Object o = Napi::Object::New(env);
    o.Set("wpFaults", Napi::Number::New(env, static_cast<double>(t->WpFaults())));
    o.Set("missingFaults", Napi::Number::New(env, static_cast<double>(t->MissingFaults())));
    return o;
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  std::unique_ptr<WpDirtyTracker> tracker_;
  napi_env env_ = nullptr;
};

}  // namespace

void InitWpDirtyTracker(Napi::Env env, Napi::Object exports) {
  exports.Set("WpDirtyTracker", WpDirtyTrackerWrap::Define(env));
}
