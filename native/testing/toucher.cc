// Internal test/bench helper: touch pages and change the address space from native threads, so
// that faults and events are raised off the JS thread (which is the one resolving them: a FORK,
// REMAP, REMOVE or UNMAP event blocks its causer until read, a fault until resolved).
// Not part of the public API.
//
// touch(addresses: BigUint64Array, { write, value, threads, timings, workNs, cpu }) -> Promise<{
//   values: BigUint64Array (the u64 read at each address, or written), ns?: Float64Array }>
//   workNs: busy work after each touch (a workload that computes on what it touched);
//   cpu: pin the touching threads to this CPU (benchmarks that choose the placement).
// madviseOnThread(address, length, advice) -> Promise<{ errno }>
// mremapOnThread(address, oldLength, newLength) -> Promise<{ errno, result: new address }>
// munmapOnThread(address, length) -> Promise<{ errno }>
// forkOnThread(readAt?) -> Promise<{ pid, status }>: the child exits at once, with status 0 or, given
//   readAt, the low byte of the u64 it reads there (a fault for the fork's uffd); the thread reaps it.
// mmapRaw(length) -> bigint: anonymous memory that no Mapping owns (for mremap/munmap tests).
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "binding/args.h"
#include "engine/util.h"
#include "testing/testing.h"

