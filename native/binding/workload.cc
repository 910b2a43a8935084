// Workload: the JS face of engine/workload.h (writers and readers over a range, for
// `userfaultfd migrate`, its tests and its benchmark).
//
// new Workload(address, length, pageSize, { writeRate, writeOffset, writers, readers, seed, tag })
// .pause(timeoutMs) -> bool  .resume()  .stop(timeoutMs) -> threads left behind
// .stats() -> { writes, reads, sigbus, sigbusAddress, faults, faultP50us, faultP99us, faultMaxUs, running }
// .stamps() -> BigUint64Array: the last stamp written to each page (0: never written)
#include <memory>

#include "binding/args.h"
#include "binding/uffd.h"
#include "engine/util.h"
#include "engine/workload.h"

namespace {

class WorkloadHandle : public Napi::ObjectWrap<WorkloadHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Workload",
                       {
                           InstanceMethod<&WorkloadHandle::Pause>("pause"),
                           InstanceMethod<&WorkloadHandle::Resume>("resume"),
                           InstanceMethod<&WorkloadHandle::Stop>("stop"),
                           InstanceMethod<&WorkloadHandle::Stats>("stats"),
                           InstanceMethod<&WorkloadHandle::Stamps>("stamps"),
                       });
  }

  WorkloadHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<WorkloadHandle>(info) {
    Napi::Env env = info.Env();
    uint64_t base = ArgU64(info, 0, "address");
    uint64_t length = ArgU64(info, 1, "length");
    uint64_t pageSize = ArgU64(info, 2, "pageSize");
    if (pageSize < BasePageSize() || (pageSize & (pageSize - 1)) || length < pageSize || length % pageSize ||
        base % pageSize)
      ThrowRangeError(env, "the range must be a positive number of pages, aligned");
    Napi::Object o = info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
    auto num = [&](const char* name, double fallback) {
      Napi::Value v = o.Get(name);
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : fallback;
      if (!(d >= 0) || d > 9007199254740991.0) ThrowRangeError(env, std::string(name) + " must be >= 0");
      return d;
    };
    WorkloadOptions w;
    w.writeRate = static_cast<uint64_t>(num("writeRate", 0));
    w.writeOffset = static_cast<uint64_t>(num("writeOffset", 0));
    w.writers = static_cast<int>(num("writers", 0));
    w.readers = static_cast<int>(num("readers", 0));
    w.seed = static_cast<uint64_t>(num("seed", 1));
    w.tag = static_cast<uint64_t>(num("tag", 1));
    if (w.writeOffset % 8 != 0 || w.writeOffset + 8 > pageSize)
      ThrowRangeError(env, "writeOffset must be 8-aligned and leave 8 bytes in the page");
    if (w.writers > 64 || w.readers > 64) ThrowRangeError(env, "0..64 writers and readers");
    workload_.reset(new Workload(base, length, pageSize, w));
  }

 private:
  static int Ms(const Napi::CallbackInfo& info) {
    return info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1000;
  }
  Napi::Value Pause(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), workload_->Pause(Ms(info)));
  }
  Napi::Value Resume(const Napi::CallbackInfo& info) {
    workload_->Resume();
    return info.Env().Undefined();
  }
  Napi::Value Stop(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), workload_->Stop(Ms(info)));
  }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    auto put = [&](const char* name, double v) { o.Set(name, Napi::Number::New(env, v)); };
    put("writes", static_cast<double>(workload_->writes()));
    put("reads", static_cast<double>(workload_->reads()));
    put("sigbus", static_cast<double>(workload_->sigbus()));
    o.Set("sigbusAddress", Napi::BigInt::New(env, workload_->sigbusAddress()));
    const LatencyHistogram& h = workload_->faults();
    put("faults", static_cast<double>(h.Count()));
    put("faultP50us", h.Quantile(0.5) / 1000.0);
    put("faultP99us", h.Quantile(0.99) / 1000.0);
    put("faultMaxUs", h.Quantile(1.0) / 1000.0);
    put("running", workload_->running());
    return o;
  }
  Napi::Value Stamps(const Napi::CallbackInfo& info) {
    Napi::BigUint64Array out = Napi::BigUint64Array::New(info.Env(), workload_->pages());
    for (uint64_t i = 0; i < workload_->pages(); i++) out[i] = workload_->stamp(i);
    return out;
  }

  std::unique_ptr<Workload> workload_;
};

}  // namespace

void InitWorkload(Napi::Env env, Napi::Object exports) {
  exports.Set("Workload", WorkloadHandle::Define(env));
}
