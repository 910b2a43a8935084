// Internal test/bench helper: writer threads that stamp memory with counters until stopped, so
// that write-protection faults come from native threads (never the JS thread) and every write
// can be checked afterwards. Not part of the public API.
//
// Memory is cut into 4 KiB slots; thread t owns slots t, t + T, t + 2T, ... and writes them
// round-robin in a fixed order (address order, or a seeded shuffle). Its k-th write (k >= 1)
// stores stamp(t, k) = run << 48 | (t + 1) << 40 | k into 8 words spread over the slot (first
// word last, so a copy taken mid-write would show as torn). `run` numbers the stampers of this
// process (1..65535, then again from 1): a stamper started on memory another one wrote never
// writes a value that was already there, so a slot's value tells which of them wrote it (with
// the same order, two stampers would otherwise write the very same values to the same slots). Before each
// write it checks that the slot still holds what it wrote there last (or what it held at the start): a
// mismatch is a writer seeing stale data.
//
// new Stamper(address, length, { threads, shuffle, seed })
//   .run() -> this stamper's run number (see stamp(t, k))
//   .counts() -> Float64Array: writes completed by each thread (the k of its last write)
//   .order(t) -> Uint32Array: thread t's slots in write order
//   .initial(t) -> BigUint64Array: the first word of each of them before any write
//   .maxGapMs(reset?) -> the longest time any thread took for 64 consecutive writes (its longest
//     stall, to ~64 writes' precision) since the start or the last reset
//   .stop() -> Promise<{ counts: Float64Array, stale: number }>
#include <time.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "binding/args.h"
#include "engine/util.h"
#include "testing/testing.h"

