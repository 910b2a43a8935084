// Module entry: per-environment state, then each concern's exports.
#include "binding/addon_data.h"
#include "binding/uffd.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());
  InitErrors(env, exports);
  InitConstants(env, exports);
  InitOpen(env, exports);
  InitIoctls(env, exports);
  InitMapping(env, exports);
  InitRead(env, exports);
  InitEventReader(env, exports);
  InitFdPassing(env, exports);
  InitFdWatcher(env, exports);
  InitFaultEngine(env, exports);
  InitPageCache(env, exports);
  InitPagemapScan(env, exports);
  InitSnapshotEngine(env, exports);
  InitMigration(env, exports);
  InitWorkload(env, exports);
  InitWpDirtyTracker(env, exports);
  return exports;
}

NODE_API_MODULE(userfaultfd, Init)
