// One watchdog thread per environment, running only while some uffd is watched. Every tick it
// reads /proc/self/task/<js tid>/wchan: "handle_userfault" means the JS thread sleeps in a
// userfault. If at the same time a uffd that this very thread reads has unread messages (poll
// says readable) for longer than its timeout, nobody will ever resolve the fault: report and
// abort. (Reading the messages to check the fault's tid would steal them from the JS reader.)
#include "watchdog.h"

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "addon_data.h"

struct Watchdog {
  std::mutex mu;
  std::condition_variable cv;
  std::map<int, int> timeouts;  // fd -> timeout ms
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

[[noreturn]] void Report(pid_t tid, int fd, long ms, const std::string& advice) {
  char msg[1024];
  int n = !advice.empty() ? snprintf(msg, sizeof(msg),
      "\nuserfaultfd: DEADLOCK: the JavaScript thread (tid %d) has been blocked in a page fault "
      "for %ld ms (fd %d). %s Aborting instead of hanging forever.\n",
      static_cast<int>(tid), ms, fd, advice.c_str()) : snprintf(msg, sizeof(msg),
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
        if (ms >= timeout) Report(dog->jsTid, fd, ms, dog->advice[fd]);
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
