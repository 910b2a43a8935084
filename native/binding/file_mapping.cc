// FileMapping: a read-only MAP_SHARED view of a file (a memory snapshot) whose address is used
// as the source of UFFDIO_COPY, so a fault costs one ioctl that copies straight from the page
// cache (no pread into a bounce buffer first). No ArrayBuffer is handed out: JS only ever sees
// the address, and a copy from an unmapped address is EFAULT, never a crash.
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "binding/args.h"
#include "binding/uffd.h"

namespace {

class FileMapping : public Napi::ObjectWrap<FileMapping> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FileMapping",
                       {
                           InstanceMethod<&FileMapping::Address>("address"),
                           InstanceMethod<&FileMapping::Length>("length"),
                           InstanceMethod<&FileMapping::Unmap>("unmap"),
                       });
  }

  // new FileMapping(fd, length): the fd may be closed afterwards (the mapping holds the file).
  FileMapping(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FileMapping>(info) {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    uint64_t length = ArgU64(info, 1, "length");
    if (length == 0) ThrowRangeError(env, "length must be > 0");
    void* addr = mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) ThrowUffdError(env, errno, "mmap");
    addr_ = static_cast<uint8_t*>(addr);
    length_ = length;
  }

  ~FileMapping() override { Release(); }

 private:
  void Release() {
    if (addr_ != nullptr) munmap(addr_, length_);
    addr_ = nullptr;
  }

  Napi::Value Address(const Napi::CallbackInfo& info) {
    return U64(info.Env(), reinterpret_cast<uint64_t>(addr_));
  }

  Napi::Value Length(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(length_));
  }

  // Idempotent.
  Napi::Value Unmap(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  uint8_t* addr_ = nullptr;
  uint64_t length_ = 0;
};

}  // namespace

void InitFileMapping(Napi::Env env, Napi::Object exports) {
  exports.Set("FileMapping", FileMapping::Define(env));
}
