// Live snapshot engine: copies a write-protected range to a sink (file or buffer) exactly as it
// was at the moment it was protected, while other threads keep writing to it.
//
// The constructor (on the JS thread) optionally populates the range, then write-protects all of
// it with one UFFDIO_WRITEPROTECT: that ioctl's return is the snapshot instant. Then two native
// threads share the work (the uffd, registered WP by the caller, is read by nobody else):
//   - the fault thread reads messages: a WP fault on a page nobody has claimed claims it (and
//     the free pages next to it in its fault-around window), copies them out, then unprotects
//     them (which wakes the writer); a fault on a page being or already
//     copied needs nothing (the unprotect wakes it); REMOVE/UNMAP/REMAP events over pages not yet
//     copied fail the snapshot (their old contents are about to vanish);
//   - the background thread claims, copies and unprotects the rest, a chunk at a time.
// Each page is claimed once (atomically) and unprotected only by its claimer, after its copy.
// Nothing is unprotected before the whole range was protected, so every thread's writes are cut
// at one point: the snapshot never sees a write made after it began, and a writer never sees
// stale data (pages are only copied OUT; the memory itself is never rewritten).
//
// Source memory is never read with memcpy: it may be unmapped at any moment. Copies go through
// syscalls that fail with EFAULT instead of crashing: pwrite(2) straight from the source into a
// file sink; process_vm_readv(2) into a buffer sink, or, where seccomp forbids that (Docker's
// default profile), write(2) into a pipe and read(2) back out.
//
// new SnapshotEngine(uffd, start, length, pageSize, sink, options)
//   sink: { fd, offset } (pwrite at offset + page offset) | { buffer: ArrayBuffer | view }
//   options: { chunkSize, maxBytesPerSecond, populate, copyMethod: 'auto'|'process_vm_readv'|'pipe' }
// engine.done: Promise<stats>; engine.progress(); engine.cancel(); engine.join()
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/uapi.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace {

enum class Method { Pwrite, ProcessVmReadv, Pipe };

const char* MethodName(Method m) {
  switch (m) {
    case Method::Pwrite:
      return "pwrite";
    case Method::ProcessVmReadv:
      return "process_vm_readv";
    case Method::Pipe:
      return "pipe";
  }
  return "?";
}

uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// How one thread copies source pages out (each thread has its own: the pipe, and the fallback
// from process_vm_readv once seccomp refused it).
struct Copier {
  Method method = Method::Pwrite;
  bool fixed = false;  // no fallback (a test forcing one method)
  int pipeR = -1;
  int pipeW = -1;
  size_t pipeCap = 0;
  ~Copier() {
    if (pipeR >= 0) close(pipeR);
    if (pipeW >= 0) close(pipeW);
  }
};

// Page states. A page is copied by whichever thread claims it (0 -> 1) and unprotected by that
// same thread after the copy (1 -> 2); nobody else unprotects it in between.
enum : uint8_t { kFree = 0, kClaimed = 1, kDone = 2 };

struct Engine {
  // Set up on the JS thread, then read-only.
  int uffd = -1;
  uint64_t start = 0;
  uint64_t length = 0;
  uint64_t pageSize = 4096;
  uint64_t pages = 0;
  int sinkFd = -1;
  uint64_t sinkOffset = 0;
  uint8_t* buffer = nullptr;
  Method method = Method::Pwrite;  // initial method of each thread's Copier
  bool methodFixed = false;
  uint64_t chunkSize = 2 * 1024 * 1024;
  uint64_t faultAround = 64 * 1024;  // bytes copied around a fault (aligned window)
  double maxBytesPerSecond = 0;
  bool backgroundIdle = false;  // run the background copy under SCHED_IDLE
  bool populated = false;
  uint64_t protectNs = 0;  // duration of the write-protect ioctl
  uint64_t instantNs = 0;  // when it returned: the snapshot instant
  std::unique_ptr<std::atomic<uint8_t>[]> state;

  // Fault thread only (it reads the uffd).
  Copier faultCopier;
  int drainDepth = 0;
  bool lingering = false;  // finished: only wake faults and acknowledge events
  // Background thread only.
  Copier backgroundCopier;
  uint64_t backgroundBytes = 0;

  // Shared.
  std::mutex errMu;
  int err = 0;
  std::string errSyscall;
  std::string errDetail;
  std::atomic<bool> failed{false};
  std::atomic<bool> backgroundDone{false};
  uint64_t endNs = 0;
  std::atomic<const char*> usedMethod{nullptr};
  std::atomic<bool> cancel{false};
  std::atomic<bool> finished{false};
  std::atomic<bool> stop{false};  // leave Linger()
  std::atomic<uint64_t> bytesCopied{0};
  std::atomic<uint64_t> faultCopies{0};
  std::atomic<uint64_t> backgroundCopies{0};
  std::atomic<uint64_t> faults{0};
  std::atomic<uint64_t> wakes{0};

  // JS-thread only.
  std::thread thread;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> sinkRef;  // keeps a buffer sink alive
  napi_env env = nullptr;
  std::shared_ptr<Engine>* hookArg = nullptr;  // env teardown hook's reference, while registered
  bool settled = false;

  explicit Engine(Napi::Env e) : deferred(Napi::Promise::Deferred::New(e)), env(e) {}

  bool Fail(int error, const char* syscall, const std::string& detail = "") {
    std::lock_guard<std::mutex> lock(errMu);
    if (err == 0 && !finished.load()) {
      err = error;
      errSyscall = syscall;
      errDetail = detail;
      failed.store(true);
    }
    return false;
  }

  bool Stopping() const { return failed.load() || cancel.load(); }

  std::string Where(uint64_t index) const {
    char buf[96];
    snprintf(buf, sizeof buf, "page at 0x%llx, offset %llu",
             static_cast<unsigned long long>(start + index * pageSize),
             static_cast<unsigned long long>(index * pageSize));
    return buf;
  }

  bool OpenPipe(Copier* c) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return Fail(errno, "pipe2");
    c->pipeR = fds[0];
    c->pipeW = fds[1];
    int cap = fcntl(c->pipeW, F_SETPIPE_SZ, 1 << 20);
    if (cap < 0) cap = fcntl(c->pipeW, F_GETPIPE_SZ);
    c->pipeCap = cap > 0 ? static_cast<size_t>(cap) : 65536;
    return true;
  }

  // Copies [src, src + n) into the buffer sink at dst through a pipe: write(2) reads the source
  // with copy_from_user, so an unmapped source is EFAULT, never a crash.
  bool CopyViaPipe(Copier* c, uint64_t src, uint8_t* dst, size_t n, uint64_t index) {
    if (c->pipeR < 0 && !OpenPipe(c)) return false;
    size_t done = 0;
    while (done < n) {
      size_t want = std::min(n - done, c->pipeCap);
      ssize_t w = write(c->pipeW, reinterpret_cast<void*>(src + done), want);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        int e = errno;
        return Fail(e, "write",
                    e == EFAULT ? "the " + Where(index) + " is no longer mapped"
                                : "copying the " + Where(index) + " through a pipe");
      }
      size_t got = 0;
      while (got < static_cast<size_t>(w)) {
        ssize_t r = read(c->pipeR, dst + done + got, static_cast<size_t>(w) - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return Fail(r < 0 ? errno : EIO, "read", "draining the copy pipe");
        got += static_cast<size_t>(r);
      }
      done += static_cast<size_t>(w);
    }
    return true;
  }

  // Copies `count` pages from page `index` to the sink.
  bool CopyPages(Copier* c, uint64_t index, uint64_t count) {
    uint64_t off = index * pageSize;
    uint64_t src = start + off;
    size_t n = static_cast<size_t>(count * pageSize);
    size_t done = 0;
    while (done < n) {
      ssize_t r;
      if (c->method == Method::Pwrite) {
        r = pwrite(sinkFd, reinterpret_cast<void*>(src + done), n - done,
                   static_cast<off_t>(sinkOffset + off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
          int e = errno;
          return Fail(e, "pwrite",
                      e == EFAULT ? "the " + Where(index) + " is no longer mapped"
                                  : "writing the " + Where(index) + " to the sink");
        }
        if (r == 0) return Fail(EIO, "pwrite", "the sink accepted no bytes");
      } else if (c->method == Method::ProcessVmReadv) {
        struct iovec local = {buffer + off + done, n - done};
        struct iovec remote = {reinterpret_cast<void*>(src + done), n - done};
        r = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && !c->fixed && (errno == EPERM || errno == ENOSYS || errno == EACCES)) {
          c->method = Method::Pipe;  // seccomp (Docker's default profile) forbids it
          continue;
        }
        if (r < 0) {
          int e = errno;
          return Fail(
              e, "process_vm_readv",
              e == EFAULT ? "the " + Where(index) + " is no longer mapped" : "copying the " + Where(index));
        }
        if (r == 0) return Fail(EFAULT, "process_vm_readv", "the " + Where(index) + " is no longer mapped");
      } else {
        if (!CopyViaPipe(c, src + done, buffer + off + done, n - done, index)) return false;
        r = static_cast<ssize_t>(n - done);
      }
      done += static_cast<size_t>(r);
    }
    usedMethod.store(MethodName(c->method));
    bytesCopied.fetch_add(n, std::memory_order_relaxed);
    return true;
  }

  // Unprotects (and wakes) `count` pages from page `index`. `reader`: called on the thread that
  // reads the uffd, which can read a pending event itself.
  bool Unprotect(uint64_t index, uint64_t count, bool reader) {
    struct uffdio_writeprotect wp = {};
    wp.range.start = start + index * pageSize;
    wp.range.len = count * pageSize;
    wp.mode = 0;
    while (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        // An UNMAP/REMOVE/REMAP event is pending (mmap_changing): it must be read first. The
        // reader reads it (nested at most a few levels: a fault read here unprotects too);
        // the background thread waits for the reader to.
        if (reader && drainDepth < 4) {
          drainDepth++;
          bool ok = Drain();
          drainDepth--;
          if (!ok) return false;
        } else {
          if (Stopping()) return false;
          usleep(200);
        }
        continue;
      }
      int e = errno;
      return Fail(
          e, "ioctl(UFFDIO_WRITEPROTECT)",
          e == ENOENT ? "the " + Where(index) + " is no longer mapped" : "unprotecting the " + Where(index));
    }
    return true;
  }

  void Wake(uint64_t address, uint64_t len) {
    struct uffdio_range r = {address, len};
    ioctl(uffd, UFFDIO_WAKE, &r);  // a thread already woken by an unprotect: nothing to do
    wakes.fetch_add(1, std::memory_order_relaxed);
  }

  bool OnFault(uint64_t address) {
    faults.fetch_add(1, std::memory_order_relaxed);
    uint64_t page = address & ~(pageSize - 1);
    if (page < start || page >= start + length || lingering) {
      Wake(page, pageSize);
      return true;
    }
    uint64_t index = (page - start) / pageSize;
    uint8_t expected = kFree;
    if (!state[index].compare_exchange_strong(expected, kClaimed)) {
      // Done: the fault was raised before the unprotect, which woke it already. Claimed: the
      // background thread is copying it and its unprotect will wake the writer.
      if (expected == kDone) Wake(page, pageSize);
      return true;
    }
    // Fault-around: also claim the free pages next to it within its aligned window, so that a
    // writer moving through memory faults once per window, not once per page.
    uint64_t first = index;
    uint64_t last = index + 1;
    uint64_t window = std::max<uint64_t>(1, faultAround / pageSize);
    uint64_t lo = index - index % window;
    uint64_t hi = std::min(pages, lo + window);
    for (; last < hi; last++) {
      uint8_t e = kFree;
      if (!state[last].compare_exchange_strong(e, kClaimed)) break;
    }
    for (; first > lo; first--) {
      uint8_t e = kFree;
      if (!state[first - 1].compare_exchange_strong(e, kClaimed)) break;
    }
    if (!CopyPages(&faultCopier, first, last - first)) return false;
    faultCopies.fetch_add(last - first, std::memory_order_relaxed);
    if (!Unprotect(first, last - first, true)) return false;
    for (uint64_t k = first; k < last; k++) state[k].store(kDone);
    return true;
  }

  // An event that changes the address space: fatal if it covers pages not yet copied.
  bool OnChange(uint64_t from, uint64_t to, const char* what) {
    if (lingering) return true;
    uint64_t lo = std::max(from, start);
    uint64_t hi = std::min(to, start + length);
    for (uint64_t a = lo & ~(pageSize - 1); a < hi; a += pageSize) {
      uint64_t index = (a - start) / pageSize;
      if (state[index].load() != kDone) {
        return Fail(EFAULT, "snapshot",
                    std::string("the range was ") + what + " while the snapshot ran, before its " +
                        Where(index) + " was copied");
      }
    }
    return true;
  }

  // Reads and handles every pending message. False on a fatal error.
  bool Drain() {
    struct uffd_msg msgs[64];
    for (;;) {
      ssize_t n = read(uffd, msgs, sizeof msgs);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return true;
      if (n < 0) return Fail(errno, "read", "reading the snapshot's userfaultfd");
      size_t count = static_cast<size_t>(n) / sizeof(struct uffd_msg);
      for (size_t i = 0; i < count; i++) {
        const struct uffd_msg& m = msgs[i];
        bool ok = true;
        switch (m.event) {
          case UFFD_EVENT_PAGEFAULT:
            ok = OnFault(m.arg.pagefault.address);
            break;
          case UFFD_EVENT_REMOVE:
            ok = OnChange(m.arg.remove.start, m.arg.remove.end, "discarded (MADV_DONTNEED/REMOVE)");
            break;
          case UFFD_EVENT_UNMAP:
            ok = OnChange(m.arg.remove.start, m.arg.remove.end, "unmapped");
            break;
          case UFFD_EVENT_REMAP:
            ok = OnChange(m.arg.remap.from, m.arg.remap.from + m.arg.remap.len, "moved (mremap)");
            break;
          default:
            break;
        }
        if (!ok && !lingering) return false;
      }
    }
  }

  // Milliseconds to wait before the next background chunk under maxBytesPerSecond (0: go).
  int ThrottleMs() const {
    if (maxBytesPerSecond <= 0) return 0;
    double elapsed = static_cast<double>(NowNs() - instantNs) / 1e9;
    double allowed = elapsed * maxBytesPerSecond;
    if (static_cast<double>(backgroundBytes) <= allowed) return 0;
    double wait = (static_cast<double>(backgroundBytes) - allowed) / maxBytesPerSecond * 1000.0;
    return std::max(1, std::min(10, static_cast<int>(wait)));
  }

  // The background thread: claims, copies and unprotects the pages nobody has claimed, a chunk
  // at a time, so that the fault thread stays free to serve writers at once.
  void Background() {
    if (backgroundIdle) {
      struct sched_param param = {};
      pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);  // best effort
    }
    uint64_t per = std::max<uint64_t>(1, chunkSize / pageSize);
    for (uint64_t first = 0; first < pages;) {
      if (Stopping()) return;
      int wait = ThrottleMs();
      if (wait > 0) {
        usleep(static_cast<useconds_t>(wait) * 1000);
        continue;
      }
      uint64_t end = std::min(pages, first + per);
      uint64_t i = first;
      while (i < end) {
        uint8_t expected = kFree;
        if (!state[i].compare_exchange_strong(expected, kClaimed)) {
          i++;
          continue;
        }
        uint64_t j = i + 1;
        for (; j < end; j++) {
          uint8_t e = kFree;
          if (!state[j].compare_exchange_strong(e, kClaimed)) break;
        }
        if (!CopyPages(&backgroundCopier, i, j - i)) return;
        if (!Unprotect(i, j - i, false)) return;
        for (uint64_t k = i; k < j; k++) state[k].store(kDone);
        backgroundCopies.fetch_add(j - i, std::memory_order_relaxed);
        backgroundBytes += (j - i) * pageSize;
        i = j;
      }
      first = end;
    }
    backgroundDone.store(true);
  }

  // The fault thread: serves writers until the background thread is through.
  void Run() {
    std::thread background([this]() { Background(); });
    for (;;) {
      if (cancel.load()) Fail(ECANCELED, "snapshot", "cancelled");
      if (failed.load()) break;
      if (!Drain()) break;
      if (backgroundDone.load()) {
        // Every page is copied and unprotected; faults raised before that were woken by it.
        if (!Drain()) break;
        break;
      }
      struct pollfd p = {uffd, POLLIN, 0};
      poll(&p, 1, 5);
    }
    background.join();
    lingering = true;  // from here on: no copies, no new errors; faults are only woken
    if (failed.load()) ReleaseAll();
    endNs = NowNs();
    finished.store(true);
  }

  // After a failure or cancel: unprotect whatever is still protected so that every writer goes
  // on. Pieces may be unmapped (ENOENT: skip them), and a pending event makes the ioctl EAGAIN
  // until it is read.
  void ReleaseAll() {
    auto unprotect = [this](uint64_t from, uint64_t len) {
      struct uffdio_writeprotect wp = {};
      wp.range.start = from;
      wp.range.len = len;
      for (int attempt = 0; attempt < 100; attempt++) {
        if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0) return true;
        if (errno != EAGAIN && errno != EINTR) return false;
        Drain();
      }
      return false;
    };
    if (unprotect(start, length)) return;
    for (uint64_t i = 0; i < pages; i++)
      if (state[i].load() != kDone) unprotect(start + i * pageSize, pageSize);
  }

  // After finishing, until the JS thread joins (and then closes the uffd at once): keep reading,
  // so that an munmap/madvise elsewhere never waits on an event nobody reads.
  void Linger() {
    while (!stop.load()) {
      struct pollfd p = {uffd, POLLIN, 0};
      poll(&p, 1, 20);
      Drain();
    }
  }
};

