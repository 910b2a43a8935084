// FaultServerHandle: the JS face of a FaultEngine (fault_engine.h). One engine per handle, all
// state per environment; the engine's notices reach JS through one threadsafe function, and
// the engine's threads are joined on close(), on garbage collection and on environment teardown
// (cleanup hook), whichever comes first.
//
// new FaultServerHandle(fd, options, notify(notices[]))
//   addRange(id, address, length, source, sourceOffset, prefetch, faultAround)
//     source: { kind: 'buffer', bytes } | { kind: 'memory', address, length }
//           | { kind: 'file', fd, mmap } | { kind: 'zero' } | { kind: 'handler', id }
//   removeRange(start, end) -> count; complete(requestId, bytes | null); stats(); settled();
//   provide(rangeId, sourceOffset, bytes) -> bytes queued; providedQueued();
//   recordTouches(on); takeTouches() -> { ranges: Uint32Array, offsets: Float64Array };
//   resume() (options.startPaused: read nothing from the uffd until then);
//   close(); ref(); unref()
#include <errno.h>
#include <unistd.h>

#include <memory>

#include "binding/args.h"
#include "binding/uffd.h"
#include "binding/watchdog.h"
#include "engine/fault_engine.h"

namespace {

// JS buffers handed to the engine by provide(): referenced until the engine is done with them,
// then released on the JS thread (references may only be deleted there).
struct Releases {
  std::mutex mu;
  std::vector<napi_ref> refs;
};

struct Core {
  std::unique_ptr<FaultEngine> engine;
  std::shared_ptr<Releases> releases = std::make_shared<Releases>();
  int watchdogMs = 0;
  uint64_t faultAroundMax = 2 << 20;
  bool watched = false;
  Napi::ThreadSafeFunction tsfn;
  napi_env env = nullptr;
  bool closed = false;
  bool hooked = false;

  void Close() {
    if (closed) return;
    closed = true;
    if (watched) WatchdogForget(env, engine->requestFd());
    engine->Stop();  // joins the threads: nothing calls the TSFN after this
    engine->DropProvided();
    Release(env);
    tsfn.Release();
    if (hooked) napi_remove_env_cleanup_hook(env, OnTeardown, this);
    hooked = false;
  }
  // Deletes the references of provided buffers the engine is done with (JS thread).
  void Release(napi_env e) {
    std::vector<napi_ref> refs;
    {
      std::lock_guard<std::mutex> lock(releases->mu);
      refs.swap(releases->refs);
    }
    for (napi_ref r : refs) napi_delete_reference(e, r);
  }
  static void OnTeardown(void* arg) {
    Core* core = static_cast<Core*>(arg);
    core->hooked = false;
    core->Close();
  }
};

uint64_t OptU64(Napi::Object opts, const char* name, uint64_t fallback) {
  Napi::Value v = opts.Get(name);
  if (!v.IsNumber()) return fallback;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0) ThrowRangeError(opts.Env(), std::string(name) + " must be >= 0");
  return static_cast<uint64_t>(d);
}

Napi::Value NoticesToJs(Napi::Env env, std::deque<Notice>& notices) {
  Napi::Array out = Napi::Array::New(env, notices.size());
  uint32_t k = 0;
  for (auto& n : notices) {
    Napi::Object o = Napi::Object::New(env);
    switch (n.kind) {
      case Notice::kError:
        o.Set("type", "error");
        o.Set("error", MakeUffdError(env, n.err, n.syscall, -1, n.detail).Value());
        if (n.address != 0) o.Set("address", U64(env, n.address));
        break;
      case Notice::kProgress:
        o.Set("type", "progress");
        break;
      case Notice::kFork:
        o.Set("type", "fork");
        o.Set("fd", Napi::Number::New(env, n.fd));
        n.fd = -1;  // JS owns it now
        break;
      case Notice::kRequests: {
        o.Set("type", "requests");
        Napi::Array list = Napi::Array::New(env, n.requests.size());
        for (uint32_t i = 0; i < n.requests.size(); i++) {
          const HandlerRequest& q = n.requests[i];
          Napi::Object r = Napi::Object::New(env);
          r.Set("id", Napi::Number::New(env, static_cast<double>(q.id)));
          r.Set("handler", Napi::Number::New(env, q.handlerId));
          r.Set("range", Napi::Number::New(env, q.rangeId));
          r.Set("address", U64(env, q.address));
          r.Set("offset", Napi::Number::New(env, static_cast<double>(q.offset)));
          r.Set("length", Napi::Number::New(env, static_cast<double>(q.length)));
          r.Set("prefetch", Napi::Boolean::New(env, q.prefetch));
          if (q.fault != 0) r.Set("fault", U64(env, q.fault));
          list[i] = r;
        }
        o.Set("requests", list);
        break;
      }
    }
    out[k++] = o;
  }
  return out;
}

