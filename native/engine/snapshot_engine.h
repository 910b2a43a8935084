// SnapshotEngine: copies a write-protected range to a sink (a file or memory) exactly as it was at
// the moment it was protected, while other threads keep writing to it. No N-API here: the JS face
// is native/binding/snapshot_engine.cc.
//
// Protect() (on the caller's thread) optionally populates the range, then write-protects all of it
// with one UFFDIO_WRITEPROTECT: that ioctl's return is the snapshot instant. Start() then runs two
// threads that share the work (the uffd, registered WP by the caller, is read by nobody else):
//   - the fault thread reads messages: a WP fault on a page nobody has claimed claims it (and the
//     free pages next to it in its fault-around window), copies them out, then unprotects them
//     (which wakes the writer); a fault on a page being or already copied needs nothing (the
//     unprotect wakes it); REMOVE/UNMAP/REMAP events over pages not yet copied fail the snapshot
//     (their old contents are about to vanish);
//   - the background thread claims, copies and unprotects the rest, a chunk at a time.
// Each page is claimed once (PageStates) and unprotected only by its claimer, after its copy.
// Nothing is unprotected before the whole range was protected, so every thread's writes are cut at
// one point: the snapshot never sees a write made after it began, and a writer never sees stale
// data (pages are only copied OUT; the memory itself is never rewritten).
//
// Source memory is never read with memcpy: it may be unmapped at any moment. Copies go through
// syscalls that fail with EFAULT instead of crashing: pwrite(2) straight from the source into a
// file sink; process_vm_readv(2) into a memory sink, or, where seccomp forbids that (Docker's
// default profile), write(2) into a pipe and read(2) back out.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "engine/page_states.h"

// How a sink is filled: pwrite for a file sink; process_vm_readv (else a pipe) for memory.
enum class CopyMethod { kPwrite, kProcessVmReadv, kPipe };
const char* CopyMethodName(CopyMethod m);

// A snapshot page's state in the claim table.
enum SnapshotPage : uint8_t {
  kFree = 0,     // not yet claimed
  kClaimed = 1,  // being copied by the thread that claimed it (it alone unprotects it)
  kDone = 2,     // copied and unprotected
};

struct SnapshotOptions {
  uint64_t chunkSize = 2 * 1024 * 1024;  // bytes per background step (at least one page)
  uint64_t faultAround = 64 * 1024;      // bytes claimed around a writer's fault (aligned window)
  double maxBytesPerSecond = 0;          // background copy rate limit (0: none)
  bool backgroundIdle = false;           // background thread under SCHED_IDLE
  bool populate = false;                 // MADV_POPULATE_WRITE before protecting
  CopyMethod method = CopyMethod::kPwrite;
  bool methodFixed = false;  // no fallback from process_vm_readv to the pipe (tests force one)
};

// Where pages go: a file at an offset, or memory (which must stay valid until Join()).
struct SnapshotSink {
  int fd = -1;
  uint64_t offset = 0;
  uint8_t* memory = nullptr;
};

struct SnapshotStats {
  uint64_t totalBytes, bytesCopied, totalPages, pagesCopied, faultCopies, backgroundCopies, faults, wakes;
  double protectMs, elapsedMs;
  bool done, populated;
  const char* copyMethod;
};

class SnapshotEngine {
 public:
  SnapshotEngine(int uffd, uint64_t start, uint64_t length, uint64_t pageSize, const SnapshotSink& sink,
                 const SnapshotOptions& options);
  ~SnapshotEngine();

  // Populates (if asked) and write-protects the range: the snapshot instant. 0 or an errno, with
  // *syscall and *detail set.
  int Protect(std::string* syscall, std::string* detail);
  // Starts the threads. When the snapshot is finished (or failed, or cancelled), `onFinished` runs
  // on the engine's thread; after it the thread keeps reading the uffd (events must not wait on
  // nobody) until Join().
  void Start(std::function<void()> onFinished);
  void Cancel() { cancel_.store(true); }
  // Stops and joins the thread (cancelling first if it has not finished). Idempotent.
  void Join();

  bool finished() const { return finished_.load(); }
  // The failure (0: none), valid once finished().
  int error(std::string* syscall, std::string* detail) const;
  SnapshotStats Stats() const;

 private:
  // How one thread copies pages out (each thread has its own: the pipe, and the fallback from
  // process_vm_readv once seccomp refused it).
  struct Copier {
    CopyMethod method = CopyMethod::kPwrite;
    bool fixed = false;  // no fallback
    int pipeR = -1;
    int pipeW = -1;
    size_t pipeCap = 0;
    ~Copier();
  };

  bool Fail(int error, const char* syscall, const std::string& detail = "");
  bool Stopping() const { return failed_.load() || cancel_.load(); }
  std::string Where(uint64_t index) const;
  bool OpenPipe(Copier* c);
  bool CopyViaPipe(Copier* c, uint64_t src, uint8_t* dst, size_t n, uint64_t index);
  bool CopyOut(Copier* c, uint64_t index, uint64_t count);
  bool Unprotect(uint64_t index, uint64_t count, bool reader);
  void Wake(uint64_t address, uint64_t len);
  bool OnFault(uint64_t address);
  bool OnChange(uint64_t from, uint64_t to, const char* what);
  bool Drain();
  int ThrottleMs() const;
  void Background();
  void Run();
  void ReleaseAll();
  void Linger();

  // Set up by the constructor and Protect(), then read-only.
  const int uffd_;
  const uint64_t start_;
  const uint64_t length_;
  const uint64_t pageSize_;
  const uint64_t pages_;
  const SnapshotSink sink_;
  const SnapshotOptions options_;
  bool populated_ = false;
  uint64_t protectNs_ = 0;  // duration of the write-protect ioctl
  uint64_t instantNs_ = 0;  // when it returned: the snapshot instant
  PageStates states_;

  // Fault thread only (it reads the uffd).
  Copier faultCopier_;
  int drainDepth_ = 0;
  bool lingering_ = false;  // finished: only wake faults and acknowledge events
  // Background thread only.
  Copier backgroundCopier_;
  uint64_t backgroundBytes_ = 0;

  // Shared.
  mutable std::mutex errMu_;
  int err_ = 0;
  std::string errSyscall_;
  std::string errDetail_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> backgroundDone_{false};
  uint64_t endNs_ = 0;
  std::atomic<const char*> usedMethod_{nullptr};
  std::atomic<bool> cancel_{false};
  std::atomic<bool> finished_{false};
  std::atomic<bool> stop_{false};  // leave Linger()
  std::atomic<uint64_t> bytesCopied_{0};
  std::atomic<uint64_t> faultCopies_{0};
  std::atomic<uint64_t> backgroundCopies_{0};
  std::atomic<uint64_t> faults_{0};
  std::atomic<uint64_t> wakes_{0};

  std::thread thread_;
  std::function<void()> onFinished_;
};
