// MigrationSourceHandle / MigrationTargetHandle: the JS faces of the migration sessions
// (engine/migration_source.h, engine/migration_target.h), and pageHashes(). One session per
// handle; its notices reach JS through one threadsafe function; its threads are joined on
// close(), on garbage collection and at environment teardown, whichever comes first.
//
// new MigrationSourceHandle(ranges [{ address, length, pageSize }], options, notify(notices[]))
//   attachMain(fd) attachDemand(fd) detach() close() send(channel, type, range, page, payload?)
//   sendRuns(id, runs: Float64Array [range, page, count]*) startPostcopy(runs, push) resumePush()
//   setPushRate(bytesPerSecond) stats() ref() unref()
// new MigrationTargetHandle(ranges [{ address, length, pageSize, alias?, memfd? }], options, notify)
//   attachMain(fd) attachDemand(fd) detach() close() send('main', type, range, page, payload?)
//   startServing(uffd) stopServing() resendRequests() have(range) -> Uint8Array
//   settle(poison) -> pages  verify(range, maskOffset, maskLength) -> Float64Array | null
//   stats() ref() unref()
// pageHashes(address, length, pageSize, maskOffset, maskLength) -> BigUint64Array
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <memory>

#include "binding/args.h"
#include "binding/threaded_core.h"
#include "binding/uffd.h"
#include "engine/migration_source.h"
#include "engine/migration_target.h"
#include "engine/page_hash.h"
#include "engine/util.h"

using migration::Run;
using migration::SessionNotice;
using migration::SourceRange;
using migration::SourceSession;
using migration::TargetRange;
using migration::TargetSession;

namespace {

template <typename Session>
struct SessionCore : ThreadedCore {
  std::unique_ptr<Session> session;

 protected:
  void Stop() override { session->Close(); }  // joins every thread of the session
};

// The ranges both session handles take: an array of 1..65535 { address, length, pageSize }, each
// non-empty and aligned to its page size; more(object, range) reads what one side adds.
template <class Range, typename More>
std::vector<Range> ArgRanges(Napi::Env env, Napi::Value v, More more) {
  if (!v.IsArray()) ThrowTypeError(env, "ranges must be an array");
  Napi::Array list = v.As<Napi::Array>();
  if (list.Length() == 0 || list.Length() > 65535) ThrowRangeError(env, "1..65535 ranges");
  for (uint32_t i = 0; i < list.Length(); i++)
    if (!list.Get(i).IsObject()) ThrowTypeError(env, "a range must be an object");
  std::vector<Range> ranges;
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Object o = list.Get(i).As<Napi::Object>();
    Range r;
    r.address = U64Field(o, "address");
    r.length = U64Field(o, "length");
    r.pageSize = U64Field(o, "pageSize");
    if (r.pageSize < BasePageSize() || (r.pageSize & (r.pageSize - 1)) || r.length == 0 ||
        r.length % r.pageSize || r.address % r.pageSize)
      ThrowRangeError(env, "a range must be non-empty and aligned to its page size");
    r.pages = r.length / r.pageSize;
    more(o, r);
    ranges.push_back(r);
  }
  return ranges;
}

// Takes a socket from JS: a blocking, close-on-exec duplicate that the session owns.
int AdoptSocket(Napi::Env env, const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
  int flags = fcntl(own, F_GETFL);
  if (flags >= 0 && (flags & O_NONBLOCK)) fcntl(own, F_SETFL, flags & ~O_NONBLOCK);
  return own;
}

// attachMain(fd, initial?): the bytes of the stream read before the handover, if any.
std::vector<uint8_t> ArgInitial(const Napi::CallbackInfo& info) {
  if (info.Length() < 2 || info[1].IsUndefined()) return {};
  BytesArg b;
  if (!TryBytes(info[1], &b)) ThrowTypeError(info.Env(), "initial must be a Uint8Array");
  return b.data == nullptr ? std::vector<uint8_t>() : std::vector<uint8_t>(b.data, b.data + b.length);
}

