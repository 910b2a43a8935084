// Lock-free latency histogram (log-linear buckets: 8 per power of two, ~9% resolution) for the
// fault server's latencies. Written by one thread (or a few), read by any. The same buckets as
// the JS LatencyHistogram (src/util/histogram.ts), whose JSON form ForEachBucket feeds.
#pragma once
#include <stdint.h>

#include <atomic>

class LatencyHistogram {
 public:
  static constexpr int kSub = 8;
  static constexpr int kBuckets = 64 * kSub;

  void Record(uint64_t ns) {
    buckets_[Index(ns)].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(ns, std::memory_order_relaxed);
  }

  // Record() for a histogram that one thread alone writes (the fault engine's demand thread):
  // plain loads and stores, no locked read-modify-write. A fault records ten samples (five
  // stages, per range and in all), and thirty locked instructions were a measurable part of a
  // 4 KiB fault's few microseconds. Readers on other threads still see whole values.
  void RecordOwned(uint64_t ns) {
    auto& b = buckets_[Index(ns)];
    b.store(b.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    count_.store(count_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    sum_.store(sum_.load(std::memory_order_relaxed) + ns, std::memory_order_relaxed);
  }

  // Sum of the samples (ns), for Prometheus' _sum.
  uint64_t Sum() const { return sum_.load(std::memory_order_relaxed); }

  // Calls f(index, count) for every non-empty bucket, in order.
  template <typename F>
  void ForEachBucket(F f) const {
    for (int i = 0; i < kBuckets; i++) {
      uint64_t n = buckets_[i].load(std::memory_order_relaxed);
      if (n != 0) f(i, n);
    }
  }

  uint64_t Count() const { return count_.load(std::memory_order_relaxed); }

  // Upper bound (ns) of the bucket holding quantile q (0..1); 0 when empty.
  uint64_t Quantile(double q) const {
    uint64_t total = Count();
    if (total == 0) return 0;
    uint64_t want = static_cast<uint64_t>(q * static_cast<double>(total - 1)) + 1;
    uint64_t seen = 0;
    for (int i = 0; i < kBuckets; i++) {
      seen += buckets_[i].load(std::memory_order_relaxed);
      if (seen >= want) return UpperBound(i);
    }
    return UpperBound(kBuckets - 1);
  }

  void Reset() {
    for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
    count_.store(0, std::memory_order_relaxed);
    sum_.store(0, std::memory_order_relaxed);
  }

 private:
  static int Index(uint64_t ns) {
    if (ns < kSub) return static_cast<int>(ns);
    int log = 63 - __builtin_clzll(ns);  // >= 3
    int sub = static_cast<int>((ns >> (log - 3)) & (kSub - 1));
    int i = (log - 2) * kSub + sub;
    return i < kBuckets ? i : kBuckets - 1;
  }
  static uint64_t UpperBound(int i) {
    if (i < kSub) return static_cast<uint64_t>(i);
    int log = i / kSub + 2;
    uint64_t sub = static_cast<uint64_t>(i % kSub);
    return ((kSub + sub + 1) << (log - 3)) - 1;
  }

  std::atomic<uint64_t> buckets_[kBuckets] = {};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_{0};
};
