{
  "target_defaults": {
    "include_dirs": ["native", "<!(node -p \"require('node-addon-api').include_dir\")"],
    "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"],
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions"],
    "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
    "ldflags": ["-pthread"]
  },
  "targets": [
    {
      "target_name": "userfaultfd",
      "sources": [
        "native/binding/addon.cc",
        "native/binding/constants.cc",
        "native/binding/errors.cc",
        "native/binding/event_reader.cc",
        "native/binding/fault_engine.cc",
        "native/binding/fd_passing.cc",
        "native/binding/fd_watcher.cc",
        "native/binding/mapping.cc",
        "native/binding/migration.cc",
        "native/binding/page_cache.cc",
        "native/binding/pagemap_scan.cc",
        "native/binding/snapshot_engine.cc",
        "native/binding/uffd_ioctls.cc",
        "native/binding/uffd_open.cc",
        "native/binding/uffd_read.cc",
        "native/binding/watchdog.cc",
        "native/binding/workload.cc",
        "native/binding/wp_dirty_tracker.cc",
        "native/engine/fault_engine.cc",
        "native/engine/fault_sources.cc",
        "native/engine/nbd_prefetch.cc",
        "native/engine/migration_channel.cc",
        "native/engine/migration_channel_pair.cc",
        "native/engine/migration_source.cc",
        "native/engine/migration_target.cc",
        "native/engine/snapshot_engine.cc",
        "native/engine/watchdog.cc",
        "native/engine/workload.cc",
        "native/engine/wp_dirty_tracker.cc"
      ],
      "conditions": [
        ["OS!='linux'", { "sources": [] }]
      ]
    }
  ],
  "conditions": [
    # The test-only addon (native threads that fault and change the address space, for tests and
    # benchmarks), loaded by src/testing only. Never shipped: the package leaves native/testing out,
    # so a build from the published package makes the one addon above.
    ["'<!(node -p \"require('fs').existsSync('native/testing') ? 1 : 0\")'=='1'", {
      "targets": [
        {
          "target_name": "userfaultfd_testing",
          "sources": [
            "native/binding/errors.cc",
            "native/testing/stamper.cc",
            "native/testing/testing_addon.cc",
            "native/testing/toucher.cc"
          ],
          "conditions": [
            ["OS!='linux'", { "sources": [] }]
          ]
        }
      ]
    }]
  ]
}
