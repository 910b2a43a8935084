// Module entry of the test-only addon: per-environment state (for UffdError, which the TypeScript
// layer hands over with setErrorClass), then the helpers.
#include "binding/addon_data.h"
#include "binding/uffd.h"
#include "testing/testing.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());
  InitErrors(env, exports);
  InitToucher(env, exports);
  InitStamper(env, exports);
  return exports;
}

NODE_API_MODULE(userfaultfd_testing, Init)
