// One watchdog thread per environment, running only while some uffd is watched. Every tick it
// reads /proc/self/task/<js tid>/wchan: "handle_userfault" means the JS thread sleeps in a
// userfault. If at the same time a uffd that this very thread reads has had unread messages
// (poll says readable) for longer than its timeout, the JS thread may be waiting for itself.
// To be sure, the watchdog reads the unread page faults itself (they come before events, and
// /proc/self/fdinfo says how many there are, so no event is taken) and looks at their thread
// ids (the library asks for UFFD_FEATURE_THREAD_ID): if one is the JS thread's, nobody will
// ever resolve it: report and abort. If none is, the JS thread is waiting on someone else's
// uffd (a worker's, say): the faults read are woken with UFFDIO_WAKE, fault again, and reach the
// JS reader as new messages. A uffd without THREAD_ID (received from elsewhere) cannot tell:
// it is left alone.
#include "binding/watchdog.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "binding/addon_data.h"
#include "kernel/uapi.h"

struct Watchdog {
  std::mutex mu;
  std::condition_variable cv;
  std::map<int, int> timeouts;        // fd -> timeout ms
  std::map<int, std::string> advice;  // fd -> what to do instead (default: the uffd advice)
  std::thread thread;
  bool stop = false;
  pid_t jsTid = 0;
  AddonData* data = nullptr;  // outlives our cleanup hook: napi frees it after every hook ran
};

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

// Reads the unread page faults of `fd`: Deadlock if one of them is `tid`'s. The others are
// woken so that they fault again for the JS reader. Unknown without THREAD_ID (nothing read).
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
      // A fault went away between fdinfo and read (a signal), and an event came next: it is
      // lost to the JS reader. Rare; say so rather than hide it.
      const char warn[] = "userfaultfd: watchdog: read an event while checking for a deadlock; it is lost\n";
      ssize_t w = write(2, warn, sizeof(warn) - 1);
      (void)w;
      continue;
    }
    if (static_cast<pid_t>(msg.arg.pagefault.feat.ptid) == tid) ours = true;
    struct uffdio_range range = {msg.arg.pagefault.address & ~static_cast<uint64_t>(getpagesize() - 1),
                                 static_cast<uint64_t>(getpagesize())};
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

void Run(Watchdog* dog) {
  std::map<int, std::chrono::steady_clock::time_point> since;  // fd -> stuck since
  std::unique_lock<std::mutex> lock(dog->mu);
  while (!dog->stop) {
    dog->cv.wait_for(lock, std::chrono::milliseconds(kTickMs));
    if (dog->stop) break;
    if (dog->timeouts.empty() || !InUserfault(dog->jsTid)) {
      since.clear();
      continue;
    }
    auto now = std::chrono::steady_clock::now();
    for (auto& [fd, timeout] : dog->timeouts) {
      struct pollfd p = {fd, POLLIN, 0};
      if (poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
        auto it = since.emplace(fd, now).first;
        long ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second).count();
        if (ms < timeout) continue;
        const std::string& advice = dog->advice[fd];
        // A FaultServer's notice fd (advice set) is readable only while work that just the JS
        // thread can do waits: no fault to inspect. A uffd: look at whose faults are unread.
        // Unknown: a uffd received from elsewhere without THREAD_ID, most likely serving another
        // process's memory (Firecracker's, a fork child's), which the JS thread cannot wait on.
        // Killing a healthy handler would be worse than missing that rare case: no verdict.
        if (advice.empty() && CheckFaults(fd, dog->jsTid) != Verdict::Deadlock) {
          since.erase(fd);  // the JS thread waits for someone else; look again later
          continue;
        }
        Report(dog->jsTid, fd, ms, advice);
      } else {
        since.erase(fd);
      }
    }
  }
}

void StopAndJoin(void* arg) {
  Watchdog* dog = static_cast<Watchdog*>(arg);
  {
    std::lock_guard<std::mutex> lock(dog->mu);
    dog->stop = true;
  }
  dog->cv.notify_all();
  if (dog->thread.joinable()) dog->thread.join();
  dog->data->watchdog = nullptr;
  delete dog;
}

}  // namespace

void WatchdogWatch(napi_env env, int fd, int timeoutMs) {
  AddonData* data = GetAddonData(Napi::Env(env));
  if (data->watchdog == nullptr) {
    Watchdog* dog = new Watchdog();
    dog->jsTid = static_cast<pid_t>(syscall(SYS_gettid));
    dog->data = data;
    dog->thread = std::thread(Run, dog);
    // Joined at environment teardown (main thread exit or worker termination).
    napi_add_env_cleanup_hook(env, StopAndJoin, dog);
    data->watchdog = dog;
  }
  std::lock_guard<std::mutex> lock(data->watchdog->mu);
  data->watchdog->timeouts[fd] = timeoutMs;
  data->watchdog->advice.erase(fd);
}

void WatchdogWatch(napi_env env, int fd, int timeoutMs, const std::string& advice) {
  WatchdogWatch(env, fd, timeoutMs);
  std::lock_guard<std::mutex> lock(GetAddonData(Napi::Env(env))->watchdog->mu);
  GetAddonData(Napi::Env(env))->watchdog->advice[fd] = advice;
}

void WatchdogForget(napi_env env, int fd) {
  AddonData* data = GetAddonData(Napi::Env(env));
  if (data == nullptr || data->watchdog == nullptr) return;
  std::lock_guard<std::mutex> lock(data->watchdog->mu);
  data->watchdog->timeouts.erase(fd);
  data->watchdog->advice.erase(fd);
}
