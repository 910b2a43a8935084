// PageCache: the JS handle of a shared file's page cache as FaultServer ranges in MINOR mode fill
// it (native/engine/page_cache.h). src/engines/page-cache.ts makes one per file: it maps the file
// once more (the writer), registers that mapping for MISSING faults with a uffd of its own, and
// hands both here. Ranges hold the cache (shared_ptr): it outlives this handle as long as they do.
//
// new PageCache(uffd, address, length, pageSize); cachedPages()
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

#include "binding/addon_data.h"
#include "binding/args.h"
#include "binding/page_cache.h"
#include "binding/uffd.h"
#include "engine/util.h"

namespace {

class JsPageCache : public Napi::ObjectWrap<JsPageCache> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PageCache", {InstanceMethod<&JsPageCache::CachedPages>("cachedPages")});
  }

  JsPageCache(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsPageCache>(info) {
    Napi::Env env = info.Env();
    int fd = ArgFd(info, 0);
    uint64_t address = ArgU64(info, 1, "address");
    uint64_t length = ArgU64(info, 2, "length");
    uint64_t pageSize = ArgU64(info, 3, "pageSize");
    if (pageSize < BasePageSize() || !IsPowerOfTwo(pageSize))
      ThrowRangeError(env, "pageSize must be a power of two >= the base page size");
    if (address == 0 || address % pageSize != 0 || length == 0 || length % pageSize != 0)
      ThrowRangeError(env, "the writer must be a non-empty mapping aligned to its page size");
    std::shared_ptr<ZeroRegion> zeros;
    if (pageSize > BasePageSize()) {
      // hugetlb: no ZEROPAGE, zeros are copied (a few pages per copy).
      int err = 0;
      zeros = ZeroRegion::Create(std::max<uint64_t>(pageSize, 8u << 20), &err);
      if (!zeros) ThrowUffdError(env, err, "mmap", -1, "a zero region for huge pages");
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) ThrowUffdError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
    cache_ = std::make_shared<PageCache>(own, address, length, pageSize, std::move(zeros));
    cache_->Probe(0, cache_->pages());  // pages cached before serving (pushed): only CONTINUE for them
  }

  std::shared_ptr<PageCache> cache() const { return cache_; }

 private:
  // Pages known to be in the page cache (filled through the writer, or seen by a MINOR fault).
  Napi::Value CachedPages(const Napi::CallbackInfo& info) {
    size_t n = 0;
    for (size_t i = 0; i < cache_->pages(); i++) n += cache_->Cached(i) ? 1 : 0;
    return Napi::Number::New(info.Env(), static_cast<double>(n));
  }

  std::shared_ptr<PageCache> cache_;
};

}  // namespace

std::shared_ptr<PageCache> PageCacheOf(Napi::Env env, Napi::Value value) {
  AddonData* data = GetAddonData(env);
  if (!value.IsObject() || data == nullptr || data->pageCache.IsEmpty() ||
      !value.As<Napi::Object>().InstanceOf(data->pageCache.Value()))
    ThrowTypeError(env, "cache must be a PageCache");
  return JsPageCache::Unwrap(value.As<Napi::Object>())->cache();
}

void InitPageCache(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = JsPageCache::Define(env);
  GetAddonData(env)->pageCache = Napi::Persistent(ctor);
  exports.Set("PageCache", ctor);
}
