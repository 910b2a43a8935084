// SnapshotEngine: the JS face of the live snapshot engine (native/engine/snapshot_engine.h). The
// engine's thread settles `done` through a threadsafe function; the thread is joined by join(), by
// the promise settling, or at environment teardown (cleanup hook), whichever comes first.
//
// new SnapshotEngine(uffd, start, length, pageSize, sink, options)
//   sink: { fd, offset }                 pwrite at offset + page offset
//       | { address, length }            memory the caller keeps mapped until `done` (a Mapping)
//       | { buffer, shared: true }       a view over a SharedArrayBuffer: written in place
//       | { buffer }                     a view over an ArrayBuffer: staged, copied in at the end
//   options: { chunkSize, faultAround, maxBytesPerSecond, backgroundPriority: 'idle'|'normal',
//              populate, copyMethod: 'auto'|'process_vm_readv'|'pipe' }
// engine.done: Promise<stats>; engine.progress(); engine.cancel(); engine.join()
//
// Why an ArrayBuffer is staged: N-API cannot pin a backing store. A strong reference keeps the
// buffer from being collected, but not from being detached (structuredClone(buf, { transfer }),
// postMessage), which frees its memory at once while the engine's threads still write there. So
// pages go to memory the engine owns and are copied into the buffer on the JS thread when the
// snapshot is done, if the buffer is still whole (else `done` rejects with EFAULT). A
// SharedArrayBuffer cannot be detached: it is written in place.
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include <memory>

#include "binding/args.h"
#include "binding/uffd.h"
#include "engine/snapshot_engine.h"
#include "engine/util.h"

