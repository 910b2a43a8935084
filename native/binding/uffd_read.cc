// Reading uffd_msg records: one read(2) drains as many 32-byte messages as fit.
#include <errno.h>
#include <unistd.h>

#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/uapi.h"

// readMessages(fd, buffer): returns the number of messages read, 0 when none are pending
// (EAGAIN on a non-blocking fd). The buffer must hold at least one message.
static Napi::Value ReadMessages(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  BytesArg bytes;
  if (!TryBytes(info[1], &bytes)) ThrowTypeError(info.Env(), "buffer must be an ArrayBuffer or a view");
  size_t want = bytes.length - bytes.length % sizeof(struct uffd_msg);
  if (want == 0) ThrowRangeError(info.Env(), "buffer must hold at least one 32-byte message");
  ssize_t n;
  do {
    n = read(fd, bytes.data, want);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return Napi::Number::New(info.Env(), 0);
    ThrowUffdError(info.Env(), errno, "read");
  }
  return Napi::Number::New(info.Env(), static_cast<double>(n / sizeof(struct uffd_msg)));
}

void InitRead(Napi::Env env, Napi::Object exports) {
  exports.Set("readMessages", Napi::Function::New(env, ReadMessages, "readMessages"));
}
