// Internal test/bench helper: writer threads that stamp memory with counters until stopped, so
// that write-protection faults come from native threads (never the JS thread) and every write
// can be checked afterwards. Not part of the public API.
//
// Memory is cut into 4 KiB slots; thread t owns slots t, t + T, t + 2T, ... and writes them
// round-robin in a fixed order (address order, or a seeded shuffle). Its k-th write (k >= 1)
// stores stamp(t, k) = (t + 1) << 40 | k into 8 words spread over the slot (first word last,
// so a copy taken mid-write would show as torn). Before each write it checks that the slot
// still holds what it wrote there last (or what it held at the start): a mismatch is a writer
// seeing stale data.
//
// new Stamper(address, length, { threads, shuffle, seed })
//   .counts() -> Float64Array: writes completed by each thread (the k of its last write)
//   .order(t) -> Uint32Array: thread t's slots in write order
//   .initial(t) -> BigUint64Array: the first word of each of them before any write
//   .stop() -> Promise<{ counts: Float64Array, stale: number }>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "args.h"
#include "uffd.h"

namespace {

constexpr uint64_t kSlot = 4096;
constexpr int kWords = 8;

struct StampJob {
  uint64_t base = 0;
  int threads = 1;
  std::vector<std::vector<uint32_t>> order;
  std::vector<std::vector<uint64_t>> initial;
  std::unique_ptr<std::atomic<uint64_t>[]> counts;
  std::atomic<uint64_t> stale{0};
  std::atomic<bool> stop{false};
  std::atomic<int> running{0};
  std::vector<std::thread> workers;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  bool settled = false;
  explicit StampJob(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

inline uint64_t Stamp(int t, uint64_t k) { return (static_cast<uint64_t>(t) + 1) << 40 | k; }

void StampLoop(StampJob* job, int t) {
  const std::vector<uint32_t>& own = job->order[t];
  size_t n = own.size();
  if (n == 0) return;
  std::vector<uint64_t> last(job->initial[t]);
  for (uint64_t k = 1; !job->stop.load(std::memory_order_relaxed); k++) {
    size_t j = static_cast<size_t>((k - 1) % n);
    volatile uint64_t* slot = reinterpret_cast<volatile uint64_t*>(job->base + own[j] * kSlot);
    if (slot[0] != last[j]) job->stale.fetch_add(1, std::memory_order_relaxed);
    uint64_t v = Stamp(t, k);
    for (int w = kWords - 1; w >= 0; w--) slot[w * (kSlot / 8 / kWords)] = v;
    last[j] = v;
    job->counts[t].store(k, std::memory_order_release);
  }
}

Napi::Float64Array Counts(Napi::Env env, StampJob* job) {
  auto out = Napi::Float64Array::New(env, job->threads);
  for (int t = 0; t < job->threads; t++) out[t] = static_cast<double>(job->counts[t].load());
  return out;
}

class Stamper : public Napi::ObjectWrap<Stamper> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Stamper",
                       {
                           InstanceMethod<&Stamper::GetCounts>("counts"),
                           InstanceMethod<&Stamper::Order>("order"),
                           InstanceMethod<&Stamper::Initial>("initial"),
                           InstanceMethod<&Stamper::Stop>("stop"),
                       });
  }

