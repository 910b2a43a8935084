// Small helpers every native file shares (engine, binding and testing alike; no N-API here): the
// monotonic clock, page-size arithmetic, and hex formatting for error details.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include <string>

// Nanoseconds on CLOCK_MONOTONIC.
inline uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// The base page size of this system: 4096 on x86_64; 4, 16 or 64 KiB on arm64. Every page size
// the engines take (a hugetlb mapping's 2 MiB, say) is a power-of-two multiple of it.
inline uint64_t BasePageSize() {
  static const uint64_t size = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return size;
}

inline bool IsPowerOfTwo(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

// `align` must be a power of two.
inline uint64_t AlignDown(uint64_t v, uint64_t align) {
  return v & ~(align - 1);
}
inline uint64_t AlignUp(uint64_t v, uint64_t align) {
  return (v + align - 1) & ~(align - 1);
}

inline std::string Hex(uint64_t v) {
  char buf[32];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
