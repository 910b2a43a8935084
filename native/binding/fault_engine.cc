// FaultEngine: the JS face of the native fault engine (native/engine/fault_engine.h). One engine
// per object, all state per environment; the engine's notices reach JS through one threadsafe
// function, and the engine's threads are joined on close(), on garbage collection and on
// environment teardown (cleanup hook), whichever comes first. Option names are the JS ones
// (FaultServerOptions), units included; src/addon/binding.ts declares this surface.
//
// new FaultEngine(fd, options, notify(notices[]))
//   addRange({ id, address, length, pageSize, sourceOffset, prefetch, faultAround, mode,
//              cache, cacheOffset, onSourceError, retryDeadlineMs, afterDeadline }, source)
//     mode 'minor': cache is a PageCache (page_cache.cc), cacheOffset where the range starts in
//     its writer (bytes)
//     source: { kind: 'buffer', bytes, shared }  shared: a SharedArrayBuffer's view, used in place;
//                                                 else copied now: nothing done to it later reaches us
//           | { kind: 'memory', address, length } memory the caller keeps mapped (a Mapping)
//           | { kind: 'file', fd, offset, readMethod: 'mmap'|'pread' }
//           | { kind: 'zero' } | { kind: 'handler', id }
//   removeRange(start, end) -> count; complete(requestId, bytes | null);
//   resolve(requestId, 'poison' | 'zero'); stats(); settled(); metrics();
//   provide(rangeId, sourceOffset, bytes) -> bytes queued; providedQueued();
//   recordTouches(on); takeTouches() -> { ranges: Uint32Array, offsets: Float64Array };
//   resume() (options.startPaused: read nothing from the uffd until then);
//   latencyHistogram() -> { count, buckets: [[index, count], ...] } (src/util/histogram.ts's buckets);
//   takeTrace() -> { records: ArrayBuffer (40-byte FaultTraceRecords), dropped } | null;
//   prefetchNbd(rangeId, fds[], reads: Float64Array [offset, length, ...],
//               { depth, initialWindow, maxQueued, timeoutMs, exportSize }) -> id: a working set's reads from
//               an
//     NBD server in native code (engine/nbd_prefetch.h) over dups of `fds` (connected, after the
//     handshake, simple replies); its end is a { type: 'prefetched', id } notice;
//   prefetchResult(id) -> { provided: Uint8Array (per read, 1: its bytes went to the engine),
//     bytes, error: UffdError | null } once it has ended (then forgotten), else null;
//   prefetchStop(id) -> the same outcome (ended now if it ran; then forgotten), or null;
//   close(); ref(); unref()
//
// Why bytes are copied: N-API cannot pin an ArrayBuffer's memory. A strong reference keeps it from
// being collected, not from being detached (structuredClone(buf, { transfer }), postMessage),
// which frees it at once while the engine's threads would still copy from it. provide() is the
// exception, lending its bytes (referenced until installed): it is internal (src/engines/
// fed-ranges.ts), and its buffers are the package's own reads of a store, never handed to anyone
// who could detach them.
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <fcntl.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "binding/args.h"
#include "binding/page_cache.h"
#include "binding/threaded_core.h"
#include "binding/uffd.h"
#include "binding/watchdog.h"
#include "engine/fault_engine.h"
#include "engine/nbd_prefetch.h"
#include "engine/util.h"

namespace {

// JS buffers lent to the engine by provide(): referenced until the engine is done with them, then
// released on the JS thread (references may only be deleted there).
struct Releases {
  std::mutex mu;
  std::vector<napi_ref> refs;
};

struct Core : ThreadedCore {
  std::unique_ptr<FaultEngine> engine;
  std::shared_ptr<Releases> releases = std::make_shared<Releases>();
  int watchdogMs = 0;
  uint64_t faultAroundMax = 2 << 20;
  bool watched = false;
  // native NBD prefetches (JS thread only), stopped before the engine
  std::map<uint64_t, std::unique_ptr<NbdPrefetch>> prefetches;
  uint64_t nextPrefetch = 1;