  Stamper(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Stamper>(info) {
    Napi::Env env = info.Env();
    uint64_t base = ArgU64(info, 0, "address");
    uint64_t length = ArgU64(info, 1, "length");
    if (base % kSlot != 0 || length < kSlot) ThrowRangeError(env, "the range must be 4 KiB aligned and non-empty");
    Napi::Object opts = info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
    int threads = opts.Get("threads").IsNumber() ? opts.Get("threads").As<Napi::Number>().Int32Value() : 1;
    if (threads < 1 || threads > 64) ThrowRangeError(env, "threads must be 1..64");
    bool shuffle = opts.Get("shuffle").ToBoolean();
    uint64_t seed = opts.Get("seed").IsNumber() ? static_cast<uint64_t>(opts.Get("seed").As<Napi::Number>().Int64Value()) : 1;

    job_ = std::make_shared<StampJob>(env);
    job_->base = base;
    job_->threads = threads;
    job_->counts.reset(new std::atomic<uint64_t>[threads]);
    uint64_t slots = length / kSlot;
    job_->order.resize(threads);
    job_->initial.resize(threads);
    for (int t = 0; t < threads; t++) {
      job_->counts[t].store(0);
      auto& own = job_->order[t];
      for (uint64_t s = static_cast<uint64_t>(t); s < slots; s += threads) own.push_back(static_cast<uint32_t>(s));
      if (shuffle) {
        uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(t) + 1;
        for (size_t i = own.size(); i > 1; i--) {
          x = x * 6364136223846793005ull + 1442695040888963407ull;
          std::swap(own[i - 1], own[(x >> 33) % i]);
        }
      }
      // Read on this (JS) thread: the caller makes sure no fault is pending on this memory.
      for (uint32_t s : own) {
        uint64_t v = *reinterpret_cast<volatile uint64_t*>(base + s * kSlot);
        job_->initial[t].push_back(v);
      }
    }
    stopped_ = Napi::Persistent(job_->deferred.Promise().As<Napi::Object>());
    auto* kept = new std::shared_ptr<StampJob>(job_);
    job_->running.store(threads);
    job_->tsfn = Napi::ThreadSafeFunction::New(
        env, Napi::Function(), "userfaultfd.stamper", 0, threads, kept,
        [](Napi::Env, std::shared_ptr<StampJob>* k) {
          StampJob* job = k->get();
          // Teardown with writers still blocked in faults: they hold their own reference.
          job->stop.store(true);
          for (auto& w : job->workers)
            if (w.joinable()) w.detach();
          delete k;
        });
    for (int t = 0; t < threads; t++) {
      std::shared_ptr<StampJob> job = job_;
      job_->workers.emplace_back([job, t]() {
        StampLoop(job.get(), t);
        if (job->running.fetch_sub(1) == 1) {
          // The last writer out settles stop()'s promise on the JS thread.
          job->tsfn.BlockingCall(job.get(), [](Napi::Env env, Napi::Function, StampJob* j) {
            if (env == nullptr || j->settled) return;
            for (auto& w : j->workers)
              if (w.joinable()) w.join();
            j->settled = true;
            Napi::Object out = Napi::Object::New(env);
            out.Set("counts", Counts(env, j));
            out.Set("stale", Napi::Number::New(env, static_cast<double>(j->stale.load())));
            j->deferred.Resolve(out);
          });
        }
        job->tsfn.Release();
      });
    }
  }

 private:
  Napi::Value GetCounts(const Napi::CallbackInfo& info) { return Counts(info.Env(), job_.get()); }

  Napi::Value Order(const Napi::CallbackInfo& info) {
    int t = ArgI32(info, 0, "thread");
    if (t < 0 || t >= job_->threads) ThrowRangeError(info.Env(), "no such thread");
    const auto& own = job_->order[t];
    auto out = Napi::Uint32Array::New(info.Env(), own.size());
    for (size_t i = 0; i < own.size(); i++) out[i] = own[i];
    return out;
  }

  Napi::Value Initial(const Napi::CallbackInfo& info) {
    int t = ArgI32(info, 0, "thread");
    if (t < 0 || t >= job_->threads) ThrowRangeError(info.Env(), "no such thread");
    const auto& v = job_->initial[t];
    auto out = Napi::BigUint64Array::New(info.Env(), v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = v[i];
    return out;
  }

  // Resolves once every writer has stopped (a writer blocked in a fault stops after it is woken).
  Napi::Value Stop(const Napi::CallbackInfo& info) {
    job_->stop.store(true);
    return stopped_.Value();
  }

  std::shared_ptr<StampJob> job_;
  Napi::ObjectReference stopped_;  // stop()'s promise (a Deferred's handle dies with its scope)
};

}  // namespace

void InitStamper(Napi::Env env, Napi::Object exports) {
  exports.Set("Stamper", Stamper::Define(env));
}