namespace {

constexpr uint64_t kSlot = 4096;
constexpr int kWords = 8;

struct StampJob {
  uint64_t base = 0;
  uint64_t run = 1;
  int threads = 1;
  std::vector<std::vector<uint32_t>> order;
  std::vector<std::vector<uint64_t>> initial;
  std::unique_ptr<std::atomic<uint64_t>[]> counts;
  std::atomic<uint64_t> stale{0};
  std::atomic<uint64_t> maxGapNs{0};
  std::atomic<bool> stop{false};
  std::atomic<int> running{0};
  std::vector<std::thread> workers;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  bool settled = false;
  std::shared_ptr<StampJob>* hookArg = nullptr;  // env teardown hook's reference, while registered
  explicit StampJob(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

inline uint64_t Stamp(uint64_t run, int t, uint64_t k) {
  return run << 48 | (static_cast<uint64_t>(t) + 1) << 40 | k;
}

std::atomic<uint64_t> nextRun{0};

uint64_t NewRun() {
  return nextRun.fetch_add(1) % 65535 + 1;
}

void StampLoop(StampJob* job, int t) {
  const std::vector<uint32_t>& own = job->order[t];
  size_t n = own.size();
  if (n == 0) return;
  std::vector<uint64_t> last(job->initial[t]);
  uint64_t mark = NowNs();
  for (uint64_t k = 1; !job->stop.load(std::memory_order_relaxed); k++) {
    if ((k & 63) == 0) {
      uint64_t now = NowNs();
      if (now - mark > job->maxGapNs.load(std::memory_order_relaxed))
        job->maxGapNs.store(now - mark, std::memory_order_relaxed);
      mark = now;
    }
    size_t j = static_cast<size_t>((k - 1) % n);
    volatile uint64_t* slot = reinterpret_cast<volatile uint64_t*>(job->base + own[j] * kSlot);
    if (slot[0] != last[j]) job->stale.fetch_add(1, std::memory_order_relaxed);
    uint64_t v = Stamp(job->run, t, k);
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

// Environment teardown (a worker exiting) while writers run: stop and join them before the
// memory they write is unmapped. Hooks run in reverse order of registration, so a snapshot taken
// after the stamper started has already released writers blocked in its faults.
void OnEnvTeardown(void* arg) {
  auto* kept = static_cast<std::shared_ptr<StampJob>*>(arg);
  StampJob* job = kept->get();
  job->hookArg = nullptr;
  job->stop.store(true);
  for (auto& w : job->workers)
    if (w.joinable()) w.join();
  delete kept;
}

class Stamper : public Napi::ObjectWrap<Stamper> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Stamper",
                       {
                           InstanceMethod<&Stamper::GetRun>("run"),
                           InstanceMethod<&Stamper::GetCounts>("counts"),
                           InstanceMethod<&Stamper::Order>("order"),
                           InstanceMethod<&Stamper::Initial>("initial"),
                           InstanceMethod<&Stamper::Stop>("stop"),
                           InstanceMethod<&Stamper::MaxGapMs>("maxGapMs"),
                       });
  }

  Stamper(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Stamper>(info) {
    Napi::Env env = info.Env();
    uint64_t base = ArgU64(info, 0, "address");
    uint64_t length = ArgU64(info, 1, "length");
    if (base % kSlot != 0 || length < kSlot)
      ThrowRangeError(env, "the range must be 4 KiB aligned and non-empty");
    Napi::Object opts = info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
    int threads = opts.Get("threads").IsNumber() ? opts.Get("threads").As<Napi::Number>().Int32Value() : 1;
    if (threads < 1 || threads > 64) ThrowRangeError(env, "threads must be 1..64");
    bool shuffle = opts.Get("shuffle").ToBoolean();
    uint64_t seed = opts.Get("seed").IsNumber()
                        ? static_cast<uint64_t>(opts.Get("seed").As<Napi::Number>().Int64Value())
                        : 1;

    job_ = std::make_shared<StampJob>(env);
    job_->base = base;
    job_->run = NewRun();
    job_->threads = threads;
    job_->counts.reset(new std::atomic<uint64_t>[threads]);
    uint64_t slots = length / kSlot;
    job_->order.resize(threads);
    job_->initial.resize(threads);
    for (int t = 0; t < threads; t++) {
      job_->counts[t].store(0);
      auto& own = job_->order[t];
      for (uint64_t s = static_cast<uint64_t>(t); s < slots; s += threads)
        own.push_back(static_cast<uint32_t>(s));
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
    job_->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "userfaultfd.stamper", 0, threads, kept,
                                               [](Napi::Env, std::shared_ptr<StampJob>* k) {
                                                 StampJob* job = k->get();
                                                 // Teardown with writers still blocked in faults: they hold
                                                 // their own reference.
                                                 job->stop.store(true);
                                                 for (auto& w : job->workers)
                                                   if (w.joinable()) w.detach();
                                                 delete k;
                                               });
    job_->hookArg = new std::shared_ptr<StampJob>(job_);
    napi_add_env_cleanup_hook(env, OnEnvTeardown, job_->hookArg);
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
            if (j->hookArg != nullptr) {
              napi_remove_env_cleanup_hook(env, OnEnvTeardown, j->hookArg);
              delete j->hookArg;
              j->hookArg = nullptr;
            }
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
  Napi::Value GetRun(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(job_->run));
  }

  // A per-thread vector (argument 0 picks the thread) as a typed array.
  template <typename Array, typename T>
  Napi::Value PerThread(const Napi::CallbackInfo& info, const std::vector<std::vector<T>>& of) {
    int t = ArgI32(info, 0, "thread");
    if (t < 0 || t >= job_->threads) ThrowRangeError(info.Env(), "no such thread");
    auto out = Array::New(info.Env(), of[t].size());
    for (size_t i = 0; i < of[t].size(); i++) out[i] = of[t][i];
    return out;
  }

  Napi::Value Order(const Napi::CallbackInfo& info) {
    return PerThread<Napi::Uint32Array>(info, job_->order);
  }
  Napi::Value Initial(const Napi::CallbackInfo& info) {
    return PerThread<Napi::BigUint64Array>(info, job_->initial);
  }

  Napi::Value MaxGapMs(const Napi::CallbackInfo& info) {
    double ms = static_cast<double>(job_->maxGapNs.load()) / 1e6;
    if (info[0].ToBoolean()) job_->maxGapNs.store(0);
    return Napi::Number::New(info.Env(), ms);
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
