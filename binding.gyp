{
  "target_defaults": {
    "include_dirs": ["native", "<!(node -p \"require('node-addon-api').include_dir\")"],
    "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED"],
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
        "native/binding/fault_server.cc",
        "native/binding/fd_passing.cc",
        "native/binding/fd_watcher.cc",
        "native/binding/file_mapping.cc",
        "native/binding/live_snapshot.cc",
        "native/binding/mapping.cc",
        "native/binding/pagemap_scan.cc",
        "native/binding/uffd_ioctls.cc",
        "native/binding/uffd_open.cc",
        "native/binding/uffd_read.cc",
        "native/binding/watchdog.cc",
        "native/binding/wp_dirty_tracker.cc",
        "native/engine/fault_engine.cc",
        "native/engine/fault_sources.cc",
        "native/engine/wp_dirty_tracker.cc",
        "native/testing/stamper.cc",
        "native/testing/toucher.cc"
      ],
      "conditions": [
        ["OS!='linux'", { "sources": [] }]
      ]
    }
  ]
}
