// The JS handle of a file's page cache (native/engine/page_cache.h), for FaultEngine.addRange.
#pragma once
#include <napi.h>

#include <memory>

#include "engine/page_cache.h"

// The PageCache behind a JS PageCache handle; throws a TypeError for anything else.
std::shared_ptr<PageCache> PageCacheOf(Napi::Env env, Napi::Value value);
