// Argument decoding shared by the native entry points. The TypeScript layer validates and
// explains bad input first; these checks only guarantee that nothing reaching native code
// can crash the process.
#pragma once
#include <napi.h>
#include <stdint.h>

#include "binding/errors.h"

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

// An exact 32-bit integer: 1.5, NaN, Infinity and 2^31 are errors, not silently truncated.
inline int32_t ArgI32(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) ThrowTypeError(info.Env(), std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= -2147483648.0 && d <= 2147483647.0) || d != static_cast<double>(static_cast<int32_t>(d)))
    ThrowRangeError(info.Env(), std::string(name) + " must be a 32-bit integer");
  return static_cast<int32_t>(d);
}

inline int ArgFd(const Napi::CallbackInfo& info, size_t i) {
  int32_t fd = ArgI32(info, i, "fd");
  if (fd < 0) ThrowRangeError(info.Env(), "fd must be a non-negative integer");
  return fd;
}

inline Napi::BigInt U64(Napi::Env env, uint64_t v) {
  return Napi::BigInt::New(env, v);
}

// A view of caller memory: an ArrayBuffer or any ArrayBufferView (typed arrays of every kind,
// DataView, Buffer), also over a SharedArrayBuffer. The data pointers come from the C API:
// node-addon-api's view.ArrayBuffer().Data() throws for a SharedArrayBuffer-backed view. A bare
// SharedArrayBuffer has no Node-API accessor; the TypeScript layer wraps it in a Uint8Array.
// A detached or empty buffer yields { nullptr, 0 }: callers must not memcpy from it.
struct BytesArg {
  uint8_t* data = nullptr;
  size_t length = 0;
};

inline bool TryBytes(Napi::Value v, BytesArg* out) {
  napi_env env = v.Env();
  void* data = nullptr;
  if (v.IsArrayBuffer()) {
    size_t length = 0;
    if (napi_get_arraybuffer_info(env, v, &data, &length) != napi_ok) return false;
    out->data = static_cast<uint8_t*>(data);
    out->length = length;
    return true;
  }
  if (v.IsTypedArray()) {
    if (napi_get_typedarray_info(env, v, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok) return false;
    out->data = static_cast<uint8_t*>(data);
    out->length = v.As<Napi::TypedArray>().ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    size_t length = 0;
    if (napi_get_dataview_info(env, v, &length, &data, nullptr, nullptr) != napi_ok) return false;
    out->data = static_cast<uint8_t*>(data);
    out->length = length;
    return true;
  }
  return false;
}

// Option fields of an options object (already validated in TypeScript).
inline uint64_t OptU64(Napi::Object opts, const char* name, uint64_t fallback) {
  Napi::Value v = opts.Get(name);
  if (!v.IsNumber()) return fallback;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0) ThrowRangeError(opts.Env(), std::string(name) + " must be >= 0");
  return static_cast<uint64_t>(d);
}

inline int OptInt(Napi::Object opts, const char* name, int fallback, int min, int max) {
  Napi::Value v = opts.Get(name);
  if (!v.IsNumber()) return fallback;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= min && d <= max) || d != static_cast<double>(static_cast<int>(d)))
    ThrowRangeError(opts.Env(), std::string(name) + " must be an integer in " + std::to_string(min) + ".." +
                                    std::to_string(max));
  return static_cast<int>(d);
}

inline uint64_t U64Field(Napi::Object o, const char* name) {
  Napi::Value v = o.Get(name);
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (lossless) return out;
  } else if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= 9007199254740991.0 && d == static_cast<double>(static_cast<uint64_t>(d)))
      return static_cast<uint64_t>(d);
  }
  ThrowTypeError(o.Env(), std::string(name) + " must be a non-negative integer or bigint");
}
