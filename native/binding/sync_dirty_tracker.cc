// SyncDirtyTracker: the JS face of engine/sync_dirty_tracker.h (dirty pages by synchronous write
// protection, where the kernel lacks WP_ASYNC/PAGEMAP_SCAN).
//
// new SyncDirtyTracker(uffd, address, length, pageSize, populate): protects the range, starts the thread
// .collect() -> Float64Array of [first page, count] pairs (protected again)
// .stats() -> { faults, errno }   .stop(): joins the thread, unprotects the range (idempotent)
#include <memory>
#include <utility>
#include <vector>

#include "binding/args.h"
#include "binding/uffd.h"
#include "engine/sync_dirty_tracker.h"
#include "engine/util.h"

namespace {

class SyncDirtyTrackerHandle : public Napi::ObjectWrap<SyncDirtyTrackerHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SyncDirtyTracker",
                       {
                           InstanceMethod<&SyncDirtyTrackerHandle::Collect>("collect"),
                           InstanceMethod<&SyncDirtyTrackerHandle::Stats>("stats"),
                           InstanceMethod<&SyncDirtyTrackerHandle::Stop>("stop"),
                       });
  }

  SyncDirtyTrackerHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SyncDirtyTrackerHandle>(info) {
    Napi::Env env = info.Env();
    int uffd = ArgFd(info, 0);
    uint64_t start = ArgU64(info, 1, "address");
    uint64_t length = ArgU64(info, 2, "length");
    uint64_t pageSize = ArgU64(info, 3, "pageSize");
    if (pageSize < BasePageSize() || !IsPowerOfTwo(pageSize) || length == 0 || length % pageSize ||
        start % pageSize)
      ThrowRangeError(env, "the range must be a positive number of pages, aligned");
    bool populate = info[4].IsBoolean() && info[4].As<Napi::Boolean>().Value();
    tracker_.reset(new SyncDirtyTracker(uffd, start, length, pageSize));
    if (int err = tracker_->Start(populate)) {
      tracker_.reset();
      ThrowUffdError(env, err,
                     populate ? "madvise(MADV_POPULATE_WRITE) or ioctl(UFFDIO_WRITEPROTECT)"
                              : "ioctl(UFFDIO_WRITEPROTECT)");
    }
  }

 private:
  Napi::Value Collect(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!tracker_) ThrowTypeError(env, "the dirty tracker was stopped");
    if (int err = tracker_->error()) ThrowUffdError(env, err, "read(userfaultfd)");
    std::vector<std::pair<uint64_t, uint64_t>> runs;
    if (int err = tracker_->Collect(&runs)) ThrowUffdError(env, err, "ioctl(UFFDIO_WRITEPROTECT)");
    Napi::Float64Array out = Napi::Float64Array::New(env, runs.size() * 2);
    for (size_t i = 0; i < runs.size(); i++) {
      out[i * 2] = static_cast<double>(runs[i].first);
      out[i * 2 + 1] = static_cast<double>(runs[i].second);
    }
    return out;
  }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("faults", Napi::Number::New(env, tracker_ ? static_cast<double>(tracker_->faults()) : 0));
    o.Set("errno", Napi::Number::New(env, tracker_ ? tracker_->error() : 0));
    return o;
  }
  Napi::Value Stop(const Napi::CallbackInfo& info) {
    tracker_.reset();  // joins the thread, unprotects the range
    return info.Env().Undefined();
  }

  std::unique_ptr<SyncDirtyTracker> tracker_;
};

}  // namespace

void InitSyncDirtyTracker(Napi::Env env, Napi::Object exports) {
  exports.Set("SyncDirtyTracker", SyncDirtyTrackerHandle::Define(env));
}
