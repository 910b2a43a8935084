// Internal test/bench/demo helper: a workload over a range of memory, on native threads, for
// migrations (the source's dirtying writer, the target's writer and reader). Not public API.
//
// new Workload(address, length, pageSize, { writeRate, writeOffset, writers, readers, seed, tag })
//   writers: threads writing one u64 stamp (tag << 40 | count) at `writeOffset` of random pages,
//     `writeRate` bytes of pages per second between them (each write dirties one page);
//   readers: threads reading the first u64 of random pages as fast as they can.
//   Every access is timed; an access slower than 2 us counts as a fault.
//   A SIGBUS in a workload thread (a poisoned page) is caught: the thread records it and stops.
// .pause(timeoutMs) -> bool (writers parked)  .resume()
// .stop(timeoutMs) -> number of threads that did not end (blocked in a fault: left behind)
// .stats() -> { writes, reads, sigbus, sigbusAddress, faults, faultP50us, faultP99us, faultMaxUs }
// .stamps() -> BigUint64Array: the last stamp written to each page (0: never written)
#include <setjmp.h>
#include <signal.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "binding/args.h"
#include "binding/uffd.h"
#include "engine/latency_histogram.h"

namespace {

thread_local sigjmp_buf* tJump = nullptr;
thread_local uint64_t tBusAddress = 0;
std::atomic<bool> gHandlerInstalled{false};
struct sigaction gPrevious;

void OnSigbus(int sig, siginfo_t* info, void* ctx) {
  if (tJump != nullptr) {
    tBusAddress = reinterpret_cast<uint64_t>(info->si_addr);
    siglongjmp(*tJump, 1);
  }
  // Not a workload thread: what the process would have done without us.
  sigaction(SIGBUS, &gPrevious, nullptr);
  raise(sig);
}

void InstallHandler() {
  if (gHandlerInstalled.exchange(true)) return;
  struct sigaction sa = {};
  sa.sa_sigaction = OnSigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &gPrevious);
}

inline uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

inline uint64_t Next(uint64_t* s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

struct Job {
  uint64_t base = 0, length = 0, pageSize = 4096, pages = 0;
  uint64_t writeRate = 0, writeOffset = 0, tag = 1, seed = 1;
  int writers = 0, readers = 0;
  std::atomic<bool> stop{false};
  std::atomic<bool> paused{false};
  std::atomic<int> parked{0};
  std::atomic<int> running{0};
  std::atomic<uint64_t> writes{0}, reads{0}, sigbus{0}, sigbusAddress{0};
  std::unique_ptr<std::atomic<uint64_t>[]> stamps;
  LatencyHistogram faults;
  std::vector<std::thread> threads;
};

void Access(Job* job, uint64_t page, bool write, uint64_t stamp) {
  uint64_t t0 = NowNs();
  volatile uint64_t* p =
      reinterpret_cast<volatile uint64_t*>(job->base + page * job->pageSize + (write ? job->writeOffset : 0));
  if (write) {
    *p = stamp;
    job->stamps[page].store(stamp, std::memory_order_relaxed);
  } else {
    (void)*p;
  }
  uint64_t dt = NowNs() - t0;
  if (dt > 2000) job->faults.Record(dt);
}

void Run(std::shared_ptr<Job> job, int index, bool writer) {
  sigjmp_buf jump;
  tJump = &jump;
  if (sigsetjmp(jump, 1) != 0) {
    job->sigbus.fetch_add(1);
    uint64_t expected = 0;
    job->sigbusAddress.compare_exchange_strong(expected, tBusAddress);
    tJump = nullptr;
    job->running.fetch_sub(1);
    return;
  }
  uint64_t rng = job->seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index) * 7919 + (writer ? 1 : 2);
  if (rng == 0) rng = 1;
  const uint64_t perSecond =
      writer && job->writeRate > 0 ? std::max<uint64_t>(1, job->writeRate / job->pageSize) : 0;
  const uint64_t interval = perSecond > 0 ? 1000000000ull * job->writers / perSecond : 0;
  uint64_t due = NowNs();
  uint64_t count = 0;
  while (!job->stop.load(std::memory_order_relaxed)) {
    if (writer && job->paused.load()) {
      job->parked.fetch_add(1);
      while (job->paused.load() && !job->stop.load())
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      job->parked.fetch_sub(1);
      due = NowNs();
      continue;
    }
    uint64_t page = Next(&rng) % job->pages;
    if (writer) {
      count++;
      Access(job.get(), page, true, (job->tag << 40) | (static_cast<uint64_t>(index) << 32) | count);
      job->writes.fetch_add(1, std::memory_order_relaxed);
      if (interval > 0) {
        due += interval;
        uint64_t now = NowNs();
        if (due > now + 200000)
          std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
        else if (now > due + 100000000ull)
          due = now;  // far behind (stalled): do not burst
      }
    } else {
      Access(job.get(), page, false, 0);
      job->reads.fetch_add(1, std::memory_order_relaxed);
    }
  }
  tJump = nullptr;
  job->running.fetch_sub(1);
}

