// Turning errno into UffdError (code from the errno name, errno, syscall, bytes, hint).
#pragma once
#include <napi.h>
#include <string>

// Builds a UffdError. bytes < 0 leaves `bytes` unset.
Napi::Error MakeUffdError(Napi::Env env, int err, const std::string& syscall, int64_t bytes = -1,
                          const std::string& detail = "");
[[noreturn]] void ThrowUffdError(Napi::Env env, int err, const std::string& syscall, int64_t bytes = -1,
                                 const std::string& detail = "");
[[noreturn]] void ThrowTypeError(Napi::Env env, const std::string& message);
[[noreturn]] void ThrowRangeError(Napi::Env env, const std::string& message);

void InitErrors(Napi::Env env, Napi::Object exports);