std::vector<Run> ArgRuns(const Napi::CallbackInfo& info, size_t i, size_t ranges) {
  if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    ThrowTypeError(info.Env(), "runs must be a Float64Array");
  Napi::Float64Array a = info[i].As<Napi::Float64Array>();
  if (a.ElementLength() % 3 != 0) ThrowRangeError(info.Env(), "runs must hold [range, page, count] triples");
  std::vector<Run> runs;
  for (size_t k = 0; k < a.ElementLength(); k += 3) {
    double r = a[k], p = a[k + 1], c = a[k + 2];
    if (!(r >= 0) || r >= static_cast<double>(ranges) || !(p >= 0) || !(c >= 1) || p > 9007199254740991.0 ||
        c > 9007199254740991.0)
      ThrowRangeError(info.Env(), "a run is out of range");
    runs.push_back(Run{static_cast<uint16_t>(r), static_cast<uint64_t>(p), static_cast<uint64_t>(c)});
  }
  return runs;
}

std::vector<uint8_t> ArgPayload(const Napi::CallbackInfo& info, size_t i) {
  BytesArg bytes;
  if (info[i].IsUndefined() || info[i].IsNull()) return {};
  if (!TryBytes(info[i], &bytes)) ThrowTypeError(info.Env(), "payload must be bytes");
  if (bytes.length > (8u << 20)) ThrowRangeError(info.Env(), "payload too large");
  return std::vector<uint8_t>(bytes.data, bytes.data + bytes.length);
}

Napi::Value NoticesToJs(Napi::Env env, std::deque<SessionNotice>& notices) {
  Napi::Array out = Napi::Array::New(env, notices.size());
  uint32_t k = 0;
  for (auto& n : notices) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("kind", n.kind);
    if (!n.channel.empty()) o.Set("channel", n.channel);
    if (n.err != 0) {
      o.Set("errno", Napi::Number::New(env, n.err));
      o.Set("error",
            MakeUffdError(env, n.err, n.kind == "error" ? n.channel : "recv", -1, n.message).Value());
    }
    if (n.protocol) o.Set("protocol", true);
    if (!n.message.empty()) o.Set("message", n.message);
    if (n.id != 0) o.Set("id", Napi::Number::New(env, static_cast<double>(n.id)));
    if (n.at != 0) o.Set("at", Napi::BigInt::New(env, n.at));
    if (!n.payload.empty())
      o.Set("payload", Napi::Buffer<uint8_t>::Copy(env, n.payload.data(), n.payload.size()));
    out[k++] = o;
  }
  return out;
}

// JS thread, woken by the session: hands its notices to the listener.
template <typename Session>
void DeliverNotices(SessionCore<Session>& core, Napi::Env env, Napi::Function notify) {
  if (!core.session) return;
  std::deque<SessionNotice> notices = core.session->TakeNotices();
  if (notices.empty()) return;
  CallListener(env, notify, [&] { return NoticesToJs(env, notices); });
}

void Put(Napi::Object o, const char* name, uint64_t v) {
  o.Set(name, Napi::Number::New(o.Env(), static_cast<double>(v)));
}

// stats().silentMs: how long the session's channels have been silent (0 with none attached).
void PutSilentMs(Napi::Object o, uint64_t lastReceiveNs) {
  uint64_t now = NowNs();
  o.Set("silentMs", Napi::Number::New(o.Env(), lastReceiveNs == 0 || lastReceiveNs > now
                                                   ? 0
                                                   : static_cast<double>(now - lastReceiveNs) / 1e6));
}

// What the source and target handles share beyond the lifecycle (ThreadedWrap): the session's
// start, the channels' attach and detach. Derived::kName names the session in errors.
template <typename Derived, typename Session>
class SessionHandle : public ThreadedWrap<Derived, SessionCore<Session>> {
  using Base = ThreadedWrap<Derived, SessionCore<Session>>;

 public:
  explicit SessionHandle(const Napi::CallbackInfo& info) : Base(info) {}

