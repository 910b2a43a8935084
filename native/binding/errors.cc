#include "binding/errors.h"

#include <uv.h>

#include "binding/addon_data.h"

Napi::Error MakeUffdError(Napi::Env env, int err, const std::string& syscall, int64_t bytes,
                          const std::string& detail) {
  // uv_err_name gives Node's own errno names ("EEXIST"), so codes match fs/net errors.
  std::string code = uv_err_name(-err);
  std::string message = code + ": " + uv_strerror(-err) + ", " + syscall;
  if (!detail.empty()) message += " (" + detail + ")";
  Napi::Object error;
  AddonData* data = GetAddonData(env);
  if (data != nullptr && !data->errorClass.IsEmpty()) {
    error = data->errorClass.New({Napi::String::New(env, message)});
  } else {
    error = Napi::Error::New(env, message).Value();
  }
  error.Set("code", code);
  error.Set("errno", Napi::Number::New(env, err));
  error.Set("syscall", syscall);
  if (bytes >= 0) error.Set("bytes", Napi::Number::New(env, static_cast<double>(bytes)));
  return Napi::Error(env, error);
}

void ThrowUffdError(Napi::Env env, int err, const std::string& syscall, int64_t bytes,
                    const std::string& detail) {
  throw MakeUffdError(env, err, syscall, bytes, detail);
}

void ThrowTypeError(Napi::Env env, const std::string& message) {
  throw Napi::TypeError::New(env, message);
}

void ThrowRangeError(Napi::Env env, const std::string& message) {
  throw Napi::RangeError::New(env, message);
}

static Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) ThrowTypeError(info.Env(), "setErrorClass expects a constructor");
  GetAddonData(info.Env())->errorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

void InitErrors(Napi::Env env, Napi::Object exports) {
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
}
