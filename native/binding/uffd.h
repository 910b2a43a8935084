// Init functions of each native concern; addon.cc calls them all (and the test-only addon,
// native/testing/testing_addon.cc, InitErrors).
#pragma once
#include <napi.h>

void InitErrors(Napi::Env env, Napi::Object exports);
void InitConstants(Napi::Env env, Napi::Object exports);
void InitOpen(Napi::Env env, Napi::Object exports);
void InitIoctls(Napi::Env env, Napi::Object exports);
void InitMapping(Napi::Env env, Napi::Object exports);
void InitRead(Napi::Env env, Napi::Object exports);
void InitEventReader(Napi::Env env, Napi::Object exports);
void InitFdPassing(Napi::Env env, Napi::Object exports);
void InitFdWatcher(Napi::Env env, Napi::Object exports);
void InitFaultEngine(Napi::Env env, Napi::Object exports);
void InitPageCache(Napi::Env env, Napi::Object exports);
void InitPagemapScan(Napi::Env env, Napi::Object exports);
void InitSnapshotEngine(Napi::Env env, Napi::Object exports);
void InitMigration(Napi::Env env, Napi::Object exports);
void InitWorkload(Napi::Env env, Napi::Object exports);
void InitWpDirtyTracker(Napi::Env env, Napi::Object exports);