Napi::Object Stats(Napi::Env env, Engine* e) {
  Napi::Object o = Napi::Object::New(env);
  auto num = [&](const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
  num("totalBytes", static_cast<double>(e->length));
  num("bytesCopied", static_cast<double>(e->bytesCopied.load()));
  num("pagesCopied", static_cast<double>(e->faultCopies.load() + e->backgroundCopies.load()));
  num("totalPages", static_cast<double>(e->pages));
  num("faultCopies", static_cast<double>(e->faultCopies.load()));
  num("backgroundCopies", static_cast<double>(e->backgroundCopies.load()));
  num("faults", static_cast<double>(e->faults.load()));
  num("wakes", static_cast<double>(e->wakes.load()));
  num("protectMs", static_cast<double>(e->protectNs) / 1e6);
  uint64_t end = e->finished.load() ? e->endNs : NowNs();
  num("elapsedMs", static_cast<double>(end - e->instantNs) / 1e6);
  o.Set("done", Napi::Boolean::New(env, e->finished.load()));
  o.Set("populated", Napi::Boolean::New(env, e->populated));
  const char* used = e->usedMethod.load();
  o.Set("copyMethod", Napi::String::New(env, used != nullptr ? used : MethodName(e->method)));
  return o;
}

void Join(Engine* e) {
  if (e->thread.joinable()) e->thread.join();
}

void Settle(Napi::Env env, Engine* e) {
  if (e->settled) return;
  e->settled = true;
  e->sinkRef.Reset();
  if (e->err == 0) {
    e->deferred.Resolve(Stats(env, e));
  } else {
    Napi::Error error = MakeUffdError(env, e->err, e->errSyscall, -1, e->errDetail);
    error.Value().As<Napi::Object>().Set("stats", Stats(env, e));
    e->deferred.Reject(error.Value());
  }
}

void OnEnvTeardown(void* arg);

// On the JS thread, once the engine thread is done (or told to stop): join it, settle the
// promise, drop the teardown hook. The caller holds a reference to the engine.
void Finish(Napi::Env env, Engine* e) {
  e->stop.store(true);
  Join(e);
  Settle(env, e);
  if (e->hookArg != nullptr) {
    auto* arg = e->hookArg;
    e->hookArg = nullptr;
    napi_remove_env_cleanup_hook(env, OnEnvTeardown, arg);
    delete arg;
  }
}

// Environment teardown (worker exit, process exit) while the thread runs: stop and join it.
void OnEnvTeardown(void* arg) {
  auto* kept = static_cast<std::shared_ptr<Engine>*>(arg);
  Engine* e = kept->get();
  e->hookArg = nullptr;
  e->cancel.store(true);
  e->stop.store(true);
  Join(e);
  delete kept;
}

class SnapshotEngine : public Napi::ObjectWrap<SnapshotEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SnapshotEngine",
                       {
                           InstanceMethod<&SnapshotEngine::Progress>("progress"),
                           InstanceMethod<&SnapshotEngine::Cancel>("cancel"),
                           InstanceMethod<&SnapshotEngine::JoinSync>("join"),
                       });
  }

  SnapshotEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SnapshotEngine>(info) {
    Napi::Env env = info.Env();
    auto e = std::make_shared<Engine>(env);
    e->uffd = ArgFd(info, 0);
    e->start = ArgU64(info, 1, "start");
    e->length = ArgU64(info, 2, "length");
    e->pageSize = ArgU64(info, 3, "pageSize");
    if (e->pageSize < 4096 || (e->pageSize & (e->pageSize - 1)) != 0)
      ThrowRangeError(env, "pageSize must be a power of two >= 4096");
    if (e->length == 0 || e->length % e->pageSize != 0 || e->start % e->pageSize != 0)
      ThrowRangeError(env, "the range must be non-empty and aligned to the page size");
    e->pages = e->length / e->pageSize;
    if (!info[4].IsObject()) ThrowTypeError(env, "sink must be an object");
    Napi::Object sink = info[4].As<Napi::Object>();
    Napi::Object opts = info[5].IsObject() ? info[5].As<Napi::Object>() : Napi::Object::New(env);

    std::string method =
        opts.Get("copyMethod").IsString() ? opts.Get("copyMethod").As<Napi::String>().Utf8Value() : "auto";
    BytesArg bytes;
    if (sink.Has("buffer") && TryBytes(sink.Get("buffer"), &bytes)) {
      if (bytes.length < e->length) ThrowRangeError(env, "the sink buffer is smaller than the range");
      e->buffer = bytes.data;
      e->sinkRef = Napi::Persistent(sink.Get("buffer"));
      e->method = method == "pipe" ? Method::Pipe : Method::ProcessVmReadv;
      e->methodFixed = method != "auto";
    } else if (sink.Get("fd").IsNumber()) {
      e->sinkFd = sink.Get("fd").As<Napi::Number>().Int32Value();
      if (e->sinkFd < 0) ThrowRangeError(env, "sink fd must be non-negative");
      double offset = sink.Get("offset").IsNumber() ? sink.Get("offset").As<Napi::Number>().DoubleValue() : 0;
      if (!(offset >= 0)) ThrowRangeError(env, "sink offset must be non-negative");
      e->sinkOffset = static_cast<uint64_t>(offset);
      e->method = Method::Pwrite;
    } else {
      ThrowTypeError(env, "sink must be { fd, offset } or { buffer }");
    }
    if (opts.Get("chunkSize").IsNumber()) {
      double c = opts.Get("chunkSize").As<Napi::Number>().DoubleValue();
      if (!(c >= 1)) ThrowRangeError(env, "chunkSize must be >= 1");
      e->chunkSize = static_cast<uint64_t>(c);
    }
    e->backgroundIdle = opts.Get("backgroundPriority").IsString() &&
                        opts.Get("backgroundPriority").As<Napi::String>().Utf8Value() == "idle";
    if (opts.Get("faultAround").IsNumber()) {
      double f = opts.Get("faultAround").As<Napi::Number>().DoubleValue();
      if (!(f >= 0)) ThrowRangeError(env, "faultAround must be >= 0");
      e->faultAround = static_cast<uint64_t>(f);
    }
    if (opts.Get("maxBytesPerSecond").IsNumber())
      e->maxBytesPerSecond = opts.Get("maxBytesPerSecond").As<Napi::Number>().DoubleValue();
    e->state.reset(new std::atomic<uint8_t>[e->pages]);
    for (uint64_t i = 0; i < e->pages; i++) e->state[i].store(kFree, std::memory_order_relaxed);
    e->faultCopier.method = e->backgroundCopier.method = e->method;
    e->faultCopier.fixed = e->backgroundCopier.fixed = e->methodFixed;

    if (opts.Get("populate").ToBoolean()) {
      // Without WP_UNPOPULATED, WRITEPROTECT skips empty page-table entries: fill them first.
      if (madvise(reinterpret_cast<void*>(e->start), e->length, MADV_POPULATE_WRITE) != 0)
        ThrowUffdError(env, errno, "madvise(MADV_POPULATE_WRITE)", -1,
                       "populating the range before protecting it");
      e->populated = true;
    }
    // The snapshot instant: every page write-protected, nothing unprotected until this returns.
    struct uffdio_writeprotect wp = {};
    wp.range.start = e->start;
    wp.range.len = e->length;
    wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    uint64_t t0 = NowNs();
    int rc;
    do {
      rc = ioctl(e->uffd, UFFDIO_WRITEPROTECT, &wp);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0)
      ThrowUffdError(env, errno, "ioctl(UFFDIO_WRITEPROTECT)", -1, "write-protecting the snapshot range");
    e->instantNs = NowNs();
    e->protectNs = e->instantNs - t0;

    info.This().As<Napi::Object>().Set("done", e->deferred.Promise());
    auto* kept = new std::shared_ptr<Engine>(e);
    e->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "userfaultfd.snapshot", 0, 1, kept,
                                            [](Napi::Env, std::shared_ptr<Engine>* k) { delete k; });
    e->hookArg = new std::shared_ptr<Engine>(e);
    napi_add_env_cleanup_hook(env, OnEnvTeardown, e->hookArg);
    engine_ = e;
    Engine* raw = e.get();
    e->thread = std::thread([raw]() {
      raw->Run();
      raw->tsfn.BlockingCall(raw, [](Napi::Env env, Napi::Function, Engine* done) {
        if (env != nullptr) Finish(env, done);
      });
      raw->tsfn.Release();
      raw->Linger();
    });
  }

 private:
  Napi::Value Progress(const Napi::CallbackInfo& info) { return Stats(info.Env(), engine_.get()); }

  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    engine_->cancel.store(true);
    return info.Env().Undefined();
  }

  // Cancels (unless already finished), joins the thread and settles the promise now.
  Napi::Value JoinSync(const Napi::CallbackInfo& info) {
    if (!engine_->finished.load()) engine_->cancel.store(true);
    Finish(info.Env(), engine_.get());
    return info.Env().Undefined();
  }

  std::shared_ptr<Engine> engine_;
};

}  // namespace

void InitLiveSnapshot(Napi::Env env, Napi::Object exports) {
  exports.Set("SnapshotEngine", SnapshotEngine::Define(env));
}
