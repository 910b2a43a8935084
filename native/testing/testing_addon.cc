// Module entry of the test-only addon: per-environment state (for UffdError, which the TypeScript
// layer hands over with setErrorClass), then the helpers.
#include "binding/addon_data.h"
#include "binding/uffd.h"
#include "testing/testing.h"

#include <dlfcn.h>

// A worker's teardown dlclose()s the addons it loaded, but a toucher or stamper thread blocked in
// a fault is detached then (it cannot be joined) and still runs this library's code: pin it in
// memory so that unloading never pulls the code from under such a thread.
static void PinLibrary() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&PinLibrary), &info) != 0 && info.dli_fname != nullptr)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  PinLibrary();
  env.SetInstanceData(new AddonData());
  InitErrors(env, exports);
  InitToucher(env, exports);
  InitStamper(env, exports);
  return exports;
}

NODE_API_MODULE(userfaultfd_testing, Init)
