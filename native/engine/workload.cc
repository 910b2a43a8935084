#include "engine/workload.h"

#include <setjmp.h>
#include <signal.h>
#include <time.h>

#include <algorithm>
#include <chrono>

namespace {

thread_local sigjmp_buf* tJump = nullptr;
thread_local uint64_t tBusAddress = 0;
std::atomic<bool> gHandlerInstalled{false};
struct sigaction gPrevious;

void OnSigbus(int sig, siginfo_t* info, void* ctx) {
  if (tJump != nullptr) {
    tBusAddress = reinterpret_cast<uint64_t>(info->si_addr);
    siglongjmp(*tJump, 1);
  }
  // Not a workload thread: what the process would have done without us.
  sigaction(SIGBUS, &gPrevious, nullptr);
  raise(sig);
}

void InstallHandler() {
  if (gHandlerInstalled.exchange(true)) return;
  struct sigaction sa = {};
  sa.sa_sigaction = OnSigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &gPrevious);
}

inline uint64_t Next(uint64_t* s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

}  // namespace

struct Workload::State {
  uint64_t base = 0, pageSize = 4096, pages = 0;
  WorkloadOptions o;
  std::atomic<bool> stop{false};
  std::atomic<bool> paused{false};
  std::atomic<int> parked{0};
  std::atomic<int> running{0};
  std::atomic<uint64_t> writes{0}, reads{0}, sigbus{0}, sigbusAddress{0};
  std::unique_ptr<std::atomic<uint64_t>[]> stamps;
  LatencyHistogram faults;
};

namespace {

void Access(Workload::State* s, uint64_t page, bool write, uint64_t stamp) {
  uint64_t t0 = NowNs();
  volatile uint64_t* p =
      reinterpret_cast<volatile uint64_t*>(s->base + page * s->pageSize + (write ? s->o.writeOffset : 0));
  if (write) {
    *p = stamp;
    s->stamps[page].store(stamp, std::memory_order_relaxed);
  } else {
    (void)*p;
  }
  uint64_t dt = NowNs() - t0;
  if (dt > 2000) s->faults.Record(dt);
}

void Run(std::shared_ptr<Workload::State> s, int index, bool writer) {
  sigjmp_buf jump;
  tJump = &jump;
  if (sigsetjmp(jump, 1) != 0) {
    s->sigbus.fetch_add(1);
    uint64_t expected = 0;
    s->sigbusAddress.compare_exchange_strong(expected, tBusAddress);
    tJump = nullptr;
    s->running.fetch_sub(1);
    return;
  }
  uint64_t rng = s->o.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index) * 7919 + (writer ? 1 : 2);
  if (rng == 0) rng = 1;
  const uint64_t perSecond =
      writer && s->o.writeRate > 0 ? std::max<uint64_t>(1, s->o.writeRate / s->pageSize) : 0;
  const uint64_t interval = perSecond > 0 ? 1000000000ull * s->o.writers / perSecond : 0;
  uint64_t due = NowNs();
  uint64_t count = 0;
  while (!s->stop.load(std::memory_order_relaxed)) {
    if (writer && s->paused.load()) {
      s->parked.fetch_add(1);
      while (s->paused.load() && !s->stop.load()) std::this_thread::sleep_for(std::chrono::microseconds(200));
      s->parked.fetch_sub(1);
      due = NowNs();
      continue;
    }
    uint64_t page = Next(&rng) % s->pages;
    if (writer) {
      count++;
      Access(s.get(), page, true, (s->o.tag << 40) | (static_cast<uint64_t>(index) << 32) | count);
      s->writes.fetch_add(1, std::memory_order_relaxed);
      if (interval > 0) {
        due += interval;
        uint64_t now = NowNs();
        if (due > now + 200000)
          std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
        else if (now > due + 100000000ull)
          due = now;  // far behind (stalled in a fault): do not burst
      }
    } else {
      Access(s.get(), page, false, 0);
      s->reads.fetch_add(1, std::memory_order_relaxed);
    }
  }
  tJump = nullptr;
  s->running.fetch_sub(1);
}

}  // namespace

Workload::Workload(uint64_t base, uint64_t length, uint64_t pageSize, const WorkloadOptions& options)
    : state_(std::make_shared<State>()) {
  state_->base = base;
  state_->pageSize = pageSize;
  state_->pages = length / pageSize;
  state_->o = options;
  state_->o.tag &= 0xFFFFFF;
  state_->stamps.reset(new std::atomic<uint64_t>[state_->pages]);
  for (uint64_t i = 0; i < state_->pages; i++) state_->stamps[i].store(0);
  InstallHandler();
  for (int i = 0; i < options.writers + options.readers; i++) {
    state_->running.fetch_add(1);
    threads_.emplace_back(Run, state_, i, i < options.writers);
  }
}

Workload::~Workload() {
  Stop(1000);
}

bool Workload::Pause(int timeoutMs) {
  state_->paused.store(true);
  uint64_t deadline = NowNs() + static_cast<uint64_t>(timeoutMs) * 1000000ull;
  while (state_->parked.load() < state_->o.writers && NowNs() < deadline && state_->running.load() > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  return state_->parked.load() >= state_->o.writers;
}

void Workload::Resume() {
  state_->paused.store(false);
}

int Workload::Stop(int timeoutMs) {
  state_->stop.store(true);
  uint64_t deadline = NowNs() + static_cast<uint64_t>(timeoutMs) * 1000000ull;
  while (state_->running.load() > 0 && NowNs() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  int stuck = state_->running.load();
  for (auto& t : threads_) {
    if (stuck == 0)
      t.join();
    else
      t.detach();
  }
  threads_.clear();
  return stuck;
}

uint64_t Workload::writes() const {
  return state_->writes.load();
}
uint64_t Workload::reads() const {
  return state_->reads.load();
}
uint64_t Workload::sigbus() const {
  return state_->sigbus.load();
}
uint64_t Workload::sigbusAddress() const {
  return state_->sigbusAddress.load();
}
int Workload::running() const {
  return state_->running.load();
}
const LatencyHistogram& Workload::faults() const {
  return state_->faults;
}
uint64_t Workload::pages() const {
  return state_->pages;
}
uint64_t Workload::stamp(uint64_t page) const {
  return state_->stamps[page].load();
}
