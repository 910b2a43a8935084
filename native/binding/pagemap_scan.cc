// PAGEMAP_SCAN: one ioctl on /proc/PID/pagemap that reports page-table categories of a range
// (written since write-protected, present, swapped, huge, ...) and, with PM_SCAN_WP_MATCHING,
// write-protects the pages it reports in the same walk (dirty tracking with UFFD WP_ASYNC).
//
// pagemapScan(pid, start, end, flags, inverted, mask, anyof, returnMask, maxPages, maxRegions)
//   -> { regions: BigUint64Array [start, end, categories]*, walkEnd: bigint }
// pagemapScanProbe() -> errno of a deliberately invalid call: EINVAL = the ioctl exists,
//   ENOTTY = this kernel has no PAGEMAP_SCAN.
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/pagemap_uapi.h"

namespace {

int OpenPagemap(Napi::Env env, int pid) {
  std::string path = pid == 0 ? "/proc/self/pagemap" : "/proc/" + std::to_string(pid) + "/pagemap";
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) ThrowUffdError(env, errno, "open", -1, path);
  return fd;
}

Napi::Value PagemapScan(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int pid = ArgI32(info, 0, "pid");
  struct pm_scan_arg arg = {};
  arg.size = sizeof(arg);
  arg.start = ArgU64(info, 1, "start");
  arg.end = ArgU64(info, 2, "end");
  arg.flags = ArgU64(info, 3, "flags");
  arg.category_inverted = ArgU64(info, 4, "categoryInverted");
  arg.category_mask = ArgU64(info, 5, "categoryMask");
  arg.category_anyof_mask = ArgU64(info, 6, "categoryAnyofMask");
  arg.return_mask = ArgU64(info, 7, "returnMask");
  arg.max_pages = ArgU64(info, 8, "maxPages");
  uint64_t maxRegions = ArgU64(info, 9, "maxRegions");
  if (maxRegions == 0 || maxRegions > (1u << 20)) ThrowRangeError(env, "maxRegions must be 1..1048576");
  std::vector<struct page_region> vec(maxRegions);
  arg.vec = reinterpret_cast<uintptr_t>(vec.data());
  arg.vec_len = maxRegions;

  int fd = OpenPagemap(env, pid);
  int n;
  do {
    n = ioctl(fd, PAGEMAP_SCAN, &arg);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  if (n < 0) ThrowUffdError(env, err, "ioctl(PAGEMAP_SCAN)");

  auto regions = Napi::BigUint64Array::New(env, static_cast<size_t>(n) * 3);
  for (int i = 0; i < n; i++) {
    regions[3 * i] = vec[i].start;
    regions[3 * i + 1] = vec[i].end;
    regions[3 * i + 2] = vec[i].categories;
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("regions", regions);
  out.Set("walkEnd", U64(env, arg.walk_end));
  return out;
}

Napi::Value PagemapScanProbe(const Napi::CallbackInfo& info) {
  int fd = OpenPagemap(info.Env(), 0);
  struct pm_scan_arg arg = {};  // size 0: EINVAL where the ioctl exists
  int rc = ioctl(fd, PAGEMAP_SCAN, &arg);
  int err = rc < 0 ? errno : 0;
  close(fd);
  return Napi::Number::New(info.Env(), err);
}

}  // namespace

void InitPagemapScan(Napi::Env env, Napi::Object exports) {
  exports.Set("pagemapScan", Napi::Function::New(env, PagemapScan, "pagemapScan"));
  exports.Set("pagemapScanProbe", Napi::Function::New(env, PagemapScanProbe, "pagemapScanProbe"));
}
