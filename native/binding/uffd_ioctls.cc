// One function per userfaultfd ioctl. Each makes exactly one ioctl; the fill ioctls
// (COPY, ZEROPAGE, CONTINUE, POISON, MOVE) report the kernel's SIGNED out field:
// > 0 bytes done, < 0 a negative errno, untouched (we preset 0) on early validation errors.
#include <errno.h>

#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/uapi.h"

namespace {

struct Range {
  uint64_t start;
  uint64_t len;
};

Range ArgRange(const Napi::CallbackInfo& info, size_t i) {
  return Range{ArgU64(info, i, "address"), ArgU64(info, i + 1, "length")};
}

// Runs a fill ioctl. Success returns the bytes done. Failure throws a UffdError: EAGAIN always
// carries `bytes` (> 0 partial progress, 0 when an event is pending: mmap_changing).
Napi::Value Fill(const Napi::CallbackInfo& info, int fd, unsigned long request, void* arg, __s64* out,
                 const char* syscall) {
  *out = 0;
  if (ioctl(fd, request, arg) == 0) return Napi::Number::New(info.Env(), static_cast<double>(*out));
  int err = errno;
  int64_t done = *out > 0 ? *out : 0;
  ThrowUffdError(info.Env(), err, syscall, (err == EAGAIN || done > 0) ? done : -1);
}

Napi::Value Register(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_register reg = {};
  reg.range.start = r.start;
  reg.range.len = r.len;
  reg.mode = ArgU64(info, 3, "mode");
  if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) ThrowUffdError(info.Env(), errno, "ioctl(UFFDIO_REGISTER)");
  return U64(info.Env(), reg.ioctls);
}

Napi::Value RangeOnly(const Napi::CallbackInfo& info, unsigned long request, const char* name) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_range range = {r.start, r.len};
  if (ioctl(fd, request, &range) != 0) ThrowUffdError(info.Env(), errno, name);
  return info.Env().Undefined();
}

Napi::Value Unregister(const Napi::CallbackInfo& info) {
  return RangeOnly(info, UFFDIO_UNREGISTER, "ioctl(UFFDIO_UNREGISTER)");
}

Napi::Value Wake(const Napi::CallbackInfo& info) {
  return RangeOnly(info, UFFDIO_WAKE, "ioctl(UFFDIO_WAKE)");
}

// copy(fd, dst, src, len, mode): src is a bigint address or caller bytes (ArrayBuffer/View).
Napi::Value Copy(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct uffdio_copy copy = {};
  copy.dst = ArgU64(info, 1, "dst");
  copy.len = ArgU64(info, 3, "length");
  BytesArg bytes;
  if (TryBytes(info[2], &bytes)) {
    if (bytes.length < copy.len) ThrowRangeError(info.Env(), "src is shorter than length");
    copy.src = reinterpret_cast<uintptr_t>(bytes.data);
  } else {
    copy.src = ArgU64(info, 2, "src");
  }
  copy.mode = ArgU64(info, 4, "mode");
  return Fill(info, fd, UFFDIO_COPY, &copy, &copy.copy, "ioctl(UFFDIO_COPY)");
}

Napi::Value Zeropage(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_zeropage zp = {};
  zp.range = {r.start, r.len};
  zp.mode = ArgU64(info, 3, "mode");
  return Fill(info, fd, UFFDIO_ZEROPAGE, &zp, &zp.zeropage, "ioctl(UFFDIO_ZEROPAGE)");
}

Napi::Value Continue(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_continue_abi c = {};
  c.range = {r.start, r.len};
  c.mode = ArgU64(info, 3, "mode");
  return Fill(info, fd, UFFDIO_CONTINUE_ABI, &c, &c.mapped, "ioctl(UFFDIO_CONTINUE)");
}

Napi::Value Poison(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_poison_abi p = {};
  p.range = {r.start, r.len};
  p.mode = ArgU64(info, 3, "mode");
  return Fill(info, fd, UFFDIO_POISON_ABI, &p, &p.updated, "ioctl(UFFDIO_POISON)");
}

Napi::Value Move(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct uffdio_move_abi m = {};
  m.dst = ArgU64(info, 1, "dst");
  m.src = ArgU64(info, 2, "src");
  m.len = ArgU64(info, 3, "length");
  m.mode = ArgU64(info, 4, "mode");
  return Fill(info, fd, UFFDIO_MOVE_ABI, &m, &m.move, "ioctl(UFFDIO_MOVE)");
}

Napi::Value WriteProtect(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  Range r = ArgRange(info, 1);
  struct uffdio_writeprotect wp = {};
  wp.range = {r.start, r.len};
  wp.mode = ArgU64(info, 3, "mode");
  if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0)
    ThrowUffdError(info.Env(), errno, "ioctl(UFFDIO_WRITEPROTECT)");
  return info.Env().Undefined();
}

}  // namespace

void InitIoctls(Napi::Env env, Napi::Object exports) {
  exports.Set("register", Napi::Function::New(env, Register, "register"));
  exports.Set("unregister", Napi::Function::New(env, Unregister, "unregister"));
  exports.Set("wake", Napi::Function::New(env, Wake, "wake"));
  exports.Set("copy", Napi::Function::New(env, Copy, "copy"));
  exports.Set("zeropage", Napi::Function::New(env, Zeropage, "zeropage"));
  exports.Set("continue", Napi::Function::New(env, Continue, "continue"));
  exports.Set("poison", Napi::Function::New(env, Poison, "poison"));
  exports.Set("move", Napi::Function::New(env, Move, "move"));
  exports.Set("writeProtect", Napi::Function::New(env, WriteProtect, "writeProtect"));
}
