// Per-environment state (main thread and each worker get their own), stored with
// SetInstanceData so that nothing lives in statics.
#pragma once
#include <napi.h>

#include <set>

class Watchdog;

struct AddonData {
  Watchdog* watchdog = nullptr;           // deadlock watchdog thread (watchdog.cc), lazily started
  Napi::FunctionReference errorClass;     // UffdError from the TypeScript layer
  Napi::FunctionReference mappingHandle;  // native MappingHandle constructor
  Napi::FunctionReference pageCache;      // native PageCache constructor (page_cache.cc)
  std::set<int> uffds;                    // uffds opened or adopted here and not yet closed
  int pollHandles = 0;                    // PollHandles opened here and not yet closed (leak checks)
};

inline AddonData* GetAddonData(Napi::Env env) {
  return env.GetInstanceData<AddonData>();
}
