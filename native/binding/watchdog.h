// The deadlock watchdog (native/engine/watchdog.h) of each environment: one per env, for its JS
// thread, started on first use and joined at environment teardown.
#pragma once
#include <napi.h>

#include <string>

// Watch `fd` (read by a JS EventReader on this env's thread); fire after `timeoutMs`.
void WatchdogWatch(napi_env env, int fd, int timeoutMs);
// The same for an fd that is readable while work only the JS thread can do is pending (a
// FaultServer's { handler } requests); `advice` replaces the default advice in the report.
void WatchdogWatch(napi_env env, int fd, int timeoutMs, const std::string& advice);
void WatchdogForget(napi_env env, int fd);
