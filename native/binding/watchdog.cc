#include "binding/watchdog.h"

#include <sys/syscall.h>
#include <unistd.h>

#include "binding/addon_data.h"
#include "engine/watchdog.h"

namespace {

// Environment teardown (main thread exit or worker termination): join the thread. The AddonData
// outlives every cleanup hook (napi frees it after they ran).
void StopAndJoin(void* arg) {
  AddonData* data = static_cast<AddonData*>(arg);
  delete data->watchdog;
  data->watchdog = nullptr;
}

Watchdog* Of(napi_env env) {
  AddonData* data = GetAddonData(Napi::Env(env));
  if (data->watchdog == nullptr) {
    data->watchdog = new Watchdog(static_cast<pid_t>(syscall(SYS_gettid)));
    napi_add_env_cleanup_hook(env, StopAndJoin, data);
  }
  return data->watchdog;
}

}  // namespace

void WatchdogWatch(napi_env env, int fd, int timeoutMs) {
  Of(env)->Watch(fd, timeoutMs, "");
}

void WatchdogWatch(napi_env env, int fd, int timeoutMs, const std::string& advice) {
  Of(env)->Watch(fd, timeoutMs, advice);
}

void WatchdogForget(napi_env env, int fd) {
  AddonData* data = GetAddonData(Napi::Env(env));
  if (data != nullptr && data->watchdog != nullptr) data->watchdog->Forget(fd);
}