 protected:
  using Base::core_;
  using typename Base::Wrap;
  using Method = typename Wrap::InstanceMethodCallback;

  // The class, its own methods between the shared ones (the order the prototype has always had).
  static Napi::Function DefineSession(Napi::Env env, const char* name,
                                      std::initializer_list<std::pair<const char*, Method>> own) {
    std::vector<typename Wrap::PropertyDescriptor> methods = {
        Wrap::InstanceMethod("attachMain", &SessionHandle::AttachMain),
        Wrap::InstanceMethod("attachDemand", &SessionHandle::AttachDemand),
        Wrap::InstanceMethod("detach", &SessionHandle::Detach),
        Base::CloseMethod(),
    };
    for (const auto& [jsName, method] : own) methods.push_back(Wrap::InstanceMethod(jsName, method));
    methods.push_back(Base::RefMethod());
    methods.push_back(Base::UnrefMethod());
    return Wrap::DefineClass(env, name, methods);
  }

  // The options object (info[1], optional) after checking the listener (info[2]).
  static Napi::Object OptionsArg(const Napi::CallbackInfo& info) {
    Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(info.Env());
    if (!info[2].IsFunction()) ThrowTypeError(info.Env(), "notify must be a function");
    return opts;
  }

  // Starts the session; its notices go to info[2] through a TSFN named `tsfnName`.
  template <typename Range, typename Options>
  void Open(const Napi::CallbackInfo& info, std::vector<Range> ranges, const Options& o,
            const char* tsfnName) {
    rangeCount_ = ranges.size();
    core_ = std::make_shared<SessionCore<Session>>();
    core_->Open(info.Env(), info[2].As<Napi::Function>(), tsfnName);
    core_->session.reset(new Session(std::move(ranges), o, TsfnWaker(core_, DeliverNotices<Session>)));
    core_->Hook();
  }

  Session* Live(Napi::Env env) {
    if (core_->closed) ThrowUffdError(env, EBADF, Derived::kName, -1, "the session is closed");
    return core_->session.get();
  }
  size_t ranges() const { return rangeCount_; }

 private:
  Napi::Value AttachMain(const Napi::CallbackInfo& info) {
    Session* s = Live(info.Env());
    return Napi::Number::New(
        info.Env(), static_cast<double>(s->AttachMain(AdoptSocket(info.Env(), info), ArgInitial(info))));
  }
  Napi::Value AttachDemand(const Napi::CallbackInfo& info) {
    Session* s = Live(info.Env());
    return Napi::Number::New(
        info.Env(), static_cast<double>(s->AttachDemand(AdoptSocket(info.Env(), info), ArgInitial(info))));
  }
  Napi::Value Detach(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->session->Detach();
    return info.Env().Undefined();
  }

  size_t rangeCount_ = 0;
};

// ---- source -----------------------------------------------------------------------------------

class MigrationSourceHandle : public SessionHandle<MigrationSourceHandle, SourceSession> {
 public:
  static constexpr const char* kName = "MigrationSource";

  static Napi::Function Define(Napi::Env env) {
    using H = MigrationSourceHandle;
    return DefineSession(env, "MigrationSourceHandle",
                         {
                             {"send", &H::Send},
                             {"sendRuns", &H::SendRuns},
                             {"startPostcopy", &H::StartPostcopy},
                             {"resumePush", &H::ResumePush},
                             {"setPush", &H::SetPush},
                             {"setPushRate", &H::SetPushRate},
                             {"stats", &H::Stats},
                         });
  }

