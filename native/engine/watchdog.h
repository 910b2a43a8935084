// Deadlock watchdog: detects a JS thread blocked in a userfault on memory that only it could
// resolve (it reads the uffd's events, or runs the handlers a FaultServer waits for), and aborts
// with an explanation instead of hanging. No N-API here: native/binding/watchdog.cc keeps one per
// environment.
//
// A thread, running only while some fd is watched, looks every tick at
// /proc/self/task/<js tid>/wchan: "handle_userfault" means the JS thread sleeps in a userfault. If
// at the same time a watched fd has been readable for longer than its timeout, the JS thread may
// be waiting for itself:
//  - a uffd (no advice given): to be sure, the watchdog reads the unread page faults itself (they
//    come before events, and /proc/self/fdinfo says how many there are, so no event is taken) and
//    looks at their thread ids (the library asks for UFFD_FEATURE_THREAD_ID): if one is the JS
//    thread's, nobody will ever resolve it: report and abort. If none is, the JS thread is waiting
//    on someone else's uffd (a worker's, say): the faults read are woken with UFFDIO_WAKE, fault
//    again, and reach the JS reader as new messages. A uffd without THREAD_ID (received from
//    elsewhere) cannot tell: it is left alone;
//  - an fd with advice (a FaultServer's request fd, readable while work only the JS thread can do
//    waits): report and abort with that advice.
#pragma once
#include <sys/types.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

class Watchdog {
 public:
  // Watches on behalf of the thread `jsTid`.
  explicit Watchdog(pid_t jsTid) : jsTid_(jsTid) {}
  ~Watchdog() { Stop(); }

  // Fires after `timeoutMs`; `advice` (may be empty: the uffd advice) says what to do instead.
  // Starts the thread on first use.
  void Watch(int fd, int timeoutMs, const std::string& advice);
  void Forget(int fd);
  // Stops and joins the thread. Idempotent.
  void Stop();

 private:
  void Run();

  const pid_t jsTid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, int> timeouts_;        // fd -> timeout ms
  std::map<int, std::string> advice_;  // fd -> what to do instead (empty: the uffd advice)
  std::thread thread_;
  bool stop_ = false;
};
