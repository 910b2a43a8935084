#include "engine/watchdog.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>

#include "engine/util.h"
#include "kernel/uapi.h"

namespace {

constexpr int kTickMs = 100;

bool InUserfault(pid_t tid) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", static_cast<int>(tid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[64] = {0};
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  return n > 0 && strncmp(buf, "handle_userfault", 16) == 0;
}

// From /proc/self/fdinfo/<fd>: unread page faults ("pending") and the fd's features ("API:
// <api>:<features>:<ioctls>"). False if the file could not be read.
bool ReadFdInfo(int fd, long* unread, uint64_t* features) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) return false;
  char buf[1024];
  ssize_t n = read(f, buf, sizeof(buf) - 1);
  close(f);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* pending = strstr(buf, "pending:");
  const char* api = strstr(buf, "API:");
  if (pending == nullptr || api == nullptr) return false;
  *unread = strtol(pending + 8, nullptr, 10);
  const char* colon = strchr(api, ':');
  colon = colon == nullptr ? nullptr : strchr(colon + 1, ':');
  if (colon == nullptr) return false;
  *features = strtoull(colon + 1, nullptr, 16);
  return true;
}

enum class Verdict { Deadlock, NotOurs, Unknown };

// Reads the unread page faults of `fd`: Deadlock if one of them is `tid`'s. The others are woken
// so that they fault again for the JS reader. Unknown without THREAD_ID (nothing read).
Verdict CheckFaults(int fd, pid_t tid) {
  long unread = 0;
  uint64_t features = 0;
  if (!ReadFdInfo(fd, &unread, &features) || (features & UFFD_FEATURE_THREAD_ID) == 0)
    return Verdict::Unknown;
  // Only events unread: the JS thread's fault (a page fault message) is not on this uffd.
  if (unread <= 0) return Verdict::NotOurs;
  bool ours = false;
  for (long i = 0; i < unread; i++) {
    struct uffd_msg msg;
    ssize_t got = read(fd, &msg, sizeof(msg));
    if (got != static_cast<ssize_t>(sizeof(msg))) break;  // EAGAIN: resolved meanwhile
    if (msg.event != UFFD_EVENT_PAGEFAULT) {
      // A fault went away between fdinfo and read (a signal), and an event came next: it is lost
      // to the JS reader. Rare; say so rather than hide it.
      const char warn[] = "userfaultfd: watchdog: read an event while checking for a deadlock; it is lost\n";
      ssize_t w = write(2, warn, sizeof(warn) - 1);
      (void)w;
      continue;
    }
    if (static_cast<pid_t>(msg.arg.pagefault.feat.ptid) == tid) ours = true;
    // The kernel matches waiters by the address in their message, whatever the page size.
    struct uffdio_range range = {AlignDown(msg.arg.pagefault.address, BasePageSize()), BasePageSize()};
    ioctl(fd, UFFDIO_WAKE, &range);
  }
  return ours ? Verdict::Deadlock : Verdict::NotOurs;
}

[[noreturn]] void Report(pid_t tid, int fd, long ms, const std::string& advice) {
  char msg[1024];
  int n =
      !advice.empty()
          ? snprintf(
                msg, sizeof(msg),
                "\nuserfaultfd: DEADLOCK: the JavaScript thread (tid %d) has been blocked in a page fault "
                "for %ld ms (fd %d). %s Aborting instead of hanging forever.\n",
                static_cast<int>(tid), ms, fd, advice.c_str())
          : snprintf(
                msg, sizeof(msg),
                "\nuserfaultfd: DEADLOCK: the JavaScript thread (tid %d) has been blocked in a page fault "
                "for %ld ms while uffd %d, whose events this same thread reads, holds unread messages. "
                "Only this thread could resolve the fault, so it never will.\n"
                "Never touch unresolved registered memory (mapping.buffer, mapping.read(), a view over it, "
                "or a syscall that reads into it) on the thread that reads uffd.events(): touch it from a "
                "worker, a child process or a native thread, or serve it with FaultServer, which needs no "
                "JS thread. Aborting instead of hanging forever.\n",
                static_cast<int>(tid), ms, fd);
  if (n > 0) {
    ssize_t w = write(2, msg, static_cast<size_t>(n) < sizeof(msg) ? n : sizeof(msg) - 1);
    (void)w;
  }
  abort();
}

}  // namespace

void Watchdog::Watch(int fd, int timeoutMs, const std::string& advice) {
  std::lock_guard<std::mutex> lock(mu_);
  timeouts_[fd] = timeoutMs;
  advice_[fd] = advice;
  if (!thread_.joinable() && !stop_) thread_ = std::thread([this] { Run(); });
}

void Watchdog::Forget(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  timeouts_.erase(fd);
  advice_.erase(fd);
}

void Watchdog::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::Run() {
  std::map<int, std::chrono::steady_clock::time_point> since;  // fd -> stuck since
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::milliseconds(kTickMs));
    if (stop_) break;
    if (timeouts_.empty() || !InUserfault(jsTid_)) {
      since.clear();
      continue;
    }
    auto now = std::chrono::steady_clock::now();
    for (auto& [fd, timeout] : timeouts_) {
      struct pollfd p = {fd, POLLIN, 0};
      if (poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
        auto it = since.emplace(fd, now).first;
        long ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second).count();
        if (ms < timeout) continue;
        const std::string& advice = advice_[fd];
        // A FaultServer's request fd (advice set) is readable only while work that just the JS
        // thread can do waits: no fault to inspect. A uffd: look at whose faults are unread.
        // Unknown: a uffd received from elsewhere without THREAD_ID, most likely serving another
        // process's memory (Firecracker's, a fork child's), which the JS thread cannot wait on.
        // Killing a healthy handler would be worse than missing that rare case: no verdict.
        if (advice.empty() && CheckFaults(fd, jsTid_) != Verdict::Deadlock) {
          since.erase(fd);  // the JS thread waits for someone else; look again later
          continue;
        }
        Report(jsTid_, fd, ms, advice);
      } else {
        since.erase(fd);
      }
    }
  }
}