  MigrationSourceHandle(const Napi::CallbackInfo& info) : SessionHandle(info) {
    Napi::Env env = info.Env();
    std::vector<SourceRange> ranges = ArgRanges<SourceRange>(env, info[0], [](Napi::Object, SourceRange&) {});
    Napi::Object opts = OptionsArg(info);
    migration::SourceOptions o;
    o.pingMs = static_cast<uint32_t>(OptU64(opts, "pingMs", o.pingMs));
    o.chunkBytes = OptU64(opts, "chunkBytes", o.chunkBytes);
    if (o.chunkBytes < 4096 || o.chunkBytes > migration::kMaxPagesPayload)
      ThrowRangeError(env, "chunkBytes must be 4 KiB..4 MiB");
    o.pushChunkBytes = OptU64(opts, "pushChunkBytes", 0);
    if (o.pushChunkBytes != 0 && (o.pushChunkBytes < 4096 || o.pushChunkBytes > migration::kMaxPagesPayload))
      ThrowRangeError(env, "pushChunkBytes must be 4 KiB..4 MiB");
    o.postcopyBuffer = static_cast<uint32_t>(OptU64(opts, "postcopyBuffer", 0));
    o.notsentLowat = static_cast<uint32_t>(OptU64(opts, "notsentLowat", 0));
    o.pushNice = OptInt(opts, "pushNice", 0, -20, 19);
    if (opts.Get("realtimeDemand").IsBoolean()) o.realtimeDemand = opts.Get("realtimeDemand").ToBoolean();
    Open(info, std::move(ranges), o, "userfaultfd.MigrationSource");
  }

 private:
  Napi::Value Send(const Napi::CallbackInfo& info) {
    SourceSession* s = Live(info.Env());
    std::string channel = info[0].ToString().Utf8Value();
    uint8_t type = static_cast<uint8_t>(ArgI32(info, 1, "type"));
    uint16_t range = static_cast<uint16_t>(ArgI32(info, 2, "range"));
    uint64_t page = ArgU64(info, 3, "page");
    std::vector<uint8_t> payload = ArgPayload(info, 4);
    if (channel == "demand")
      s->EnqueueDemand(type, range, page, std::move(payload));
    else
      s->EnqueueMain(type, range, page, std::move(payload));
    return info.Env().Undefined();
  }
  Napi::Value SendRuns(const Napi::CallbackInfo& info) {
    SourceSession* s = Live(info.Env());
    uint64_t id = ArgU64(info, 0, "id");
    s->SendRuns(id, ArgRuns(info, 1, ranges()));
    return info.Env().Undefined();
  }
  Napi::Value StartPostcopy(const Napi::CallbackInfo& info) {
    SourceSession* s = Live(info.Env());
    s->StartPostcopy(ArgRuns(info, 0, ranges()), info[1].ToBoolean());
    return info.Env().Undefined();
  }
  Napi::Value ResumePush(const Napi::CallbackInfo& info) {
    Live(info.Env())->ResumePush();
    return info.Env().Undefined();
  }
  Napi::Value SetPush(const Napi::CallbackInfo& info) {
    Live(info.Env())->SetPush(info[0].ToBoolean());
    return info.Env().Undefined();
  }
  Napi::Value SetPushRate(const Napi::CallbackInfo& info) {
    Live(info.Env())->SetPushRate(ArgU64(info, 0, "bytesPerSecond"));
    return info.Env().Undefined();
  }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const migration::SourceStats& s = core_->session->stats();
    Napi::Object o = Napi::Object::New(env);
    Put(o, "precopyPages", s.precopyPages.load());
    Put(o, "pushedPages", s.pushedPages.load());
    Put(o, "demandPages", s.demandPages.load());
    Put(o, "zeroPages", s.zeroPages.load());
    Put(o, "requests", s.requests.load());
    Put(o, "requestsForSent", s.requestsForSent.load());
    Put(o, "resentPages", s.resentPages.load());
    Put(o, "rounds", s.rounds.load());
    Put(o, "unsent", core_->session->unsent());
    Put(o, "wireBytes", core_->session->wireBytes());
    PutSilentMs(o, core_->session->lastReceiveNs());
    return o;
  }
};

// ---- target -----------------------------------------------------------------------------------

class MigrationTargetHandle : public SessionHandle<MigrationTargetHandle, TargetSession> {
 public:
  static constexpr const char* kName = "MigrationTarget";

