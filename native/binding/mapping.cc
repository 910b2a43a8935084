// Memory mappings for userfaultfd to manage: anonymous (private, or shared: shmem), memfd
// (MAP_SHARED), a mapping of an fd the caller has (a memfd received from another process),
// aliases (a second mapping of the same memory: of the fd, or by mremap for shared anonymous
// memory), and huge-page variants. The external ArrayBuffer over a mapping must never outlive it:
// unmap() detaches the buffer before munmap, and a refcount shared by the handle and its
// buffer munmaps exactly once when the last of them is collected.
//
// read()/write() copy with memcpy, except where protect() made part of the span inaccessible
// (a memcpy there is a SIGSEGV of the whole process): those copies go through the kernel, which
// reports EFAULT instead (process_vm_readv/writev on this process, or a pipe where seccomp
// forbids those, as in Docker's default profile without CAP_SYS_PTRACE).
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>

#include "binding/addon_data.h"
#include "binding/args.h"
#include "binding/uffd.h"

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

namespace {

// Shared by a MappingHandle and the external ArrayBuffer it hands out.
struct Region {
  std::mutex mu;
  std::atomic<int> refs{1};
  uint8_t* addr = nullptr;
  size_t length = 0;
  size_t guard = 0;  // PROT_NONE pages on each side (anonymous memory), unmapped with it
  bool unmapped = false;

  void UnmapOnce() {
    std::lock_guard<std::mutex> lock(mu);
    if (!unmapped) {
      // The range itself first, alone: an UNMAP event reports exactly it.
      munmap(addr, length);
      if (guard > 0) {
        munmap(addr - guard, guard);
        munmap(addr + length, guard);
      }
      unmapped = true;
    }
  }
  void Unref() {
    if (refs.fetch_sub(1) == 1) {
      UnmapOnce();
      delete this;
    }
  }
};

// How a checked copy moves bytes: process_vm_readv/writev, or a pipe.
enum class CopyMethod { Auto, Pipe };

struct CopyResult {
  size_t done = 0;
  int err = 0;  // 0, or the errno that stopped the copy
  const char* syscall = "";
};

// Copies n bytes from `src` to `dst` (one of them inside this mapping) through a pipe: write(2)
// reads its source and read(2) writes its destination with the kernel's checked user copies, so
// an inaccessible page stops the copy with EFAULT, never a signal. A pipe copy that fails inside
// a page reports none of that page, so each step ends at a page boundary of the mapping side
// (`mapped`): the count of bytes done is then exact. `toMapping`: dst is the mapping.
CopyResult PipeCopy(uint8_t* dst, const uint8_t* src, size_t n, bool toMapping) {
  CopyResult r;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return {0, errno, "pipe2"};
  uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t mapped = reinterpret_cast<uintptr_t>(toMapping ? dst : src);
  while (r.done < n) {
    size_t want = std::min(n - r.done, static_cast<size_t>(page - (mapped + r.done) % page));
    ssize_t w = write(fds[1], src + r.done, want);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      r.err = w < 0 ? errno : EIO;
      r.syscall = "write";
      break;
    }
    size_t got = 0;
    while (got < static_cast<size_t>(w)) {
      ssize_t rd = read(fds[0], dst + r.done + got, static_cast<size_t>(w) - got);
      if (rd < 0 && errno == EINTR) continue;
      if (rd <= 0) {
        r.err = rd < 0 ? errno : EIO;
        r.syscall = "read";
        break;
      }
      got += static_cast<size_t>(rd);
    }
    r.done += got;
    if (r.err != 0) break;
  }
  close(fds[0]);
  close(fds[1]);
  return r;
}

