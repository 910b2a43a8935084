// Passing file descriptors over Unix sockets (SCM_RIGHTS), the peer's credentials
// (SO_PEERCRED), pidfds to learn when a peer exits, and raw socketpairs. Each function makes one
// syscall on a non-blocking socket; waiting for readiness is fd_watcher.cc's job, policy (how
// many fds are expected, what a valid message is) lives in TypeScript.
//
// Received fds are never left for JS to forget: with MSG_CTRUNC (the control buffer was too
// small, so the kernel dropped some fds) or more fds than asked for, every fd that did arrive is
// closed here and only the fact is reported.
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <vector>

#include "binding/args.h"
#include "binding/uffd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace {

// Kernel limit on fds in one SCM_RIGHTS message (SCM_MAX_FD).
constexpr int kMaxFds = 253;

std::vector<int> FdList(Napi::Env env, Napi::Value v) {
  std::vector<int> fds;
  if (v.IsUndefined() || v.IsNull()) return fds;
  if (!v.IsArray()) ThrowTypeError(env, "fds must be an array of fd numbers");
  Napi::Array arr = v.As<Napi::Array>();
  if (arr.Length() > static_cast<uint32_t>(kMaxFds)) ThrowRangeError(env, "at most 253 fds per message");
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value item = arr.Get(i);
    if (!item.IsNumber()) ThrowTypeError(env, "fds must be an array of fd numbers");
    double d = item.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 2147483647.0 || d != static_cast<double>(static_cast<int>(d)))
      ThrowRangeError(env, "fds must be non-negative integers");
    fds.push_back(static_cast<int>(d));
  }
  return fds;
}

// socketpair(domain AF_UNIX, type) -> [fd, fd], both O_NONBLOCK and close-on-exec.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string kind = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "stream";
  int type;
  if (kind == "stream")
    type = SOCK_STREAM;
  else if (kind == "seqpacket")
    type = SOCK_SEQPACKET;
  else if (kind == "dgram")
    type = SOCK_DGRAM;
  else
    ThrowTypeError(env, "type must be 'stream', 'seqpacket' or 'dgram'");
  int sv[2];
  if (socketpair(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
    ThrowUffdError(env, errno, "socketpair");
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, sv[0]));
  out.Set(1u, Napi::Number::New(env, sv[1]));
  return out;
}

// sendFds(sock, bytes, fds?) -> bytes sent, or -1 when the socket would block. On a stream
// socket a short send is possible: the fds travel with the first byte, the caller sends the
// rest without them. MSG_NOSIGNAL: a closed peer is EPIPE, not a process-killing SIGPIPE.
Napi::Value SendFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = ArgFd(info, 0);
  BytesArg bytes;
  if (!TryBytes(info[1], &bytes)) ThrowTypeError(env, "payload must be an ArrayBuffer or a view");
  std::vector<int> fds = FdList(env, info[2]);
  // A zero-byte stream message carries no fds (the kernel needs at least one byte).
  if (bytes.length == 0 && !fds.empty()) ThrowRangeError(env, "fds need a payload of at least one byte");

  struct iovec iov = {bytes.data, bytes.length};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    struct cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n;
  do {
    n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Napi::Number::New(env, -1);
  if (n < 0) ThrowUffdError(env, errno, "sendmsg");
  return Napi::Number::New(env, static_cast<double>(n));
}

void CloseAll(const std::vector<int>& fds) {
  for (int fd : fds) close(fd);
}