class Workload : public Napi::ObjectWrap<Workload> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Workload",
                       {
                           InstanceMethod<&Workload::Pause>("pause"),
                           InstanceMethod<&Workload::Resume>("resume"),
                           InstanceMethod<&Workload::Stop>("stop"),
                           InstanceMethod<&Workload::Stats>("stats"),
                           InstanceMethod<&Workload::Stamps>("stamps"),
                       });
  }

  Workload(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Workload>(info) {
    Napi::Env env = info.Env();
    job_ = std::make_shared<Job>();
    job_->base = ArgU64(info, 0, "address");
    job_->length = ArgU64(info, 1, "length");
    job_->pageSize = ArgU64(info, 2, "pageSize");
    if (job_->pageSize < 4096 || job_->length < job_->pageSize || job_->length % job_->pageSize)
      ThrowRangeError(env, "length must be a positive multiple of pageSize");
    job_->pages = job_->length / job_->pageSize;
    Napi::Object o = info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
    auto num = [&](const char* name, double fallback) {
      Napi::Value v = o.Get(name);
      return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : fallback;
    };
    job_->writeRate = static_cast<uint64_t>(num("writeRate", 0));
    job_->writeOffset = static_cast<uint64_t>(num("writeOffset", 0));
    if (job_->writeOffset + 8 > job_->pageSize)
      ThrowRangeError(env, "writeOffset must leave 8 bytes in the page");
    job_->writers = static_cast<int>(num("writers", 0));
    job_->readers = static_cast<int>(num("readers", 0));
    job_->seed = static_cast<uint64_t>(num("seed", 1));
    job_->tag = static_cast<uint64_t>(num("tag", 1)) & 0xFFFFFF;
    if (job_->writers < 0 || job_->writers > 64 || job_->readers < 0 || job_->readers > 64)
      ThrowRangeError(env, "0..64 writers and readers");
    job_->stamps.reset(new std::atomic<uint64_t>[job_->pages]);
    for (uint64_t i = 0; i < job_->pages; i++) job_->stamps[i].store(0);
    InstallHandler();
    for (int i = 0; i < job_->writers + job_->readers; i++) {
      job_->running.fetch_add(1);
      job_->threads.emplace_back(Run, job_, i, i < job_->writers);
    }
  }

  ~Workload() override { Finish(1000); }

 private:
  // Stops the threads; those still blocked (in a fault nobody resolves) are left behind.
  int Finish(int timeoutMs) {
    job_->stop.store(true);
    uint64_t deadline = NowNs() + static_cast<uint64_t>(timeoutMs) * 1000000ull;
    while (job_->running.load() > 0 && NowNs() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    int stuck = job_->running.load();
    for (auto& t : job_->threads) {
      if (stuck == 0)
        t.join();
      else
        t.detach();  // holds its own reference to the job
    }
    job_->threads.clear();
    return stuck;
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    int timeoutMs = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1000;
    job_->paused.store(true);
    uint64_t deadline = NowNs() + static_cast<uint64_t>(timeoutMs) * 1000000ull;
    while (job_->parked.load() < job_->writers && NowNs() < deadline && job_->running.load() > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    return Napi::Boolean::New(info.Env(), job_->parked.load() >= job_->writers);
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    job_->paused.store(false);
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    int timeoutMs = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1000;
    return Napi::Number::New(info.Env(), Finish(timeoutMs));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("writes", Napi::Number::New(env, static_cast<double>(job_->writes.load())));
    o.Set("reads", Napi::Number::New(env, static_cast<double>(job_->reads.load())));
    o.Set("sigbus", Napi::Number::New(env, static_cast<double>(job_->sigbus.load())));
    o.Set("sigbusAddress", Napi::BigInt::New(env, job_->sigbusAddress.load()));
    o.Set("faults", Napi::Number::New(env, static_cast<double>(job_->faults.Count())));
    o.Set("faultP50us", Napi::Number::New(env, job_->faults.Quantile(0.5) / 1000.0));
    o.Set("faultP99us", Napi::Number::New(env, job_->faults.Quantile(0.99) / 1000.0));
    o.Set("faultMaxUs", Napi::Number::New(env, job_->faults.Quantile(1.0) / 1000.0));
    o.Set("running", Napi::Number::New(env, job_->running.load()));
    return o;
  }

  Napi::Value Stamps(const Napi::CallbackInfo& info) {
    Napi::BigUint64Array out = Napi::BigUint64Array::New(info.Env(), job_->pages);
    for (uint64_t i = 0; i < job_->pages; i++) out[i] = job_->stamps[i].load();
    return out;
  }

  std::shared_ptr<Job> job_;
};

}  // namespace

void InitWorkload(Napi::Env env, Napi::Object exports) {
  exports.Set("Workload", Workload::Define(env));
}
