// Per-page 64-bit hashes, to check a migration page by page (source at stop vs target). Not
// cryptographic: it detects stale or torn pages, not a forger (the channel's authentication is
// what keeps forgers out). Bytes [maskOffset, maskOffset + maskLength) of each page are left out,
// so that a workload may stamp them on one side only.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace migration {

inline uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v * 0x9E3779B97F4A7C15ull;
  h = (h << 27) | (h >> 37);
  return h * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
}

inline uint64_t PageHash(const uint8_t* page, uint64_t size, uint64_t maskOffset, uint64_t maskLength) {
  uint64_t h = size;
  uint64_t maskEnd = maskOffset + maskLength;
  for (uint64_t off = 0; off + 8 <= size; off += 8) {
    uint64_t w;
    memcpy(&w, page + off, 8);
    if (maskLength > 0 && off + 8 > maskOffset && off < maskEnd) {
      // Zero the masked bytes of this word.
      for (uint64_t b = 0; b < 8; b++)
        if (off + b >= maskOffset && off + b < maskEnd) w &= ~(0xFFull << (8 * b));
    }
    h = Mix(h, w);
  }
  h ^= h >> 31;
  return h;
}

inline bool PageIsZero(const uint8_t* page, uint64_t size) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(page);
  if (w[0] != 0 || w[size / 16] != 0) return false;  // random data leaves at once
  uint64_t acc = 0;
  for (uint64_t i = 0; i < size / 8; i++) acc |= w[i];
  return acc == 0;
}

}  // namespace migration