class FaultServerHandle : public Napi::ObjectWrap<FaultServerHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FaultServerHandle",
                       {
                           InstanceMethod<&FaultServerHandle::AddRange>("addRange"),
                           InstanceMethod<&FaultServerHandle::RemoveRange>("removeRange"),
                           InstanceMethod<&FaultServerHandle::Complete>("complete"),
                           InstanceMethod<&FaultServerHandle::Provide>("provide"),
                           InstanceMethod<&FaultServerHandle::Resume>("resume"),
                           InstanceMethod<&FaultServerHandle::ProvidedQueued>("providedQueued"),
                           InstanceMethod<&FaultServerHandle::RecordTouches>("recordTouches"),
                           InstanceMethod<&FaultServerHandle::TakeTouches>("takeTouches"),
                           InstanceMethod<&FaultServerHandle::Stats>("stats"),
                           InstanceMethod<&FaultServerHandle::Settled>("settled"),
                           InstanceMethod<&FaultServerHandle::Close>("close"),
                           InstanceMethod<&FaultServerHandle::Ref>("ref"),
                           InstanceMethod<&FaultServerHandle::Unref>("unref"),
                       });
  }

  FaultServerHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FaultServerHandle>(info) {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
    if (!info[2].IsFunction()) ThrowTypeError(env, "notify must be a function");
    EngineOptions o;
    o.faultAround = OptU64(opts, "faultAround", o.faultAround);
    o.faultAroundMax = OptU64(opts, "faultAroundMax", o.faultAroundMax);
    o.prefetchChunk = OptU64(opts, "prefetchChunk", o.prefetchChunk);
    o.spinUs = static_cast<uint32_t>(OptU64(opts, "spinUs", o.spinUs));
    o.batch = static_cast<uint32_t>(OptU64(opts, "batch", o.batch));
    o.progressMs = static_cast<uint32_t>(OptU64(opts, "progressMs", o.progressMs));
    o.handlerConcurrency = static_cast<uint32_t>(OptU64(opts, "handlerConcurrency", o.handlerConcurrency));
    o.prefetchYieldUs = static_cast<uint32_t>(OptU64(opts, "prefetchYieldUs", o.prefetchYieldUs));
    if (opts.Get("removeToZero").IsBoolean()) o.removeToZero = opts.Get("removeToZero").ToBoolean();
    if (opts.Get("forkEmit").IsBoolean()) o.forkEmit = opts.Get("forkEmit").ToBoolean();
    if (opts.Get("prefetchIdle").IsBoolean()) o.prefetchIdle = opts.Get("prefetchIdle").ToBoolean();
    if (opts.Get("startPaused").IsBoolean()) o.startPaused = opts.Get("startPaused").ToBoolean();
    if (o.batch < 1 || o.batch > 4096) ThrowRangeError(env, "batch must be 1..4096");
    int watchdogMs = static_cast<int>(OptU64(opts, "watchdogMs", 0));

    core_ = std::make_shared<Core>();
    core_->env = env;
    core_->watchdogMs = watchdogMs;
    core_->faultAroundMax = o.faultAroundMax;
    core_->tsfn =
        Napi::ThreadSafeFunction::New(env, info[2].As<Napi::Function>(), "userfaultfd.FaultServer", 0, 1);
    std::weak_ptr<Core> weak = core_;
    core_->engine.reset(new FaultEngine(o, [weak]() {
      auto core = weak.lock();
      if (!core) return;
      // Runs on an engine thread; the TSFN outlives the threads (released after Stop()).
      core->tsfn.NonBlockingCall([weak](Napi::Env env, Napi::Function notify) {
        auto c = weak.lock();
        if (!c || env == nullptr) return;
        std::deque<Notice> notices = c->engine->TakeNotices();
        if (notices.empty()) return;
        // No C++ exception may leave this callback (std::terminate). A listener that threw is
        // an uncaught exception, as from any event; at environment teardown, when JS can no
        // longer run, the notices are dropped.
        try {
          notify.Call({NoticesToJs(env, notices)});
        } catch (const Napi::Error&) {
          bool pending = false;
          if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
            napi_value error;
            if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
          }
        }
        for (auto& n : notices)
          if (n.kind == Notice::kFork && n.fd >= 0) close(n.fd);
      });
    }));
    std::string syscall;
    int err = core_->engine->Start(fd, &syscall);
    if (err != 0) {
      core_->tsfn.Release();
      core_->closed = true;
      ThrowUffdError(env, err, syscall);
    }
    napi_add_env_cleanup_hook(env, Core::OnTeardown, core_.get());
    core_->hooked = true;
  }

  ~FaultServerHandle() override {
    if (core_) core_->Close();
  }

 private:
  FaultEngine* Live(Napi::Env env) {
    if (core_->closed) ThrowUffdError(env, EBADF, "FaultServer", -1, "the server is closed");
    return core_->engine.get();
  }

  Napi::Value AddRange(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    FaultEngine* engine = Live(env);
    uint32_t id = static_cast<uint32_t>(ArgI32(info, 0, "id"));
    uint64_t address = ArgU64(info, 1, "address");
    uint64_t length = ArgU64(info, 2, "length");
    if (address % 4096 != 0 || length % 4096 != 0 || length == 0)
      ThrowRangeError(env, "range must be page-aligned and non-empty");
    if (!info[3].IsObject()) ThrowTypeError(env, "source must be an object");
    Napi::Object src = info[3].As<Napi::Object>();
    uint64_t sourceOffset = ArgU64(info, 4, "sourceOffset");
    bool prefetch = info[5].ToBoolean();
    uint64_t faultAround = ArgU64(info, 6, "faultAround");
    std::string kind = src.Get("kind").ToString().Utf8Value();
    Source* source = nullptr;
    if (kind == "buffer") {
      BytesArg bytes;
      if (!TryBytes(src.Get("bytes"), &bytes)) ThrowTypeError(env, "buffer source needs bytes");
      source = Source::Buffer(bytes.data, bytes.length);
    } else if (kind == "memory") {
      Napi::Value a = src.Get("address");
      if (!a.IsBigInt()) ThrowTypeError(env, "memory source needs a bigint address");
      bool lossless = false;
      uint64_t at = a.As<Napi::BigInt>().Uint64Value(&lossless);
      source = Source::Buffer(reinterpret_cast<const uint8_t*>(at), OptU64(src, "length", 0));
    } else if (kind == "file") {
      int err = 0;
      std::string syscall;
      source = Source::File(src.Get("fd").As<Napi::Number>().Int32Value(), OptU64(src, "offset", 0),
                            src.Get("mmap").ToBoolean(), &err, &syscall);
      if (source == nullptr) ThrowUffdError(env, err, syscall);
    } else if (kind == "zero") {
      source = Source::Zero();
    } else if (kind == "handler") {
      source = Source::Handler(static_cast<uint32_t>(OptU64(src, "id", 0)));
      if (core_->watchdogMs > 0 && !core_->watched) {
        // { handler } ranges need this thread: if it blocks in a fault while their requests
        // wait for it, nothing will ever resolve the fault.
        WatchdogWatch(env, engine->requestFd(), core_->watchdogMs,
                      "FaultServer { handler } requests wait for this thread, which alone runs "
                      "the handlers, so the fault will never be resolved. Never touch memory "
                      "served by a { handler } source on the JS thread that owns the FaultServer "
                      "until it is present (await server.drained(), or touch it from a worker, "
                      "a child process or a native thread); buffer, file and zero sources have "
                      "no such limit.");
        core_->watched = true;
      }
    } else {
      ThrowTypeError(env, "unknown source kind '" + kind + "'");
    }
    auto range = std::make_shared<ServedRange>(id, address, length, std::shared_ptr<Source>(source),
                                               sourceOffset, prefetch, faultAround, core_->faultAroundMax);
    int err = engine->AddRange(range);
    if (err != 0) ThrowUffdError(env, err, "FaultServer.serve", -1, "the range overlaps one already served");
    return env.Undefined();
  }

  Napi::Value RemoveRange(const Napi::CallbackInfo& info) {
    FaultEngine* engine = Live(info.Env());
    uint64_t start = ArgU64(info, 0, "start");
    uint64_t end = ArgU64(info, 1, "end");
    return Napi::Number::New(info.Env(), engine->RemoveRange(start, end));
  }

  Napi::Value Complete(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (core_->closed) return env.Undefined();
    uint64_t id = ArgU64(info, 0, "id");
    BytesArg bytes;
    if (TryBytes(info[1], &bytes)) {
      core_->engine->Complete(id, std::vector<uint8_t>(bytes.data, bytes.data + bytes.length), true);
    } else {
      core_->engine->Complete(id, {}, false);
    }
    return env.Undefined();
  }

  Napi::Value Provide(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (core_->closed) return Napi::Number::New(env, 0);
    core_->Release(env);
    uint32_t rangeId = static_cast<uint32_t>(ArgI32(info, 0, "rangeId"));
    uint64_t sourceOffset = ArgU64(info, 1, "sourceOffset");
    BytesArg bytes;
    if (!TryBytes(info[2], &bytes)) ThrowTypeError(env, "bytes must be an ArrayBuffer or a typed array");
    // The engine reads the bytes in place: keep the buffer alive until it is done with them.
    napi_ref ref = nullptr;
    if (napi_create_reference(env, info[2], 1, &ref) != napi_ok)
      ThrowTypeError(env, "cannot reference the bytes");
    std::weak_ptr<Releases> releases = core_->releases;
    std::shared_ptr<void> hold(ref, [releases](void* r) {
      if (auto q = releases.lock()) {
        std::lock_guard<std::mutex> lock(q->mu);
        q->refs.push_back(static_cast<napi_ref>(r));
      }
    });
    uint64_t queued =
        core_->engine->Provide(rangeId, sourceOffset, bytes.data, bytes.length, std::move(hold));
    return Napi::Number::New(env, static_cast<double>(queued));
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->engine->Resume();
    return info.Env().Undefined();
  }

  Napi::Value ProvidedQueued(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->Release(info.Env());
    return Napi::Number::New(info.Env(), static_cast<double>(core_->engine->providedQueued()));
  }

  Napi::Value RecordTouches(const Napi::CallbackInfo& info) {
    core_->engine->RecordTouches(info[0].ToBoolean());
    return info.Env().Undefined();
  }

  Napi::Value TakeTouches(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto touches = core_->engine->TakeTouches();
    Napi::Uint32Array ranges = Napi::Uint32Array::New(env, touches.size());
    Napi::Float64Array offsets = Napi::Float64Array::New(env, touches.size());
    for (size_t i = 0; i < touches.size(); i++) {
      ranges[i] = touches[i].first;
      offsets[i] = static_cast<double>(touches[i].second);
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("ranges", ranges);
    o.Set("offsets", offsets);
    return o;
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const EngineStats& s = core_->engine->stats();
    Napi::Object o = Napi::Object::New(env);
    auto put = [&](const char* name, uint64_t v) {
      o.Set(name, Napi::Number::New(env, static_cast<double>(v)));
    };
    put("faults", s.faults.load());
    put("demandPages", s.demandPages.load());
    put("aroundPages", s.aroundPages.load());
    put("prefetchPages", s.prefetchPages.load());
    put("handlerPages", s.handlerPages.load());
    put("zeroPages", s.zeroPages.load());
    put("bytes", s.bytes.load());
    put("eexist", s.eexist.load());
    put("deferred", s.deferred.load());
    put("retries", s.retries.load());
    put("unhandled", s.unhandled.load());
    put("wakes", s.wakes.load());
    put("reads", s.reads.load());
    put("sleeps", s.sleeps.load());
    put("spinHits", s.spinHits.load());
    put("removes", s.removes.load());
    put("unmaps", s.unmaps.load());
    put("remaps", s.remaps.load());
    put("forks", s.forks.load());
    put("requests", s.requests.load());
    put("errors", s.errors.load());
    put("prefetchPauses", s.prefetchPauses.load());
    const LatencyHistogram& h = core_->engine->latency();
    o.Set("latencyP50us", Napi::Number::New(env, static_cast<double>(h.Quantile(0.5)) / 1000.0));
    o.Set("latencyP99us", Napi::Number::New(env, static_cast<double>(h.Quantile(0.99)) / 1000.0));
    o.Set("spinBudgetUs", Napi::Number::New(env, core_->engine->spinBudgetNs() / 1000.0));
    uint64_t settled = 0, total = 0;
    core_->engine->SettledTotal(&settled, &total);
    put("pagesPresent", settled);
    put("pagesTotal", total);
    return o;
  }

  Napi::Value Settled(const Napi::CallbackInfo& info) {
    uint64_t settled = 0, total = 0;
    core_->engine->SettledTotal(&settled, &total);
    Napi::Array out = Napi::Array::New(info.Env(), 2);
    out[0u] = Napi::Number::New(info.Env(), static_cast<double>(settled));
    out[1u] = Napi::Number::New(info.Env(), static_cast<double>(total));
    return out;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    core_->Close();
    return info.Env().Undefined();
  }

  Napi::Value Ref(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->tsfn.Ref(info.Env());
    return info.Env().Undefined();
  }

  Napi::Value Unref(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->tsfn.Unref(info.Env());
    return info.Env().Undefined();
  }

  std::shared_ptr<Core> core_;
};

}  // namespace

void InitFaultServer(Napi::Env env, Napi::Object exports) {
  exports.Set("FaultServerHandle", FaultServerHandle::Define(env));
}
