// Argument decoding shared by the native entry points. The TypeScript layer validates and
// explains bad input first; these checks only guarantee that nothing reaching native code
// can crash the process.
#pragma once
#include <napi.h>
#include <stdint.h>

#include "errors.h"

inline uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowRangeError(info.Env(), std::string(name) + " does not fit in 64 bits");
    return out;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d)))
      ThrowRangeError(info.Env(), std::string(name) + " must be a non-negative safe integer");
    return static_cast<uint64_t>(d);
  }
  ThrowTypeError(info.Env(), std::string(name) + " must be a bigint or a number");
}

inline int ArgFd(const Napi::CallbackInfo& info, size_t i) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) ThrowTypeError(info.Env(), "fd must be a number");
  int32_t fd = v.As<Napi::Number>().Int32Value();
  if (fd < 0) ThrowRangeError(info.Env(), "fd must be a non-negative integer");
  return fd;
}

inline int32_t ArgI32(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) ThrowTypeError(info.Env(), std::string(name) + " must be a number");
  return v.As<Napi::Number>().Int32Value();
}

inline Napi::BigInt U64(Napi::Env env, uint64_t v) { return Napi::BigInt::New(env, v); }

// A view of caller memory: ArrayBuffer or any ArrayBufferView.
struct BytesArg {
  uint8_t* data = nullptr;
  size_t length = 0;
};

inline bool TryBytes(Napi::Value v, BytesArg* out) {
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    out->data = static_cast<uint8_t*>(ab.Data());
    out->length = ab.ByteLength();
    return true;
  }
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    out->data = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    out->length = ta.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    auto dv = v.As<Napi::DataView>();
    out->data = static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset();
    out->length = dv.ByteLength();
    return true;
  }
  return false;
}