  // Deletes the references of provided buffers the engine is done with (JS thread).
  void Release(napi_env e) {
    std::vector<napi_ref> refs;
    {
      std::lock_guard<std::mutex> lock(releases->mu);
      refs.swap(releases->refs);
    }
    for (napi_ref r : refs) napi_delete_reference(e, r);
  }

 protected:
  void Stop() override {
    if (watched) WatchdogForget(env, engine->requestFd());
    prefetches.clear();  // each joins its thread: nothing provides after this
    engine->Stop();
    engine->DropProvided();
    Release(env);
  }
};

std::string StringField(Napi::Object o, const char* name, const char* fallback) {
  Napi::Value v = o.Get(name);
  return v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string(fallback);
}

SourceErrorAction SourceAction(Napi::Env env, const std::string& name, bool retryAllowed) {
  if (name == "poison") return SourceErrorAction::kPoison;
  if (name == "zero") return SourceErrorAction::kZero;
  if (name == "retry" && retryAllowed) return SourceErrorAction::kRetry;
  ThrowTypeError(env, retryAllowed ? "onSourceError must be 'retry', 'poison' or 'zero'"
                                   : "the action must be 'poison' or 'zero'");
}

EngineOptions ReadOptions(Napi::Env env, Napi::Object opts) {
  EngineOptions o;
  o.faultAround = OptU64(opts, "faultAround", o.faultAround);
  o.faultAroundMax = OptU64(opts, "faultAroundMax", o.faultAroundMax);
  o.prefetchChunk = OptU64(opts, "prefetchChunk", o.prefetchChunk);
  o.spinUs = static_cast<uint32_t>(OptU64(opts, "spinUs", o.spinUs));
  o.readSize = static_cast<uint32_t>(OptU64(opts, "readSize", o.readSize));
  o.progressIntervalMs = static_cast<uint32_t>(OptU64(opts, "progressIntervalMs", o.progressIntervalMs));
  o.handlerConcurrency = static_cast<uint32_t>(OptU64(opts, "handlerConcurrency", o.handlerConcurrency));
  o.prefetchYieldUs = static_cast<uint32_t>(OptU64(opts, "prefetchYieldUs", o.prefetchYieldUs));
  o.hugePageSize = OptU64(opts, "hugePageSize", o.hugePageSize);
  o.traceCapacity = static_cast<uint32_t>(OptU64(opts, "traceCapacity", 0));
  if (o.traceCapacity > (1u << 24)) ThrowRangeError(env, "traceCapacity must be 0..16777216");
  std::string onRemove = StringField(opts, "onRemove", "zero");
  if (onRemove == "zero")
    o.onRemove = RemovePolicy::kZero;
  else if (onRemove == "source")
    o.onRemove = RemovePolicy::kSource;
  else if (onRemove == "unregister")
    o.onRemove = RemovePolicy::kUnregister;
  else
    ThrowTypeError(env, "onRemove must be 'zero', 'source' or 'unregister'");
  std::string onFork = StringField(opts, "onFork", "close");
  if (onFork != "close" && onFork != "emit") ThrowTypeError(env, "onFork must be 'close' or 'emit'");
  o.onFork = onFork == "emit" ? ForkPolicy::kEmit : ForkPolicy::kClose;
  std::string priority = StringField(opts, "backgroundPriority", "idle");
  if (priority != "idle" && priority != "normal")
    ThrowTypeError(env, "backgroundPriority must be 'idle' or 'normal'");
  o.backgroundIdle = priority == "idle";
  o.startPaused = opts.Get("startPaused").ToBoolean();
  if (o.readSize < 1 || o.readSize > 4096) ThrowRangeError(env, "readSize must be 1..4096");
  return o;
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
        if (!n.action.empty()) {
          o.Set("action", n.action);
          if (n.action == "retry") o.Set("retryInMs", Napi::Number::New(env, n.retryInMs));
        }
        break;
      case Notice::kProgress:
        o.Set("type", "progress");
        break;
      case Notice::kPrefetched:
        o.Set("type", "prefetched");
        o.Set("id", Napi::Number::New(env, static_cast<double>(n.id)));
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

// JS thread, woken by the engine: hands its notices to the listener.
void DeliverNotices(Core& core, Napi::Env env, Napi::Function notify) {
  std::deque<Notice> notices = core.engine->TakeNotices();
  if (notices.empty()) return;
  CallListener(env, notify, [&] { return NoticesToJs(env, notices); });
  // Fork uffds not handed to JS (NoticesToJs failed part-way) are ours to close.
  for (auto& n : notices)
    if (n.kind == Notice::kFork && n.fd >= 0) close(n.fd);
}

class JsFaultEngine : public ThreadedWrap<JsFaultEngine, Core> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FaultEngine",
                       {
                           InstanceMethod<&JsFaultEngine::AddRange>("addRange"),
                           InstanceMethod<&JsFaultEngine::RemoveRange>("removeRange"),
                           InstanceMethod<&JsFaultEngine::Complete>("complete"),
                           InstanceMethod<&JsFaultEngine::Resolve>("resolve"),
                           InstanceMethod<&JsFaultEngine::Metrics>("metrics"),
                           InstanceMethod<&JsFaultEngine::Provide>("provide"),
                           InstanceMethod<&JsFaultEngine::ProvidedQueued>("providedQueued"),
                           InstanceMethod<&JsFaultEngine::Resume>("resume"),
                           InstanceMethod<&JsFaultEngine::RecordTouches>("recordTouches"),
                           InstanceMethod<&JsFaultEngine::TakeTouches>("takeTouches"),
                           InstanceMethod<&JsFaultEngine::Stats>("stats"),
                           InstanceMethod<&JsFaultEngine::LatencyBuckets>("latencyHistogram"),
                           InstanceMethod<&JsFaultEngine::Settled>("settled"),
                           InstanceMethod<&JsFaultEngine::TakeTrace>("takeTrace"),
                           InstanceMethod<&JsFaultEngine::PrefetchNbd>("prefetchNbd"),
                           InstanceMethod<&JsFaultEngine::PrefetchResult>("prefetchResult"),
                           InstanceMethod<&JsFaultEngine::PrefetchStop>("prefetchStop"),
                           CloseMethod(),
                           RefMethod(),
                           UnrefMethod(),
                       });
  }

  JsFaultEngine(const Napi::CallbackInfo& info) : ThreadedWrap(info) {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
    if (!info[2].IsFunction()) ThrowTypeError(env, "notify must be a function");
    EngineOptions o = ReadOptions(env, opts);
    int watchdogMs = static_cast<int>(OptU64(opts, "watchdogMs", 0));

    core_ = std::make_shared<Core>();
    core_->watchdogMs = watchdogMs;
    core_->faultAroundMax = o.faultAroundMax;
    core_->Open(env, info[2].As<Napi::Function>(), "userfaultfd.FaultServer");
    core_->engine.reset(new FaultEngine(o, TsfnWaker(core_, DeliverNotices)));
    std::string syscall;
    int err = core_->engine->Start(fd, &syscall);
    if (err != 0) {
      core_->Abandon();
      ThrowUffdError(env, err, syscall);
    }
    core_->Hook();
  }

 private:
  FaultEngine* Live(Napi::Env env) {
    if (core_->closed) ThrowUffdError(env, EBADF, "FaultServer", -1, "the server is closed");
    return core_->engine.get();
  }

  Napi::Value AddRange(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    FaultEngine* engine = Live(env);
    if (!info[0].IsObject()) ThrowTypeError(env, "range must be an object");
    if (!info[1].IsObject()) ThrowTypeError(env, "source must be an object");
    Napi::Object spec = info[0].As<Napi::Object>();
    Napi::Object src = info[1].As<Napi::Object>();
    uint32_t id = static_cast<uint32_t>(U64Field(spec, "id"));
    uint64_t address = U64Field(spec, "address");
    uint64_t length = U64Field(spec, "length");
    uint64_t pageSize = U64Field(spec, "pageSize");
    uint64_t sourceOffset = U64Field(spec, "sourceOffset");
    uint64_t faultAround = U64Field(spec, "faultAround");
    bool prefetch = spec.Get("prefetch").ToBoolean();
    if (pageSize < BasePageSize() || !IsPowerOfTwo(pageSize))
      ThrowRangeError(env, "pageSize must be a power of two >= the base page size");
    if (address % pageSize != 0 || length % pageSize != 0 || length == 0)
      ThrowRangeError(env, "range must be aligned to its page size and non-empty");
    std::string kind = StringField(src, "kind", "");
    Source* source = nullptr;
    if (kind == "buffer") {
      BytesArg bytes;
      if (!TryBytes(src.Get("bytes"), &bytes)) ThrowTypeError(env, "a buffer source needs bytes");
      if (bytes.length > 0 && bytes.data == nullptr) ThrowTypeError(env, "the source buffer is detached");
      if (src.Get("shared").ToBoolean()) {
        source = Source::Memory(bytes.data, bytes.length);
      } else {
        int err = 0;
        source = Source::OwnedCopy(bytes.data, bytes.length, &err);
        if (source == nullptr) ThrowUffdError(env, err, "mmap", -1, "memory for a copy of the source buffer");
      }
    } else if (kind == "memory") {
      uint64_t at = U64Field(src, "address");
      source = Source::Memory(reinterpret_cast<const uint8_t*>(at), U64Field(src, "length"));
    } else if (kind == "file") {
      int err = 0;
      std::string syscall;
      std::string method = StringField(src, "readMethod", "mmap");
      if (method != "mmap" && method != "pread") ThrowTypeError(env, "readMethod must be 'mmap' or 'pread'");
      uint64_t size = src.Get("size").IsNumber() ? U64Field(src, "size") : Source::kSizeNow;
      source = Source::File(static_cast<int>(U64Field(src, "fd")), U64Field(src, "offset"), size,
                            method == "mmap", &err, &syscall);
      if (source == nullptr) ThrowUffdError(env, err, syscall);
    } else if (kind == "zero") {
      source = Source::Zero();
    } else if (kind == "handler") {
      source = Source::Handler(static_cast<uint32_t>(U64Field(src, "id")));
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
    std::shared_ptr<Source> owned(source);
    std::shared_ptr<ZeroRegion> zeros;
    if (pageSize > BasePageSize()) {
      // hugetlb: no ZEROPAGE there, zeros are copied.
      int err = 0;
      zeros = engine->ZerosFor(pageSize, &err);
      if (!zeros) ThrowUffdError(env, err, "mmap", -1, "a zero region for huge pages");
    }
    auto range = std::make_shared<ServedRange>(id, address, length, pageSize, owned, sourceOffset, prefetch,
                                               faultAround, std::move(zeros), core_->faultAroundMax);
    std::string mode = StringField(spec, "mode", "missing");
    if (mode == "minor") {
      range->cache = PageCacheOf(env, spec.Get("cache"));
      uint64_t at = U64Field(spec, "cacheOffset");
      if (range->cache->pageSize() != pageSize)
        ThrowRangeError(env, "the page cache's page size is not the range's");
      if (at % pageSize != 0 || at / pageSize + length / pageSize > range->cache->pages())
        ThrowRangeError(env, "the range lies outside its page cache's writer");
      range->cacheFirst = at / pageSize;
    } else if (mode != "missing") {
      ThrowTypeError(env, "mode must be 'missing' or 'minor'");
    }
    range->onSourceError.action = SourceAction(env, StringField(spec, "onSourceError", "retry"), true);
    range->onSourceError.deadlineMs = static_cast<uint32_t>(OptU64(spec, "retryDeadlineMs", 0));
    range->onSourceError.then = SourceAction(env, StringField(spec, "afterDeadline", "poison"), false);
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

  // resolve(id, 'poison' | 'zero'): a demand request its handler could not answer, by policy.
  Napi::Value Resolve(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (core_->closed) return env.Undefined();
    uint64_t id = ArgU64(info, 0, "id");
    std::string action = info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    core_->engine->Resolve(id, SourceAction(env, action, false));
    return env.Undefined();
  }

  // Per served range (the parts of a range mremap split, merged): its pages, faults, blocked
  // time, pages by class and stage histograms ({ count, sum (ns), buckets: [[index, count]] }).
  Napi::Value Metrics(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    struct Entry {
      const ServedRange* first;
      uint64_t length = 0, settled = 0, pages = 0;
    };
    std::vector<std::pair<const RangeMetrics*, Entry>> ranges;
    core_->engine->ForEachRange([&](const ServedRange& r) {
      for (auto& e : ranges)
        if (e.first == r.metrics.get()) {
          e.second.length += r.length;
          e.second.settled += r.settled.load();
          e.second.pages += r.pages;
          return;
        }
      ranges.push_back({r.metrics.get(), Entry{&r, r.length, r.settled.load(), r.pages}});
    });
    Napi::Array out = Napi::Array::New(env, ranges.size());
    uint32_t k = 0;
    for (auto& [m, e] : ranges) {
      Napi::Object o = Napi::Object::New(env);
      auto num = [&](Napi::Object t, const char* name, uint64_t v) {
        t.Set(name, Napi::Number::New(env, static_cast<double>(v)));
      };
      num(o, "id", e.first->id);
      o.Set("address", U64(env, e.first->start));
      num(o, "length", e.length);
      num(o, "pageSize", e.first->pageSize);
      o.Set("mode", e.first->minor() ? "minor" : "missing");
      num(o, "pagesPresent", e.settled);
      num(o, "pagesTotal", e.pages);
      num(o, "faults", m->faults.load());
      num(o, "blockedNs", m->blockedNs.load());
      num(o, "cachedPages", m->cachedPages.load());
      num(o, "sourceErrors", m->sourceErrors.load());
      Napi::Object pages = Napi::Object::New(env);
      static const char* kClassNames[kClasses] = {"demand", "around",  "prefetch",
                                                  "zero",   "removed", "poisoned"};
      for (int c = 0; c < kClasses; c++) num(pages, kClassNames[c], m->pages[c].load());
      o.Set("pages", pages);
      o.Set("stages", StagesToJs(env, m->stages));
      out[k++] = o;
    }
    return out;
  }

  static Napi::Object StagesToJs(Napi::Env env, const LatencyHistogram* stages) {
    static const char* kStageNames[kStages] = {"read", "source", "fill", "wake", "total"};
    Napi::Object o = Napi::Object::New(env);
    for (int st = 0; st < kStages; st++) {
      const LatencyHistogram& h = stages[st];
      Napi::Object j = Napi::Object::New(env);
      j.Set("count", Napi::Number::New(env, static_cast<double>(h.Count())));
      j.Set("sum", Napi::Number::New(env, static_cast<double>(h.Sum())));
      std::vector<std::pair<int, uint64_t>> nonEmpty;
      h.ForEachBucket([&](int i, uint64_t n) { nonEmpty.emplace_back(i, n); });
      Napi::Array buckets = Napi::Array::New(env, nonEmpty.size());
      for (uint32_t b = 0; b < nonEmpty.size(); b++) {
        Napi::Array pair = Napi::Array::New(env, 2);
        pair[0u] = Napi::Number::New(env, nonEmpty[b].first);
        pair[1u] = Napi::Number::New(env, static_cast<double>(nonEmpty[b].second));
        buckets[b] = pair;
      }
      j.Set("buckets", buckets);
      o.Set(kStageNames[st], j);
    }
    return o;
  }

  Napi::Value Provide(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (core_->closed) return Napi::Number::New(env, 0);
    core_->Release(env);
    uint32_t rangeId = static_cast<uint32_t>(ArgU64(info, 0, "rangeId"));
    uint64_t sourceOffset = ArgU64(info, 1, "sourceOffset");
    BytesArg bytes;
    if (!TryBytes(info[2], &bytes)) ThrowTypeError(env, "bytes must be an ArrayBuffer or a typed array");
    if (bytes.length > 0 && bytes.data == nullptr) ThrowTypeError(env, "the bytes are detached");
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

  Napi::Value PrefetchNbd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    FaultEngine* engine = Live(env);
    uint32_t rangeId = static_cast<uint32_t>(ArgU64(info, 0, "rangeId"));
    if (!info[1].IsArray() || info[1].As<Napi::Array>().Length() == 0)
      ThrowTypeError(env, "fds must be a non-empty array of file descriptors");
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
      ThrowTypeError(env, "reads must be a Float64Array of [offset, length] pairs");
    Napi::Object opts = info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(env);
    Napi::Float64Array list = info[2].As<Napi::Float64Array>();
    if (list.ElementLength() % 2 != 0) ThrowRangeError(env, "reads must hold [offset, length] pairs");
    NbdPrefetchOptions o;
    o.depth = static_cast<uint32_t>(OptU64(opts, "depth", o.depth));
    o.initialWindow = static_cast<uint32_t>(OptU64(opts, "initialWindow", o.initialWindow));
    o.maxQueued = OptU64(opts, "maxQueued", o.maxQueued);
    o.timeoutMs = static_cast<uint32_t>(OptU64(opts, "timeoutMs", o.timeoutMs));
    o.exportSize = U64Field(opts, "exportSize");
    if (o.depth < 1 || o.depth > 65536) ThrowRangeError(env, "depth must be 1..65536");
    std::vector<NbdRead> reads(list.ElementLength() / 2);
    for (size_t i = 0; i < reads.size(); i++) {
      double off = list[2 * i], len = list[2 * i + 1];
      if (!(off >= 0 && off < 9007199254740992.0 && off == static_cast<double>(static_cast<uint64_t>(off))) ||
          !(len >= 1 && len <= 32.0 * 1024 * 1024 && len == static_cast<double>(static_cast<uint32_t>(len))))
        ThrowRangeError(env, "each read must be a whole offset >= 0 and a length of 1 byte..32 MiB");
      reads[i] = NbdRead{static_cast<uint64_t>(off), static_cast<uint32_t>(len)};
    }
    // Our own dups: JS lets its sockets go once this returns.
    Napi::Array arr = info[1].As<Napi::Array>();
    std::vector<int> fds;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Value v = arr[i];
      int fd = v.IsNumber() ? v.As<Napi::Number>().Int32Value() : -1;
      int dup = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
      if (dup < 0) {
        int err = fd >= 0 ? errno : EBADF;
        for (int d : fds) close(d);
        ThrowUffdError(env, err, "fcntl(F_DUPFD_CLOEXEC)", -1, "an NBD connection's socket");
      }
      fds.push_back(dup);
    }
    uint64_t id = core_->nextPrefetch++;
    auto prefetch =
        std::make_unique<NbdPrefetch>(engine, rangeId, std::move(fds), std::move(reads), o, [engine, id] {
          Notice n;
          n.kind = Notice::kPrefetched;
          n.id = id;
          engine->Notify(std::move(n));
        });
    int err = prefetch->Start();
    if (err != 0) ThrowUffdError(env, err, "NbdPrefetch");
    core_->prefetches[id] = std::move(prefetch);
    return Napi::Number::New(env, static_cast<double>(id));
  }

  Napi::Value PrefetchResult(const Napi::CallbackInfo& info) {
    auto it = core_->prefetches.find(ArgU64(info, 0, "id"));
    if (it == core_->prefetches.end() || !it->second->finished()) return info.Env().Null();
    return TakePrefetch(info.Env(), it);
  }

  Napi::Value PrefetchStop(const Napi::CallbackInfo& info) {
    auto it = core_->prefetches.find(ArgU64(info, 0, "id"));
    if (it == core_->prefetches.end()) return info.Env().Null();
    return TakePrefetch(info.Env(), it);
  }

  // Ends the prefetch (if it runs), forgets it and returns its outcome.
  Napi::Value TakePrefetch(Napi::Env env, std::map<uint64_t, std::unique_ptr<NbdPrefetch>>::iterator it) {
    std::unique_ptr<NbdPrefetch> p = std::move(it->second);
    core_->prefetches.erase(it);
    p->Stop();  // joins
    std::vector<uint8_t> provided = p->Provided();
    Napi::Uint8Array flags = Napi::Uint8Array::New(env, provided.size());
    if (!provided.empty()) memcpy(flags.Data(), provided.data(), provided.size());
    Napi::Object out = Napi::Object::New(env);
    out.Set("provided", flags);
    out.Set("bytes", Napi::Number::New(env, static_cast<double>(p->bytes())));
    if (p->error() != 0)
      out.Set("error", MakeUffdError(env, p->error(), "NBD_CMD_READ", -1, p->detail()).Value());
    else
      out.Set("error", env.Null());
    return out;
  }

  Napi::Value ProvidedQueued(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->Release(info.Env());
    return Napi::Number::New(info.Env(), static_cast<double>(core_->engine->providedQueued()));
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->engine->Resume();
    return info.Env().Undefined();
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
    put("exists", s.exists.load());
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
    put("poisonedPages", s.poisonedPages.load());
    put("cachedPages", s.cachedPages.load());
    put("sourceErrors", s.sourceErrors.load());
    o.Set("blockedUs", Napi::Number::New(env, static_cast<double>(s.blockedNs.load()) / 1000.0));
    o.Set("stageHistograms", StagesToJs(env, s.stages));
    const LatencyHistogram& h = core_->engine->latency();
    Napi::Object latency = Napi::Object::New(env);
    auto us = [&](const char* name, uint64_t ns) {
      latency.Set(name, Napi::Number::New(env, static_cast<double>(ns) / 1000.0));
    };
    latency.Set("count", Napi::Number::New(env, static_cast<double>(h.Count())));
    us("p50", h.Quantile(0.5));
    us("p90", h.Quantile(0.9));
    us("p99", h.Quantile(0.99));
    us("max", h.Quantile(1.0));
    o.Set("latencyUs", latency);
    o.Set("spinBudgetUs", Napi::Number::New(env, core_->engine->spinBudgetNs() / 1000.0));
    Settlement settled = core_->engine->Settled();
    put("pagesPresent", settled.pages);
    put("pagesTotal", settled.totalPages);
    put("bytesPresent", settled.bytes);
    put("bytesTotal", settled.totalBytes);
    return o;
  }

  Napi::Value LatencyBuckets(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const LatencyHistogram& h = core_->engine->latency();
    Napi::Array buckets = Napi::Array::New(env);
    uint64_t count = 0;
    uint32_t k = 0;
    h.ForEachBucket([&](int i, uint64_t n) {
      count += n;
      Napi::Array pair = Napi::Array::New(env, 2);
      pair[0u] = Napi::Number::New(env, i);
      pair[1u] = Napi::Number::New(env, static_cast<double>(n));
      buckets[k++] = pair;
    });
    Napi::Object o = Napi::Object::New(env);
    o.Set("count", Napi::Number::New(env, static_cast<double>(count)));
    o.Set("buckets", buckets);
    return o;
  }

  Napi::Value Settled(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Settlement s = core_->engine->Settled();
    Napi::Object o = Napi::Object::New(env);
    o.Set("pagesPresent", Napi::Number::New(env, static_cast<double>(s.pages)));
    o.Set("pagesTotal", Napi::Number::New(env, static_cast<double>(s.totalPages)));
    o.Set("bytesPresent", Napi::Number::New(env, static_cast<double>(s.bytes)));
    o.Set("bytesTotal", Napi::Number::New(env, static_cast<double>(s.totalBytes)));
    return o;
  }

  // Readable after close() too: what the engine recorded before it stopped is not lost.
  Napi::Value TakeTrace(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    FaultTrace* trace = core_->engine->trace();
    if (trace == nullptr) return env.Null();
    uint64_t dropped = 0;
    std::vector<FaultTraceRecord> records = trace->Drain(&dropped);
    size_t size = records.size() * sizeof(FaultTraceRecord);
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(env, size);
    if (size > 0) memcpy(buffer.Data(), records.data(), size);
    Napi::Object o = Napi::Object::New(env);
    o.Set("records", buffer);
    o.Set("dropped", Napi::Number::New(env, static_cast<double>(dropped)));
    return o;
  }
};

}  // namespace

void InitFaultEngine(Napi::Env env, Napi::Object exports) {
  exports.Set("FaultEngine", JsFaultEngine::Define(env));
}
