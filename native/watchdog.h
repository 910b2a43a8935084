// Deadlock watchdog: detects the JS thread blocked in a userfault on memory that only it could
// resolve (it reads the uffd's events), and aborts with an explanation instead of hanging.
#pragma once
#include <napi.h>

// Watch `fd` (read by a JS EventReader on this env's thread); fire after `timeoutMs`.
void WatchdogWatch(napi_env env, int fd, int timeoutMs);
void WatchdogForget(napi_env env, int fd);
