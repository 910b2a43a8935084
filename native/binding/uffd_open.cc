// Creating a userfaultfd (syscall or /dev/userfaultfd), the UFFDIO_API handshake, and close.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "binding/addon_data.h"
#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/uapi.h"

static Napi::Value OpenSyscall(const Napi::CallbackInfo& info) {
  int flags = ArgI32(info, 0, "flags");
  int fd = static_cast<int>(syscall(__NR_userfaultfd, flags));
  if (fd < 0) ThrowUffdError(info.Env(), errno, "userfaultfd");
  GetAddonData(info.Env())->uffds.insert(fd);
  return Napi::Number::New(info.Env(), fd);
}

static Napi::Value OpenDevice(const Napi::CallbackInfo& info) {
  int flags = ArgI32(info, 0, "flags");
  std::string path = "/dev/userfaultfd";
  if (info.Length() > 1 && info[1].IsString()) path = info[1].As<Napi::String>().Utf8Value();
  int dev = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (dev < 0) ThrowUffdError(info.Env(), errno, "open", -1, path);
  int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
  int err = errno;
  close(dev);
  if (fd < 0) ThrowUffdError(info.Env(), err, "ioctl(USERFAULTFD_IOC_NEW)", -1, path);
  GetAddonData(info.Env())->uffds.insert(fd);
  return Napi::Number::New(info.Env(), fd);
}

// UFFDIO_API: may succeed once per fd. Returns [grantedFeatures, ioctls].
static Napi::Value Api(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = ArgU64(info, 1, "features");
  if (ioctl(fd, UFFDIO_API, &api) != 0) ThrowUffdError(info.Env(), errno, "ioctl(UFFDIO_API)");
  Napi::Array out = Napi::Array::New(info.Env(), 2);
  out.Set(0u, U64(info.Env(), api.features));
  out.Set(1u, U64(info.Env(), api.ioctls));
  return out;
}

static Napi::Value Close(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  GetAddonData(info.Env())->uffds.erase(fd);
  // Linux always releases the fd, even when close reports EINTR: never retry.
  if (close(fd) != 0 && errno != EINTR) ThrowUffdError(info.Env(), errno, "close");
  return info.Env().Undefined();
}

// An fd that came from elsewhere (a socket, a FORK event) must be O_NONBLOCK for the event
// reader (poll reports POLLERR otherwise) and close-on-exec (it stays tied to this mm).
static Napi::Value Adopt(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) ThrowUffdError(info.Env(), errno, "fcntl(F_SETFL)");
  int fdfl = fcntl(fd, F_GETFD);
  if (fdfl < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) != 0)
    ThrowUffdError(info.Env(), errno, "fcntl(F_SETFD)");
  GetAddonData(info.Env())->uffds.insert(fd);
  return info.Env().Undefined();
}

// Environment teardown (a worker terminated, or exiting without close()): no finalizer runs
// then, and a uffd left open would keep its ranges registered with nobody serving them, so
// threads faulting there would hang forever. Closing it wakes them (they retry as ordinary
// faults). Only fds that are still a userfaultfd are closed, in case the number was reused.
static void CloseLeftovers(void* arg) {
  AddonData* data = static_cast<AddonData*>(arg);
  for (int fd : data->uffds) {
    char path[64];
    char link[64] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n > 0 && strcmp(link, "anon_inode:[userfaultfd]") == 0) close(fd);
  }
  data->uffds.clear();
}

void InitOpen(Napi::Env env, Napi::Object exports) {
  napi_add_env_cleanup_hook(env, CloseLeftovers, GetAddonData(env));
  exports.Set("openSyscall", Napi::Function::New(env, OpenSyscall, "openSyscall"));
  exports.Set("openDevice", Napi::Function::New(env, OpenDevice, "openDevice"));
  exports.Set("api", Napi::Function::New(env, Api, "api"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("adopt", Napi::Function::New(env, Adopt, "adopt"));
}
