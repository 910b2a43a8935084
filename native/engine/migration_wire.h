// The migration wire protocol's frames (docs/migration.md is the reference): a 16-byte
// little-endian header, then `length` payload bytes.
//   u8 type | u8 flags (0) | u16 range | u32 length | u64 page
// Everything a peer sends is untrusted: CheckFrame() is the one place that decides whether a
// header may be acted on (known type, sizes in bounds, pages inside a range), so that no frame,
// however hostile, can make the receiver write outside the ranges agreed in the handshake.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>
#include <vector>

namespace migration {

constexpr uint32_t kHeaderSize = 16;
constexpr uint32_t kMaxControl = 64 * 1024;       // JSON control payloads
constexpr uint32_t kMaxPagesPayload = 4u << 20;   // PAGES payload (a 2 MiB huge page fits)
constexpr uint32_t kMaxRunsPayload = 1u << 20;    // DISCARD payload (65536 runs)
constexpr uint32_t kMaxBitmapPayload = 1u << 20;  // one HAVE chunk (8 Mi pages)
constexpr uint32_t kMaxHashesPayload = 1u << 20;  // one HASHES chunk (128 Ki pages)

enum FrameType : uint8_t {
  kHello = 0x01,
  kChallenge = 0x02,
  kAuth = 0x03,
  kAuthOk = 0x04,
  kReject = 0x05,
  kSetup = 0x06,
  kAccept = 0x07,
  kPages = 0x10,
  kZero = 0x11,
  kRequest = 0x12,
  kDiscard = 0x13,
  kHave = 0x14,
  kHashes = 0x15,
  kControl = 0x20,
  kPing = 0x21,
  kPong = 0x22,
};

struct FrameHeader {
  uint8_t type = 0;
  uint8_t flags = 0;
  uint16_t range = 0;
  uint32_t length = 0;
  uint64_t page = 0;
};

inline void EncodeHeader(const FrameHeader& h, uint8_t out[kHeaderSize]) {
  out[0] = h.type;
  out[1] = h.flags;
  out[2] = static_cast<uint8_t>(h.range);
  out[3] = static_cast<uint8_t>(h.range >> 8);
  for (int i = 0; i < 4; i++) out[4 + i] = static_cast<uint8_t>(h.length >> (8 * i));
  for (int i = 0; i < 8; i++) out[8 + i] = static_cast<uint8_t>(h.page >> (8 * i));
}

inline FrameHeader DecodeHeader(const uint8_t in[kHeaderSize]) {
  FrameHeader h;
  h.type = in[0];
  h.flags = in[1];
  h.range = static_cast<uint16_t>(in[2] | (in[3] << 8));
  for (int i = 0; i < 4; i++) h.length |= static_cast<uint32_t>(in[4 + i]) << (8 * i);
  for (int i = 0; i < 8; i++) h.page |= static_cast<uint64_t>(in[8 + i]) << (8 * i);
  return h;
}

inline uint64_t LoadU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

inline void StoreU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// One agreed range as the receiver of page frames sees it.
struct RangeShape {
  uint64_t pages = 0;
  uint64_t pageSize = 4096;
};

// What a frame may carry, by direction and phase.
enum class Role { kSourceMain, kSourceDemand, kTargetMain, kTargetDemand };

// Checks a header received by `role` against the agreed ranges. Returns "" when the frame may be
// acted on, else why it is a protocol error. Page arithmetic is overflow-safe.
inline std::string CheckFrame(const FrameHeader& h, Role role, const std::vector<RangeShape>& ranges) {
  if (h.flags != 0) return "frame flags must be 0";
  auto pageSpan = [&](uint64_t count) -> std::string {
    if (h.range >= ranges.size()) return "range index " + std::to_string(h.range) + " out of range";
    const RangeShape& r = ranges[h.range];
    if (count == 0) return "empty page run";
    if (h.page >= r.pages || count > r.pages - h.page)
      return "pages [" + std::to_string(h.page) + ", +" + std::to_string(count) + ") outside range " +
             std::to_string(h.range) + " (" + std::to_string(r.pages) + " pages)";
    return "";
  };
  bool toTarget = role == Role::kTargetMain || role == Role::kTargetDemand;
  switch (h.type) {
    case kPages: {
      if (!toTarget) return "PAGES sent to the source";
      if (h.range >= ranges.size()) return "range index " + std::to_string(h.range) + " out of range";
      uint64_t ps = ranges[h.range].pageSize;
      uint64_t max = ps > kMaxPagesPayload ? ps : kMaxPagesPayload;
      if (h.length == 0 || h.length > max || h.length % ps != 0)
        return "PAGES payload of " + std::to_string(h.length) + " bytes is not a whole number of pages";
      return pageSpan(h.length / ps);
    }
    case kZero:
      if (role != Role::kTargetMain) return "ZERO outside the main channel";
      if (h.length != 8) return "ZERO payload must be 8 bytes";
      return "";  // the count, in the payload, is checked by CheckRun
    case kRequest:
      if (role != Role::kSourceDemand) return "REQUEST outside the source's demand channel";
      if (h.length != 8) return "REQUEST payload must be 8 bytes";
      return "";
    case kDiscard:
      if (role != Role::kTargetMain) return "DISCARD outside the target's main channel";
      if (h.length == 0 || h.length % 16 != 0 || h.length > kMaxRunsPayload)
        return "bad DISCARD payload size";
      return "";
    case kHave:
      if (role != Role::kSourceMain) return "HAVE outside the source's main channel";
      if (h.length == 0 || h.length > kMaxBitmapPayload) return "bad HAVE payload size";
      if (h.range >= ranges.size()) return "range index " + std::to_string(h.range) + " out of range";
      if (h.page % 8 != 0) return "HAVE chunk must start on a byte of the bitmap";
      return pageSpan(1);
    case kHashes:
      if (role != Role::kTargetMain) return "HASHES outside the target's main channel";
      if (h.length == 0 || h.length % 8 != 0 || h.length > kMaxHashesPayload)
        return "bad HASHES payload size";
      return pageSpan(h.length / 8);
    case kControl:
      if (h.length == 0 || h.length > kMaxControl) return "bad CONTROL payload size";
      return "";
    case kPing:
    case kPong:
      if (h.length != 8) return "PING/PONG payload must be 8 bytes";
      return "";
    default:
      return "unexpected frame type 0x" + std::string(1, "0123456789abcdef"[h.type >> 4]) +
             std::string(1, "0123456789abcdef"[h.type & 15]) + " after the handshake";
  }
}

// A page run named by a payload (ZERO, REQUEST: the header's range/page + a count; DISCARD: each
// 16-byte entry) checked against the ranges. Returns "" if valid.
inline std::string CheckRun(uint16_t range, uint64_t page, uint64_t count,
                            const std::vector<RangeShape>& ranges) {
  if (range >= ranges.size()) return "range index " + std::to_string(range) + " out of range";
  const RangeShape& r = ranges[range];
  if (count == 0) return "empty page run";
  if (page >= r.pages || count > r.pages - page)
    return "pages [" + std::to_string(page) + ", +" + std::to_string(count) + ") outside range " +
           std::to_string(range) + " (" + std::to_string(r.pages) + " pages)";
  return "";
}

}  // namespace migration