namespace {

enum class Op { Touch, Madvise, Mremap, Munmap, Fork };

struct TouchJob {
  Op op = Op::Touch;
  std::vector<uint64_t> addresses;
  std::vector<uint64_t> values;
  std::vector<double> ns;
  bool write = false;
  bool timings = false;
  uint64_t workNs = 0;
  uint64_t value = 0;
  int cpu = -1;         // pin the touching threads to this CPU (benchmarks: placement on purpose)
  uint64_t length = 0;  // madvise/mremap/munmap length (mremap: old length)
  uint64_t arg = 0;     // madvise advice, mremap new length
  uint64_t result = 0;  // mremap's new address
  int err = 0;
  int pid = 0;
  int status = 0;
  std::atomic<int> running{0};
  // Set once the TSFN is finalized (normally after the last Release; at environment teardown
  // possibly while threads are still blocked in faults). A thread that wakes up after that
  // must not touch the freed TSFN.
  std::mutex mu;
  bool finalized = false;
  std::vector<std::thread> threads;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  explicit TouchJob(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

void RunMemoryOp(TouchJob* job) {
  void* addr = reinterpret_cast<void*>(job->addresses[0]);
  switch (job->op) {
    case Op::Madvise:
      if (madvise(addr, job->length, static_cast<int>(job->arg)) != 0) job->err = errno;
      break;
    case Op::Mremap: {
      void* out = mremap(addr, job->length, job->arg, MREMAP_MAYMOVE);
      if (out == MAP_FAILED)
        job->err = errno;
      else
        job->result = reinterpret_cast<uintptr_t>(out);
      break;
    }
    case Op::Munmap:
      if (munmap(addr, job->length) != 0) job->err = errno;
      break;
    case Op::Fork: {
      // A raw clone, not glibc's fork(): fork() holds glibc's malloc and stdio locks across the
      // syscall, and with EVENT_FORK the syscall blocks until the event is read, so the JS
      // thread (the reader) would deadlock on its next malloc. The child only exits.
      pid_t pid = static_cast<pid_t>(syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0));
      if (pid == 0) {
        uint64_t at = job->addresses[0];
        syscall(SYS_exit_group,
                at == 0 ? 0 : static_cast<int>(*reinterpret_cast<volatile uint64_t*>(at) & 0xff));
      }
      if (pid < 0) {
        job->err = errno;
        break;
      }
      job->pid = pid;
      while (waitpid(pid, &job->status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    case Op::Touch:
      break;
  }
}

void TouchSlice(TouchJob* job, size_t begin, size_t end, size_t step) {
  if (job->op != Op::Touch) {
    RunMemoryOp(job);
    return;
  }
  for (size_t i = begin; i < end; i += step) {
    volatile uint64_t* p = reinterpret_cast<volatile uint64_t*>(job->addresses[i]);
    uint64_t t0 = job->timings ? NowNs() : 0;
    if (job->write) {
      *p = job->value + i;
      job->values[i] = job->value + i;
    } else {
      job->values[i] = *p;
    }
    if (job->timings) job->ns[i] = static_cast<double>(NowNs() - t0);
    if (job->workNs > 0) {
      uint64_t until = NowNs() + job->workNs;
      while (NowNs() < until) {
      }
    }
  }
}

void Settle(Napi::Env env, TouchJob* job) {
  for (auto& t : job->threads)
    if (t.joinable()) t.join();
  Napi::Object result = Napi::Object::New(env);
  result.Set("errno", Napi::Number::New(env, job->err));
  if (job->op == Op::Touch) {
    size_t n = job->values.size();
    auto values = Napi::BigUint64Array::New(env, n);
    for (size_t i = 0; i < n; i++) values[i] = job->values[i];
    result.Set("values", values);
    if (job->timings) {
      auto ns = Napi::Float64Array::New(env, n);
      for (size_t i = 0; i < n; i++) ns[i] = job->ns[i];
      result.Set("ns", ns);
    }
  } else {
    result.Set("values", Napi::BigUint64Array::New(env, 0));
  }
  if (job->op == Op::Mremap) result.Set("result", U64(env, job->result));
  if (job->op == Op::Fork) {
    result.Set("pid", Napi::Number::New(env, job->pid));
    result.Set("status", Napi::Number::New(env, job->status));
  }
  job->deferred.Resolve(result);
}

// Starts `threads` threads over the job and returns its promise.
Napi::Value Start(Napi::Env env, std::shared_ptr<TouchJob> job, int threads) {
  Napi::Promise promise = job->deferred.Promise();
  // The finalizer runs on the JS thread once every thread has released the TSFN.
  auto* keep = new std::shared_ptr<TouchJob>(job);
  job->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "userfaultfd.touch", 0, threads, keep,
                                            [](Napi::Env env, std::shared_ptr<TouchJob>* kept) {
                                              TouchJob* j = kept->get();
                                              {
                                                std::lock_guard<std::mutex> lock(j->mu);
                                                j->finalized = true;
                                              }
                                              if (j->running.load() == 0) {
                                                // At environment teardown the promise can no longer be
                                                // settled (Node-API fails, node-addon-api throws): nobody
                                                // awaits it any more, and no C++ exception may leave a
                                                // finalizer.
                                                try {
                                                  Settle(env, j);
                                                } catch (const Napi::Error&) {
                                                }
                                              } else {
                                                // Environment teardown while threads are still blocked in
                                                // faults: they own a reference to the job, so let them finish
                                                // on their own.
                                                for (auto& t : j->threads)
                                                  if (t.joinable()) t.detach();
                                              }
                                              delete kept;
                                            });
  size_t n = job->addresses.size();
  job->running.store(threads);
  for (int t = 0; t < threads; t++) {
    job->threads.emplace_back([job, t, threads, n]() {
      if (job->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(job->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
      }
      TouchSlice(job.get(), static_cast<size_t>(t), n, static_cast<size_t>(threads));
      job->running.fetch_sub(1);
      std::lock_guard<std::mutex> lock(job->mu);
      if (!job->finalized) job->tsfn.Release();
    });
  }
  return promise;
}

Napi::Value Touch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array)
    ThrowTypeError(env, "addresses must be a BigUint64Array");
  auto list = info[0].As<Napi::BigUint64Array>();
  Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
  int threads = opts.Get("threads").IsNumber() ? opts.Get("threads").As<Napi::Number>().Int32Value() : 1;
  if (threads < 1 || threads > 64) ThrowRangeError(env, "threads must be 1..64");

  auto job = std::make_shared<TouchJob>(env);
  job->addresses.assign(list.Data(), list.Data() + list.ElementLength());
  job->values.resize(job->addresses.size());
  job->write = opts.Get("write").ToBoolean();
  job->timings = opts.Get("timings").ToBoolean();
  if (opts.Get("value").IsBigInt()) {
    bool lossless;
    job->value = opts.Get("value").As<Napi::BigInt>().Uint64Value(&lossless);
  }
  if (job->timings) job->ns.resize(job->addresses.size());
  if (opts.Get("workNs").IsNumber())
    job->workNs = static_cast<uint64_t>(opts.Get("workNs").As<Napi::Number>().DoubleValue());
  if (opts.Get("cpu").IsNumber()) {
    job->cpu = opts.Get("cpu").As<Napi::Number>().Int32Value();
    if (job->cpu < 0 || job->cpu >= CPU_SETSIZE) ThrowRangeError(env, "cpu must be 0..1023");
  }
  return Start(env, job, threads);
}

Napi::Value MemoryOp(const Napi::CallbackInfo& info, Op op) {
  auto job = std::make_shared<TouchJob>(info.Env());
  job->op = op;
  bool given = info.Length() > 0 && !info[0].IsUndefined();
  job->addresses.push_back(op == Op::Fork && !given ? 0 : ArgU64(info, 0, "address"));
  if (op != Op::Fork) job->length = ArgU64(info, 1, "length");
  if (op == Op::Madvise || op == Op::Mremap) job->arg = ArgU64(info, 2, "arg");
  return Start(info.Env(), job, 1);
}

Napi::Value MadviseOnThread(const Napi::CallbackInfo& info) {
  return MemoryOp(info, Op::Madvise);
}
Napi::Value MremapOnThread(const Napi::CallbackInfo& info) {
  return MemoryOp(info, Op::Mremap);
}
Napi::Value MunmapOnThread(const Napi::CallbackInfo& info) {
  return MemoryOp(info, Op::Munmap);
}
Napi::Value ForkOnThread(const Napi::CallbackInfo& info) {
  return MemoryOp(info, Op::Fork);
}

Napi::Value MmapRaw(const Napi::CallbackInfo& info) {
  uint64_t length = ArgU64(info, 0, "length");
  void* p = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) ThrowUffdError(info.Env(), errno, "mmap");
  return U64(info.Env(), reinterpret_cast<uintptr_t>(p));
}

}  // namespace

void InitToucher(Napi::Env env, Napi::Object exports) {
  exports.Set("touch", Napi::Function::New(env, Touch, "touch"));
  exports.Set("madviseOnThread", Napi::Function::New(env, MadviseOnThread, "madviseOnThread"));
  exports.Set("mremapOnThread", Napi::Function::New(env, MremapOnThread, "mremapOnThread"));
  exports.Set("munmapOnThread", Napi::Function::New(env, MunmapOnThread, "munmapOnThread"));
  exports.Set("forkOnThread", Napi::Function::New(env, ForkOnThread, "forkOnThread"));
  exports.Set("mmapRaw", Napi::Function::New(env, MmapRaw, "mmapRaw"));
}
