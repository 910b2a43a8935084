// The test-only addon (userfaultfd_testing.node, never shipped): native threads that raise faults
// and memory events off the JS thread. Loaded by src/testing only.
#pragma once
#include <napi.h>

void InitToucher(Napi::Env env, Napi::Object exports);
void InitStamper(Napi::Env env, Napi::Object exports);