// process_vm_readv (toMapping false: mapping -> local) or process_vm_writev (local -> mapping)
// on this very process; falls back to the pipe where seccomp refuses them (EPERM/ENOSYS).
CopyResult CheckedCopy(uint8_t* local, uint8_t* remote, size_t n, bool toMapping, CopyMethod method) {
  if (method == CopyMethod::Pipe)
    return toMapping ? PipeCopy(remote, local, n, true) : PipeCopy(local, remote, n, false);
  CopyResult r;
  r.syscall = toMapping ? "process_vm_writev" : "process_vm_readv";
  pid_t self = getpid();
  while (r.done < n) {
    struct iovec l = {local + r.done, n - r.done};
    struct iovec rem = {remote + r.done, n - r.done};
    ssize_t got =
        toMapping ? process_vm_writev(self, &l, 1, &rem, 1, 0) : process_vm_readv(self, &l, 1, &rem, 1, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && (errno == EPERM || errno == ENOSYS) && r.done == 0)
      return CheckedCopy(local, remote, n, toMapping, CopyMethod::Pipe);
    if (got <= 0) {
      r.err = got < 0 ? errno : EFAULT;
      break;
    }
    r.done += static_cast<size_t>(got);
  }
  return r;
}

class MappingHandle : public Napi::ObjectWrap<MappingHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "MappingHandle",
                       {
                           InstanceMethod<&MappingHandle::Address>("address"),
                           InstanceMethod<&MappingHandle::Length>("length"),
                           InstanceMethod<&MappingHandle::Fd>("fd"),
                           InstanceMethod<&MappingHandle::Buffer>("buffer"),
                           InstanceMethod<&MappingHandle::Unmap>("unmap"),
                           InstanceMethod<&MappingHandle::Madvise>("madvise"),
                           InstanceMethod<&MappingHandle::Protect>("protect"),
                           InstanceMethod<&MappingHandle::Read>("read"),
                           InstanceMethod<&MappingHandle::Write>("write"),
                       });
  }

  // new MappingHandle(kind, length, { hugetlb, populate, name, private, shared, fd }, source?)
  // kind: 'anonymous' | 'memfd' | 'alias' | 'fd'
  MappingHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MappingHandle>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsString()) ThrowTypeError(env, "kind must be a string");
    std::string kind = info[0].As<Napi::String>().Utf8Value();
    uint64_t length = ArgU64(info, 1, "length");
    if (length == 0) ThrowRangeError(env, "length must be > 0");
    Napi::Object opts = info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
    bool hugetlb = opts.Get("hugetlb").ToBoolean();
    bool populate = opts.Get("populate").ToBoolean();
    bool priv = opts.Get("private").ToBoolean();
    bool shared = opts.Get("shared").ToBoolean();

    int prot = PROT_READ | PROT_WRITE;
    void* addr = MAP_FAILED;
    size_t guard = 0;
    if (kind == "alias" && info[3].IsObject()) {
      MappingHandle* src = Unwrap(info[3].As<Napi::Object>());
      if (src != nullptr && src->fd_ < 0 && src->shared_) {
        // Shared anonymous memory has no fd: mremap with old_size 0 maps the same pages again.
        src->CheckMapped(env);
        if (length != src->region_->length) ThrowRangeError(env, "an alias has its source's length");
        addr = mremap(src->region_->addr, 0, length, MREMAP_MAYMOVE);
        if (addr == MAP_FAILED) ThrowUffdError(env, errno, "mremap", -1, "alias of shared anonymous memory");
        shared_ = true;
        kind = "";  // done
      }
    }
    if (kind.empty()) {
      // mapped above
    } else if (kind == "anonymous" && !hugetlb && !shared) {
      // Between two PROT_NONE guard pages, so that it is never merged with a neighbouring
      // anonymous mapping: a transparent huge page faulted in that neighbour could otherwise
      // cover the start of this range (seen on Linux 6.1, whose large anonymous mappings are
      // not THP-aligned) and populate it with zeros before a uffd registers it. Pages already
      // present never raise MISSING faults: they would read as zeros instead of being served.
      // (Shared anonymous memory is shmem: it never merges with private anonymous mappings.)
      guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* reserve =
          mmap(nullptr, length + 2 * guard, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (reserve == MAP_FAILED) ThrowUffdError(env, errno, "mmap", -1, "anonymous");
      int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | (populate ? MAP_POPULATE : 0);
      addr = mmap(static_cast<uint8_t*>(reserve) + guard, length, prot, flags, -1, 0);
      if (addr == MAP_FAILED) {
        int err = errno;
        munmap(reserve, length + 2 * guard);
        ThrowUffdError(env, err, "mmap", -1, "anonymous");
      }
    } else if (kind == "anonymous") {
      int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS;
      shared_ = shared;
      if (hugetlb) flags |= MAP_HUGETLB;
      if (populate) flags |= MAP_POPULATE;
      addr = mmap(nullptr, length, prot, flags, -1, 0);
      if (addr == MAP_FAILED) ThrowUffdError(env, errno, "mmap", -1, "anonymous");
    } else if (kind == "memfd" || kind == "alias") {
      int fd;
      if (kind == "memfd") {
        std::string name = opts.Get("name").IsString() ? opts.Get("name").As<Napi::String>().Utf8Value()
                                                       : std::string("userfaultfd");
        fd = static_cast<int>(memfd_create(name.c_str(), MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB : 0)));
        if (fd < 0) ThrowUffdError(env, errno, "memfd_create");
        if (ftruncate(fd, static_cast<off_t>(length)) != 0) {
          int err = errno;
          close(fd);
          ThrowUffdError(env, err, "ftruncate");
        }
      } else {
        if (!info[3].IsObject()) ThrowTypeError(env, "alias needs a source mapping");
        MappingHandle* src = Unwrap(info[3].As<Napi::Object>());
        if (src == nullptr || src->fd_ < 0) ThrowTypeError(env, "alias needs a memfd mapping");
        fd = fcntl(src->fd_, F_DUPFD_CLOEXEC, 0);
        if (fd < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
      }
      int flags = priv ? MAP_PRIVATE : MAP_SHARED;
      shared_ = !priv;
      if (populate) flags |= MAP_POPULATE;
      addr = mmap(nullptr, length, prot, flags, fd, 0);
      if (addr == MAP_FAILED) {
        int err = errno;
        close(fd);
        ThrowUffdError(env, err, "mmap", -1, kind);
      }
      fd_ = fd;
    } else if (kind == "fd") {
      // The caller's fd (a memfd or hugetlbfs file received from another process, say): dup'ed.
      int given = static_cast<int>(opts.Get("fd").ToNumber().Int32Value());
      int fd = fcntl(given, F_DUPFD_CLOEXEC, 0);
      if (fd < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
      addr = mmap(nullptr, length, prot, (priv ? MAP_PRIVATE : MAP_SHARED) | (populate ? MAP_POPULATE : 0),
                  fd, 0);
      if (addr == MAP_FAILED) {
        int err = errno;
        close(fd);
        ThrowUffdError(env, err, "mmap", -1, "fd");
      }
      fd_ = fd;
      shared_ = !priv;
    } else {
      ThrowTypeError(env, "unknown mapping kind: " + kind);
    }
    region_ = new Region();
    region_->addr = static_cast<uint8_t*>(addr);
    region_->length = length;
    region_->guard = guard;
  }

  ~MappingHandle() override { Release(); }

 private:
  void Release() {
    if (fd_ >= 0) {
      close(fd_);
      fd_ = -1;
    }
    if (region_ != nullptr) {
      region_->Unref();
      region_ = nullptr;
    }
  }

  void CheckMapped(Napi::Env env) {
    if (region_ == nullptr) ThrowUffdError(env, EBADF, "mapping", -1, "the mapping was unmapped");
  }

  // Spans [start, end) whose protection (set through protect()) lacks read or write: a copy
  // touching one goes through the kernel. Only the JS thread uses these.
  void TrackProtection(uint64_t start, uint64_t end, int prot) {
    auto it = restricted_.lower_bound(start);
    if (it != restricted_.begin() && std::prev(it)->second.first > start) --it;
    while (it != restricted_.end() && it->first < end) {
      uint64_t s = it->first, e = it->second.first;
      int p = it->second.second;
      it = restricted_.erase(it);
      if (s < start) restricted_[s] = {start, p};
      if (e > end) restricted_[end] = {e, p};
    }
    if ((prot & (PROT_READ | PROT_WRITE)) != (PROT_READ | PROT_WRITE)) restricted_[start] = {end, prot};
  }

  // True if [offset, offset + length) meets a span lacking `need` (PROT_READ or PROT_WRITE).
  bool Restricted(uint64_t offset, uint64_t length, int need) const {
    if (restricted_.empty() || length == 0) return false;
    uint64_t end = offset + length;
    auto it = restricted_.upper_bound(offset);
    if (it != restricted_.begin()) --it;
    for (; it != restricted_.end() && it->first < end; ++it) {
      if (it->second.first > offset && !(it->second.second & need)) return true;
    }
    return false;
  }

  static CopyMethod MethodArg(const Napi::CallbackInfo& info) {
    return info[2].IsString() && info[2].As<Napi::String>().Utf8Value() == "pipe" ? CopyMethod::Pipe
                                                                                  : CopyMethod::Auto;
  }

  void CheckSpan(Napi::Env env, uint64_t offset, uint64_t length) {
    CheckMapped(env);
    if (offset > region_->length || length > region_->length - offset)
      ThrowRangeError(env, "offset + length exceeds the mapping");
  }

  Napi::Value Address(const Napi::CallbackInfo& info) {
    CheckMapped(info.Env());
    return U64(info.Env(), reinterpret_cast<uintptr_t>(region_->addr));
  }

  Napi::Value Length(const Napi::CallbackInfo& info) {
    CheckMapped(info.Env());
    return Napi::Number::New(info.Env(), static_cast<double>(region_->length));
  }

  Napi::Value Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

  static void BufferFinalizer(Napi::Env, void*, Region* region) { region->Unref(); }

  Napi::Value Buffer(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckMapped(env);
    if (!buffer_.IsEmpty()) {
      Napi::Value existing = buffer_.Value();
      if (!existing.IsEmpty() && existing.IsArrayBuffer()) return existing;
    }
    region_->refs.fetch_add(1);
    napi_value ab;
    napi_status status = napi_create_external_arraybuffer(
        env, region_->addr, region_->length,
        [](napi_env, void*, void* hint) { static_cast<Region*>(hint)->Unref(); }, region_, &ab);
    if (status != napi_ok) {
      region_->refs.fetch_sub(1);
      // e.g. napi_no_external_buffers_allowed under a V8 sandbox: read()/write() still work.
      ThrowUffdError(env, ENOTSUP, "napi_create_external_arraybuffer", -1,
                     "external buffers are not allowed in this runtime; use read()/write()");
    }
    buffer_ = Napi::Weak(Napi::Value(env, ab).As<Napi::ArrayBuffer>());
    return Napi::Value(env, ab);
  }

  // Detach first so no view can touch the pages after munmap, then unmap. Idempotent.
  Napi::Value Unmap(const Napi::CallbackInfo& info) {
    if (region_ == nullptr) return info.Env().Undefined();
    if (!buffer_.IsEmpty()) {
      Napi::Value existing = buffer_.Value();
      if (!existing.IsEmpty() && existing.IsArrayBuffer()) {
        Napi::ArrayBuffer ab = existing.As<Napi::ArrayBuffer>();
        if (!ab.IsDetached()) ab.Detach();
      }
      buffer_.Reset();
    }
    region_->UnmapOnce();
    Release();
    return info.Env().Undefined();
  }

  Napi::Value Madvise(const Napi::CallbackInfo& info) {
    uint64_t offset = ArgU64(info, 0, "offset");
    uint64_t length = ArgU64(info, 1, "length");
    int advice = ArgI32(info, 2, "advice");
    CheckSpan(info.Env(), offset, length);
    if (madvise(region_->addr + offset, length, advice) != 0) ThrowUffdError(info.Env(), errno, "madvise");
    return info.Env().Undefined();
  }

  Napi::Value Protect(const Napi::CallbackInfo& info) {
    uint64_t offset = ArgU64(info, 0, "offset");
    uint64_t length = ArgU64(info, 1, "length");
    int prot = ArgI32(info, 2, "prot");
    CheckSpan(info.Env(), offset, length);
    if (mprotect(region_->addr + offset, length, prot) != 0) ThrowUffdError(info.Env(), errno, "mprotect");
    // mprotect covers whole pages: round the end up as it does.
    uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    TrackProtection(offset, std::min<uint64_t>((offset + length + page - 1) / page * page, region_->length),
                    prot);
    return info.Env().Undefined();
  }

  // read(offset, target[, 'pipe']): copy mapping -> target view. Returns bytes copied; EFAULT
  // (with `bytes` done) where protect() made the memory unreadable. 'pipe' (tests) forces the
  // method used where seccomp forbids process_vm_readv.
  Napi::Value Read(const Napi::CallbackInfo& info) { return Copy(info, false, "target"); }

  // write(offset, source[, 'pipe']): copy source view -> mapping. Returns bytes copied; EFAULT
  // (with `bytes` done) where protect() made the memory unwritable.
  Napi::Value Write(const Napi::CallbackInfo& info) { return Copy(info, true, "source"); }

  Napi::Value Copy(const Napi::CallbackInfo& info, bool toMapping, const char* what) {
    Napi::Env env = info.Env();
    uint64_t offset = ArgU64(info, 0, "offset");
    BytesArg bytes;
    if (!TryBytes(info[1], &bytes))
      ThrowTypeError(env, std::string(what) + " must be an ArrayBuffer or a view");
    CheckSpan(env, offset, bytes.length);
    CopyMethod method = MethodArg(info);
    if (bytes.length == 0) return Napi::Number::New(env, 0);  // data may be null (detached)
    uint8_t* mapped = region_->addr + offset;
    if (method == CopyMethod::Auto && !Restricted(offset, bytes.length, toMapping ? PROT_WRITE : PROT_READ)) {
      if (toMapping)
        memcpy(mapped, bytes.data, bytes.length);
      else
        memcpy(bytes.data, mapped, bytes.length);
      return Napi::Number::New(env, static_cast<double>(bytes.length));
    }
    CopyResult r = CheckedCopy(bytes.data, mapped, bytes.length, toMapping, method);
    if (r.err != 0) {
      std::string detail =
          r.err == EFAULT ? std::string("mapping offset ") + std::to_string(offset + r.done) +
                                (toMapping ? " is not writable" : " is not readable") + " (see protect())"
                          : std::string("copying ") + (toMapping ? "into" : "out of") + " the mapping";
      ThrowUffdError(env, r.err, r.syscall, static_cast<int64_t>(r.done), detail);
    }
    return Napi::Number::New(env, static_cast<double>(r.done));
  }

  Region* region_ = nullptr;
  int fd_ = -1;
  bool shared_ = false;  // MAP_SHARED (of a file, or of shared anonymous memory)
  Napi::Reference<Napi::ArrayBuffer> buffer_;
  std::map<uint64_t, std::pair<uint64_t, int>> restricted_;  // start -> (end, prot)
};

}  // namespace

void InitMapping(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = MappingHandle::Define(env);
  GetAddonData(env)->mappingHandle = Napi::Persistent(ctor);
  exports.Set("MappingHandle", ctor);
}