  static Napi::Function Define(Napi::Env env) {
    using H = MigrationTargetHandle;
    return DefineSession(env, "MigrationTargetHandle",
                         {
                             {"send", &H::Send},
                             {"startServing", &H::StartServing},
                             {"stopServing", &H::StopServing},
                             {"registered", &H::Registered},
                             {"dropUnreceived", &H::DropUnreceived},
                             {"populate", &H::Populate},
                             {"resendRequests", &H::ResendRequests},
                             {"have", &H::Have},
                             {"settle", &H::Settle},
                             {"verify", &H::Verify},
                             {"stats", &H::Stats},
                         });
  }

  MigrationTargetHandle(const Napi::CallbackInfo& info) : SessionHandle(info) {
    Napi::Env env = info.Env();
    std::vector<TargetRange> ranges =
        ArgRanges<TargetRange>(env, info[0], [env](Napi::Object o, TargetRange& r) {
          if (o.Has("alias") && !o.Get("alias").IsUndefined()) {
            r.alias = U64Field(o, "alias");
            r.memfd = static_cast<int>(U64Field(o, "memfd"));
            if (r.alias % r.pageSize) ThrowRangeError(env, "alias must be aligned to the page size");
          }
        });
    Napi::Object opts = OptionsArg(info);
    migration::TargetOptions o;
    o.pingMs = static_cast<uint32_t>(OptU64(opts, "pingMs", o.pingMs));
    o.spinUs = static_cast<uint32_t>(OptU64(opts, "spinUs", o.spinUs));
    o.readSize = static_cast<uint32_t>(OptU64(opts, "readSize", o.readSize));
    if (o.readSize < 1 || o.readSize > 4096) ThrowRangeError(env, "readSize must be 1..4096");
    o.postcopyBuffer = static_cast<uint32_t>(OptU64(opts, "postcopyBuffer", 0));
    o.bulkNice = OptInt(opts, "bulkNice", 0, -20, 19);
    if (opts.Get("realtimeDemand").IsBoolean()) o.realtimeDemand = opts.Get("realtimeDemand").ToBoolean();
    Open(info, std::move(ranges), o, "userfaultfd.MigrationTarget");
  }