namespace {

// Engine memory for an ArrayBuffer sink's pages until they can be copied in.
struct Staging {
  uint8_t* data = nullptr;
  size_t length = 0;
  ~Staging() {
    if (data != nullptr) munmap(data, length);
  }
};

struct Core {
  std::unique_ptr<SnapshotEngine> engine;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> sinkRef;  // a memory sink's view: kept alive, and copied into when staged
  std::unique_ptr<Staging> staging;
  uint64_t length = 0;
  std::shared_ptr<Core>* hookArg = nullptr;  // env teardown hook's reference, while registered
  bool settled = false;
  explicit Core(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

Napi::Object StatsToJs(Napi::Env env, const SnapshotStats& s) {
  Napi::Object o = Napi::Object::New(env);
  auto num = [&](const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
  num("totalBytes", static_cast<double>(s.totalBytes));
  num("bytesCopied", static_cast<double>(s.bytesCopied));
  num("pagesCopied", static_cast<double>(s.pagesCopied));
  num("totalPages", static_cast<double>(s.totalPages));
  num("faultCopies", static_cast<double>(s.faultCopies));
  num("backgroundCopies", static_cast<double>(s.backgroundCopies));
  num("faults", static_cast<double>(s.faults));
  num("wakes", static_cast<double>(s.wakes));
  num("protectMs", s.protectMs);
  num("elapsedMs", s.elapsedMs);
  o.Set("done", Napi::Boolean::New(env, s.done));
  o.Set("populated", Napi::Boolean::New(env, s.populated));
  o.Set("copyMethod", Napi::String::New(env, s.copyMethod));
  return o;
}

// On the JS thread, with the engine's thread joined: copies a staged snapshot into its buffer.
// Returns 0, or EFAULT when the buffer was detached or shrunk meanwhile.
int CopyStagedIn(Core* c) {
  if (!c->staging) return 0;
  BytesArg bytes;
  if (!TryBytes(c->sinkRef.Value(), &bytes) || bytes.data == nullptr || bytes.length < c->length)
    return EFAULT;
  memcpy(bytes.data, c->staging->data, c->length);
  return 0;
}

void Settle(Napi::Env env, Core* c) {
  if (c->settled) return;
  c->settled = true;
  std::string syscall, detail;
  int err = c->engine->error(&syscall, &detail);
  if (err == 0 && CopyStagedIn(c) != 0) {
    err = EFAULT;
    syscall = "takeSnapshot";
    detail =
        "the sink buffer was detached (transferred) or shrunk before the snapshot finished: nothing was "
        "written to it";
  }
  c->staging.reset();
  c->sinkRef.Reset();
  Napi::Object stats = StatsToJs(env, c->engine->Stats());
  if (err == 0) {
    c->deferred.Resolve(stats);
  } else {
    Napi::Error error = MakeUffdError(env, err, syscall, -1, detail);
    error.Value().As<Napi::Object>().Set("stats", stats);
    c->deferred.Reject(error.Value());
  }
}

void OnEnvTeardown(void* arg);

// On the JS thread, once the engine is done (or told to stop): join its thread, settle the promise,
// drop the teardown hook. The caller holds a reference to the core.
void Finish(Napi::Env env, Core* c) {
  c->engine->Join();
  Settle(env, c);
  if (c->hookArg != nullptr) {
    auto* arg = c->hookArg;
    c->hookArg = nullptr;
    napi_remove_env_cleanup_hook(env, OnEnvTeardown, arg);
    delete arg;
  }
}

// Environment teardown (worker exit, process exit) while the thread runs: stop and join it.
void OnEnvTeardown(void* arg) {
  auto* kept = static_cast<std::shared_ptr<Core>*>(arg);
  Core* c = kept->get();
  c->hookArg = nullptr;
  c->engine->Join();
  delete kept;
}

SnapshotOptions ReadOptions(Napi::Env env, Napi::Object opts) {
  SnapshotOptions o;
  if (opts.Get("chunkSize").IsNumber()) {
    double c = opts.Get("chunkSize").As<Napi::Number>().DoubleValue();
    if (!(c >= 1)) ThrowRangeError(env, "chunkSize must be >= 1");
    o.chunkSize = static_cast<uint64_t>(c);
  }
  if (opts.Get("faultAround").IsNumber()) {
    double f = opts.Get("faultAround").As<Napi::Number>().DoubleValue();
    if (!(f >= 0)) ThrowRangeError(env, "faultAround must be >= 0");
    o.faultAround = static_cast<uint64_t>(f);
  }
  if (opts.Get("maxBytesPerSecond").IsNumber())
    o.maxBytesPerSecond = opts.Get("maxBytesPerSecond").As<Napi::Number>().DoubleValue();
  o.backgroundIdle = opts.Get("backgroundPriority").IsString() &&
                     opts.Get("backgroundPriority").As<Napi::String>().Utf8Value() == "idle";
  o.populate = opts.Get("populate").ToBoolean();
  return o;
}

class JsSnapshotEngine : public Napi::ObjectWrap<JsSnapshotEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SnapshotEngine",
                       {
                           InstanceMethod<&JsSnapshotEngine::Progress>("progress"),
                           InstanceMethod<&JsSnapshotEngine::Cancel>("cancel"),
                           InstanceMethod<&JsSnapshotEngine::JoinSync>("join"),
                       });
  }

  JsSnapshotEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsSnapshotEngine>(info) {
    Napi::Env env = info.Env();
    int uffd = ArgFd(info, 0);
    uint64_t start = ArgU64(info, 1, "start");
    uint64_t length = ArgU64(info, 2, "length");
    uint64_t pageSize = ArgU64(info, 3, "pageSize");
    if (pageSize < BasePageSize() || !IsPowerOfTwo(pageSize))
      ThrowRangeError(env, "pageSize must be a power of two >= the base page size");
    if (length == 0 || length % pageSize != 0 || start % pageSize != 0)
      ThrowRangeError(env, "the range must be non-empty and aligned to the page size");
    if (!info[4].IsObject()) ThrowTypeError(env, "sink must be an object");
    Napi::Object sinkSpec = info[4].As<Napi::Object>();
    Napi::Object opts = info[5].IsObject() ? info[5].As<Napi::Object>() : Napi::Object::New(env);
    SnapshotOptions options = ReadOptions(env, opts);
    std::string method =
        opts.Get("copyMethod").IsString() ? opts.Get("copyMethod").As<Napi::String>().Utf8Value() : "auto";

    auto c = std::make_shared<Core>(env);
    c->length = length;
    SnapshotSink sink;
    BytesArg bytes;
    if (sinkSpec.Has("buffer") && TryBytes(sinkSpec.Get("buffer"), &bytes)) {
      if (bytes.data == nullptr || bytes.length < length)
        ThrowRangeError(env, "the sink buffer is smaller than the range (or detached)");
      c->sinkRef = Napi::Persistent(sinkSpec.Get("buffer"));
      if (sinkSpec.Get("shared").ToBoolean()) {
        sink.memory = bytes.data;  // a SharedArrayBuffer's memory: the reference keeps it alive
      } else {
        c->staging.reset(new Staging());
        void* m =
            mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) ThrowUffdError(env, errno, "mmap", -1, "staging memory for the sink buffer");
        c->staging->data = static_cast<uint8_t*>(m);
        c->staging->length = length;
        sink.memory = c->staging->data;
      }
      options.method = method == "pipe" ? CopyMethod::kPipe : CopyMethod::kProcessVmReadv;
      options.methodFixed = method != "auto";
    } else if (sinkSpec.Get("address").IsBigInt()) {
      bool lossless = false;
      uint64_t at = sinkSpec.Get("address").As<Napi::BigInt>().Uint64Value(&lossless);
      double have =
          sinkSpec.Get("length").IsNumber() ? sinkSpec.Get("length").As<Napi::Number>().DoubleValue() : 0;
      if (!lossless || !(have >= static_cast<double>(length)))
        ThrowRangeError(env, "the sink memory is smaller than the range");
      sink.memory = reinterpret_cast<uint8_t*>(at);
      options.method = method == "pipe" ? CopyMethod::kPipe : CopyMethod::kProcessVmReadv;
      options.methodFixed = method != "auto";
    } else if (sinkSpec.Get("fd").IsNumber()) {
      sink.fd = sinkSpec.Get("fd").As<Napi::Number>().Int32Value();
      if (sink.fd < 0) ThrowRangeError(env, "sink fd must be non-negative");
      double offset =
          sinkSpec.Get("offset").IsNumber() ? sinkSpec.Get("offset").As<Napi::Number>().DoubleValue() : 0;
      if (!(offset >= 0)) ThrowRangeError(env, "sink offset must be non-negative");
      sink.offset = static_cast<uint64_t>(offset);
      options.method = CopyMethod::kPwrite;
    } else {
      ThrowTypeError(env, "sink must be { fd, offset }, { address, length } or { buffer }");
    }

    c->engine.reset(new SnapshotEngine(uffd, start, length, pageSize, sink, options));
    std::string syscall, detail;
    int err = c->engine->Protect(&syscall, &detail);
    if (err != 0) ThrowUffdError(env, err, syscall, -1, detail);

    info.This().As<Napi::Object>().Set("done", c->deferred.Promise());
    auto* kept = new std::shared_ptr<Core>(c);
    c->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "userfaultfd.snapshot", 0, 1, kept,
                                            [](Napi::Env, std::shared_ptr<Core>* k) { delete k; });
    c->hookArg = new std::shared_ptr<Core>(c);
    napi_add_env_cleanup_hook(env, OnEnvTeardown, c->hookArg);
    core_ = c;
    Core* raw = c.get();
    c->engine->Start([raw]() {
      raw->tsfn.BlockingCall(raw, [](Napi::Env env, Napi::Function, Core* done) {
        if (env != nullptr) Finish(env, done);
      });
      raw->tsfn.Release();
    });
  }

 private:
  Napi::Value Progress(const Napi::CallbackInfo& info) {
    return StatsToJs(info.Env(), core_->engine->Stats());
  }

  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    core_->engine->Cancel();
    return info.Env().Undefined();
  }

  // Cancels (unless already finished), joins the thread and settles the promise now.
  Napi::Value JoinSync(const Napi::CallbackInfo& info) {
    Finish(info.Env(), core_.get());
    return info.Env().Undefined();
  }

  std::shared_ptr<Core> core_;
};

}  // namespace

void InitSnapshotEngine(Napi::Env env, Napi::Object exports) {
  exports.Set("SnapshotEngine", JsSnapshotEngine::Define(env));
}