// recvFds(sock, view, maxFds) -> null when nothing is pending, else
// { bytes, fds, truncated, extraFds, dropped }: bytes 0 is end of stream. truncated: MSG_CTRUNC
// (the sender attached more fds than fit); extraFds: more than maxFds fit anyway (CMSG_SPACE
// rounds up); in both cases every fd that arrived was closed (`dropped` counts them) and `fds`
// is empty. MSG_CMSG_CLOEXEC: the fds never exist without close-on-exec.
Napi::Value RecvFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = ArgFd(info, 0);
  BytesArg view;
  if (!TryBytes(info[1], &view) || view.length == 0)
    ThrowTypeError(env, "buffer must be a non-empty ArrayBuffer or view");
  int maxFds = ArgI32(info, 2, "maxFds");
  if (maxFds < 0 || maxFds > kMaxFds) ThrowRangeError(env, "maxFds must be 0..253");

  struct iovec iov = {view.data, view.length};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // Room for at least one fd so that an unexpected fd is seen (and closed), not silently
  // dropped by the kernel with only MSG_CTRUNC to say so.
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (maxFds > 0 ? maxFds : 1)), 0);
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return env.Null();
  if (n < 0) ThrowUffdError(env, errno, "recvmsg");

  std::vector<int> fds;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.push_back(fd);
    }
  }
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  bool extra = static_cast<int>(fds.size()) > maxFds;
  size_t dropped = 0;
  if (truncated || extra) {
    CloseAll(fds);
    dropped = fds.size();
    fds.clear();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(n)));
  Napi::Array list = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) list.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  out.Set("fds", list);
  out.Set("truncated", Napi::Boolean::New(env, truncated));
  out.Set("extraFds", Napi::Boolean::New(env, extra));
  out.Set("dropped", Napi::Number::New(env, static_cast<double>(dropped)));
  out.Set("payloadTruncated", Napi::Boolean::New(env, (msg.msg_flags & MSG_TRUNC) != 0));
  return out;
}

// peerCred(sock) -> { pid, uid, gid } of the process that connected (or created the pair),
// as recorded by the kernel at connect() time: the peer cannot forge it.
Napi::Value PeerCred(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = ArgFd(info, 0);
  struct ucred cred = {};
  socklen_t len = sizeof(cred);
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    ThrowUffdError(env, errno, "getsockopt(SO_PEERCRED)");
  Napi::Object out = Napi::Object::New(env);
  out.Set("pid", Napi::Number::New(env, cred.pid));
  out.Set("uid", Napi::Number::New(env, cred.uid));
  out.Set("gid", Napi::Number::New(env, cred.gid));
  return out;
}

// pidfdOpen(pid) -> a pidfd (close-on-exec by default) that becomes readable when the process
// exits: how a handler learns that the VM whose uffd it serves is gone.
Napi::Value PidfdOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int pid = ArgI32(info, 0, "pid");
  if (pid <= 0) ThrowRangeError(env, "pid must be a positive integer");
  int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) ThrowUffdError(env, errno, "pidfd_open");
  return Napi::Number::New(env, fd);
}

// fdFlags(fd) -> { cloexec, nonblock } (F_GETFD/F_GETFL), for callers that adopt fds.
Napi::Value FdFlags(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgFd(info, 0);
  int fdfl = fcntl(fd, F_GETFD);
  if (fdfl < 0) ThrowUffdError(env, errno, "fcntl(F_GETFD)");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) ThrowUffdError(env, errno, "fcntl(F_GETFL)");
  Napi::Object out = Napi::Object::New(env);
  out.Set("cloexec", Napi::Boolean::New(env, (fdfl & FD_CLOEXEC) != 0));
  out.Set("nonblock", Napi::Boolean::New(env, (fl & O_NONBLOCK) != 0));
  return out;
}

}  // namespace

void InitFdPassing(Napi::Env env, Napi::Object exports) {
  exports.Set("socketpair", Napi::Function::New(env, SocketPair, "socketpair"));
  exports.Set("sendFds", Napi::Function::New(env, SendFds, "sendFds"));
  exports.Set("recvFds", Napi::Function::New(env, RecvFds, "recvFds"));
  exports.Set("peerCred", Napi::Function::New(env, PeerCred, "peerCred"));
  exports.Set("pidfdOpen", Napi::Function::New(env, PidfdOpen, "pidfdOpen"));
  exports.Set("fdFlags", Napi::Function::New(env, FdFlags, "fdFlags"));
}