 private:
  uint16_t ArgRange(const Napi::CallbackInfo& info, size_t i) {
    int32_t r = ArgI32(info, i, "range");
    if (r < 0 || static_cast<size_t>(r) >= ranges()) ThrowRangeError(info.Env(), "range index out of range");
    return static_cast<uint16_t>(r);
  }
  Napi::Value Send(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    uint8_t type = static_cast<uint8_t>(ArgI32(info, 1, "type"));
    uint16_t range = static_cast<uint16_t>(ArgI32(info, 2, "range"));
    uint64_t page = ArgU64(info, 3, "page");
    s->EnqueueMain(type, range, page, ArgPayload(info, 4));
    return info.Env().Undefined();
  }
  Napi::Value StartServing(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    std::string syscall;
    int err = s->StartServing(ArgFd(info, 0), &syscall);
    if (err != 0) ThrowUffdError(info.Env(), err, syscall);
    return info.Env().Undefined();
  }
  Napi::Value Populate(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    std::string syscall;
    int err = s->Populate(&syscall);
    if (err != 0) ThrowUffdError(info.Env(), err, syscall);
    return info.Env().Undefined();
  }
  Napi::Value DropUnreceived(const Napi::CallbackInfo& info) {
    Live(info.Env())->DropUnreceived();
    return info.Env().Undefined();
  }
  Napi::Value Registered(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    std::string syscall;
    int err = s->Registered(ArgFd(info, 0), &syscall);
    if (err != 0) ThrowUffdError(info.Env(), err, syscall);
    return info.Env().Undefined();
  }
  Napi::Value StopServing(const Napi::CallbackInfo& info) {
    if (!core_->closed) core_->session->StopServing();
    return info.Env().Undefined();
  }
  Napi::Value ResendRequests(const Napi::CallbackInfo& info) {
    Live(info.Env())->ResendRequests();
    return info.Env().Undefined();
  }
  Napi::Value Have(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    std::vector<uint8_t> bits = s->HaveBitmap(ArgRange(info, 0));
    return Napi::Buffer<uint8_t>::Copy(info.Env(), bits.data(), bits.size());
  }
  Napi::Value Settle(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    int err = 0;
    std::string syscall;
    uint64_t n = s->Settle(info[0].ToBoolean(), &err, &syscall);
    if (err != 0) ThrowUffdError(info.Env(), err, syscall);
    return Napi::Number::New(info.Env(), static_cast<double>(n));
  }
  Napi::Value Verify(const Napi::CallbackInfo& info) {
    TargetSession* s = Live(info.Env());
    uint16_t range = ArgRange(info, 0);
    bool have = false;
    std::vector<uint64_t> bad =
        s->Verify(range, ArgU64(info, 1, "maskOffset"), ArgU64(info, 2, "maskLength"), &have);
    if (!have) return info.Env().Null();
    Napi::Float64Array out = Napi::Float64Array::New(info.Env(), bad.size());
    for (size_t i = 0; i < bad.size(); i++) out[i] = static_cast<double>(bad[i]);
    return out;
  }
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    TargetSession* session = core_->session.get();
    const migration::TargetStats& s = session->stats();
    Napi::Object o = Napi::Object::New(env);
    Put(o, "precopyPages", s.precopyPages.load());
    Put(o, "zeroPages", s.zeroPages.load());
    Put(o, "pushedPages", s.pushedPages.load());
    Put(o, "demandPages", s.demandPages.load());
    Put(o, "duplicatePages", s.duplicatePages.load());
    Put(o, "discardedPages", s.discardedPages.load());
    Put(o, "faults", s.faults.load());
    Put(o, "requests", s.requests.load());
    Put(o, "resentRequests", s.resentRequests.load());
    Put(o, "continues", s.continues.load());
    Put(o, "poisonedPages", s.poisonedPages.load());
    Put(o, "zeroedPages", s.zeroedPages.load());
    Put(o, "errors", s.errors.load());
    Put(o, "missing", session->missing());
    Put(o, "wireBytes", session->wireBytes());
    const LatencyHistogram& h = session->latency();
    Put(o, "demandSamples", h.Count());
    o.Set("demandP50us", Napi::Number::New(env, static_cast<double>(h.Quantile(0.5)) / 1000.0));
    o.Set("demandP99us", Napi::Number::New(env, static_cast<double>(h.Quantile(0.99)) / 1000.0));
    PutSilentMs(o, session->lastReceiveNs());
    return o;
  }
};

Napi::Value PageHashes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t address = ArgU64(info, 0, "address");
  uint64_t length = ArgU64(info, 1, "length");
  uint64_t pageSize = ArgU64(info, 2, "pageSize");
  uint64_t maskOffset = ArgU64(info, 3, "maskOffset");
  uint64_t maskLength = ArgU64(info, 4, "maskLength");
  if (pageSize < BasePageSize() || (pageSize & (pageSize - 1)) || length % pageSize || address % pageSize)
    ThrowRangeError(env, "pageHashes needs a range aligned to its page size");
  uint64_t pages = length / pageSize;
  Napi::BigUint64Array out = Napi::BigUint64Array::New(env, pages);
  for (uint64_t p = 0; p < pages; p++)
    out[p] = migration::PageHash(reinterpret_cast<const uint8_t*>(address + p * pageSize), pageSize,
                                 maskOffset, maskLength);
  return out;
}

}  // namespace

void InitMigration(Napi::Env env, Napi::Object exports) {
  exports.Set("MigrationSourceHandle", MigrationSourceHandle::Define(env));
  exports.Set("MigrationTargetHandle", MigrationTargetHandle::Define(env));
  exports.Set("pageHashes", Napi::Function::New(env, PageHashes, "pageHashes"));
}
