#!/usr/bin/env bash
# npm run test:vm (test:arm64, test:kernel61): the suite inside a VM booting one of Debian
# bookworm's kernels, on arm64 or x86_64. CONTRIBUTING.md "Older kernels" and "arm64 and Node
# versions" describe it; the measured kernel table in README.md comes from its probes.
#   ARCH=arm64|x86_64    guest architecture (default: this machine's; npm run test:arm64 sets
#                        arm64). arm64 always runs under full-system
#                        emulation (user-mode qemu returns ENOSYS for userfaultfd); x86_64 tries
#                        KVM (-enable-kvm) and falls back to TCG when the guest does not boot
#                        there (VM_ACCEL=kvm|tcg forces one).
#   KERNEL=6.12|6.1      Debian's kernel series (default 6.12): linux-image-6.12.*+deb12-<arch>
#                        (every feature up to MOVE) or linux-image-6.1.0-*-<arch> (Debian 12's
#                        own: no WP_UNPOPULATED, POISON, WP_ASYNC, MOVE; on arm64 no write
#                        protection at all, which came to arm64 in 6.10: features 0x1fff on
#                        x86_64, 0xffe on arm64).
#                        ARM64_KERNEL is the older spelling of KERNEL.
#   - root: busybox-static, libc6, libstdc++6, libgcc-s1, setpriv, getconf from Debian + Node
#     from the npm registry's node-linux-<arch> package (VM_NODE, default 20);
#   - project: a copy of this one with node_modules for the guest (npm ci --cpu=...) and the addon
#     built from the current sources (cross-built with g++-aarch64-linux-gnu for arm64); over 9p;
#   - an initramfs whose /init loads the 9p and virtio modules (with every dependency named in
#     their modinfo), mounts the shares, chroots, records the kernel probe (doctor --json and
#     scripts/vm/kernel-probe.js), runs vitest, writes the exit code, powers off.
# Everything is cached in .cache/vm/<arch>/ (ignored); probes land in .cache/vm/probes/.
# Emulated code runs ~5-10x slower: timeouts are scaled by USERFAULTFD_TEST_TIME_SCALE (default
# 6 under emulation, 2 under KVM). Extra args go to vitest; VM_CMD='node -e ...' runs that in
# the project instead of the suite. VM_EXCLUDE (a regex of test names), VM_CPU, VM_TIMEOUT and
# VM_NODE tune the run (ARM64_EXCLUDE, ARM64_CPU, ARM64_TIMEOUT, ARM64_NODE, ARM64_CMD: aliases).
set -euo pipefail
# One compound command: bash reads all of it before running any, so editing this file while a
# run goes on cannot change that run.
{
cd "$(dirname "$0")/../.."
root=$PWD
case ${ARCH:-$(uname -m)} in
  arm64 | aarch64) arch=arm64 darch=arm64 narch=arm64 triple=aarch64-linux-gnu ;;
  x86_64 | amd64 | x64) arch=x86_64 darch=amd64 narch=x64 triple=x86_64-linux-gnu ;;
  *) echo "test:vm: ARCH must be arm64 or x86_64 (got '${ARCH:-}')" >&2; exit 2 ;;
esac
series=${KERNEL:-${ARM64_KERNEL:-6.12}}
node_major=${VM_NODE:-${ARM64_NODE:-20}}
vm_cmd=${VM_CMD:-${ARM64_CMD:-}}
cache=${USERFAULTFD_CACHE:-$root/.cache}/vm
acache=$cache/$arch
t0=$SECONDS
say() { echo "test:vm[$arch $series]: $*"; }
mkdir -p "$acache/debs" "$cache/probes"
phase() { say "$1 ($((SECONDS - t0)) s so far)"; }

# --- host tools --------------------------------------------------------------------------------
need=()
if [ $arch = arm64 ]; then
  command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
else
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
fi
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi
if [ $arch = arm64 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  say "adding the arm64 architecture to apt (for apt-get download of arm64 packages)"
  dpkg --add-architecture arm64
  timeout 300 apt-get update -q >/dev/null
fi

# --- Debian packages: kernel, busybox, libraries ------------------------------------------------
fetch() { # fetch PACKAGE:ARCH -> path of its .deb in the cache
  local deb
  deb=$(ls "$acache/debs/${1%%:*}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$acache/debs" && timeout 600 apt-get download -q "$1" >/dev/null 2>&1) ||
      { apt-get update -q >/dev/null; (cd "$acache/debs" && timeout 600 apt-get download -q "$1" >/dev/null); }
    deb=$(ls "$acache/debs/${1%%:*}"_*.deb | head -1)
  fi
  echo "$deb"
}
case $series in
  6.1) pattern="^linux-image-6\\.1\\.0-[0-9]+-$darch\$" ;;
  *) pattern="^linux-image-${series//./\\.}\\.[0-9]+\\+deb12-$darch\$" ;;
esac
kpkg=$(apt-cache search --names-only "$pattern" 2>/dev/null | cut -d' ' -f1 | sort -V | tail -1)
[ -n "$kpkg" ] || { say "no Debian $darch kernel package matches $pattern (apt-get update?)"; exit 1; }
kdir=$acache/kernel-$kpkg
if [ ! -d "$kdir" ]; then
  phase "kernel: $kpkg"
  rm -rf "$kdir.tmp"
  dpkg-deb -x "$(fetch "$kpkg:$darch")" "$kdir.tmp"
  mv "$kdir.tmp" "$kdir"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}

rootfs=$acache/rootfs-v5-node$node_major
if [ ! -x "$rootfs/usr/local/bin/node" ]; then
  phase "root filesystem: busybox, bash, coreutils, libc6, libstdc++6, libgcc-s1, setpriv, getconf ($darch) + node $node_major (node-linux-$narch)"
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  # bash and GNU coreutils (and what they need) for the scripts the suite runs (scripts/docker/
  # mounts.sh: bash, rm --one-file-system); busybox for the rest.
  for p in busybox-static libc6 libstdc++6 libgcc-s1 libcap-ng0 bash libtinfo6 coreutils libacl1 libattr1 \
    libgmp10 libselinux1 libpcre2-8-0; do
    dpkg-deb -x "$(fetch "$p:$darch")" "$rootfs"
  done
  # setpriv only (the suite runs the CLI as nobody with it), not the rest of util-linux
  ul=$(mktemp -d "$acache/util-linux.XXXXXX")
  dpkg-deb -x "$(fetch "util-linux:$darch")" "$ul"
  mkdir -p "$rootfs/usr/bin"
  cp "$ul/usr/bin/setpriv" "$rootfs/usr/bin/setpriv"
  rm -rf "$ul"
  # getconf (the suite asks it for PAGESIZE)
  lb=$(mktemp -d "$acache/libc-bin.XXXXXX")
  dpkg-deb -x "$(fetch "libc-bin:$darch")" "$lb"
  cp "$lb/usr/bin/getconf" "$rootfs/usr/bin/getconf"
  rm -rf "$lb"
  mkdir -p "$rootfs"/{bin,work,ctl,proc,sys,dev,tmp,usr/local/bin,etc}
  for a in sh ash cat echo ls mkdir rm cp mv env sleep chmod id kill ps grep sed tr head tail wc uname mount umount \
    true false test awk sort cut readlink; do
    [ -e "$rootfs/bin/$a" ] || [ -e "$rootfs/usr/bin/$a" ] || ln -s /bin/busybox "$rootfs/bin/$a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  echo vm >"$rootfs/etc/hostname"
  cp "$(scripts/node-fetch.sh "$node_major" $narch)" "$rootfs/usr/local/bin/node"
fi
node_dir=$(dirname "$(dirname "$(scripts/node-fetch.sh "$node_major" $narch)")")

# --- initramfs: busybox + the modules for 9p over virtio + /init --------------------------------
# Which modules: 9p and 9pnet_virtio, and the virtio transports (virtio_pci for -virtfs on both
# machines, virtio_mmio too) where this kernel builds them as modules; each preceded by every
# module its modinfo `depends=` names, recursively (6.1's 9p needs netfs and fscache, and its
# virtio_pci needs virtio_pci_modern_dev/legacy_dev). Module names use '_', file names may use '-'.
modules_list() {
  local mdir=$kdir/lib/modules/$kver
  declare -gA ko_of=()
  local f n
  while IFS= read -r f; do
    n=${f##*/}
    n=${n%%.ko*}
    ko_of[${n//-/_}]=$f
  done < <(find "$mdir" -name '*.ko*')
  declare -gA seen=()
  order=()
  visit() {
    local m=$1 dep deps
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    if [ -z "${ko_of[$m]:-}" ]; then
      if grep -q "/${m//_/[-_]}\\.ko\$" "$mdir/modules.builtin" 2>/dev/null; then return 0; fi
      return 1
    fi
    deps=$(ko_cat "${ko_of[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1)
    for dep in ${deps//,/ }; do visit "$dep" || { say "module $dep (needed by $m) not found in $kpkg"; exit 1; }; done
    order+=("$m")
  }
  for m in 9p 9pnet_virtio; do visit $m || { say "module $m not found in $kpkg"; exit 1; }; done
  for m in virtio_pci virtio_mmio; do visit $m || true; done
}
ko_cat() {
  case $1 in *.xz) xz -dc "$1" ;; *.zst) zstd -dc "$1" ;; *) cat "$1" ;; esac
}
initrd=$acache/initrd-v5-$kver.cpio.gz
if [ ! -s "$initrd" ]; then
  modules_list
  phase "initramfs for $kver: modules ${order[*]}"
  ird=$(mktemp -d "$acache/initrd.XXXXXX")
  mkdir -p "$ird"/{bin,modules,proc,sys,dev,newroot}
  cp "$rootfs/bin/busybox" "$ird/bin/busybox"
  for a in sh mount insmod mkdir chroot poweroff echo cat sleep ifconfig; do ln -s busybox "$ird/bin/$a"; done
  for m in "${order[@]}"; do ko_cat "${ko_of[$m]}" >"$ird/modules/$m.ko"; done
  printf '%s\n' "${order[@]}" >"$ird/modules/order"
  cat >"$ird/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# Loopback: the migration, metrics and fd-passing tests connect to 127.0.0.1.
ifconfig lo 127.0.0.1 up
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "init: insmod $m failed"; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o,cache=loose,ro root /newroot
mount -t 9p -o $o,cache=loose work /newroot/work
mount -t 9p -o $o ctl /newroot/ctl
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
# /tmp: room for the demo test's 2 GiB snapshot check (a limit, not an allocation)
mount -t devtmpfs dev /newroot/dev; mount -t tmpfs -o size=3g tmp /newroot/tmp
# What udev would make: bash's process substitution reads /dev/fd/N.
ln -s /proc/self/fd /newroot/dev/fd; ln -s fd/0 /newroot/dev/stdin; ln -s fd/1 /newroot/dev/stdout; ln -s fd/2 /newroot/dev/stderr
echo 64 > /proc/sys/vm/nr_hugepages
echo booted > /newroot/ctl/booted
chroot /newroot /bin/sh /ctl/run.sh
poweroff -f
INIT
  chmod +x "$ird/init"
  (cd "$ird" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$initrd.tmp" && mv "$initrd.tmp" "$initrd"
  rm -rf "$ird"
fi

# --- the project, for the guest ------------------------------------------------------------------
proj=$acache/project
lock_sum=$(cat package.json package-lock.json | sha256sum | cut -c1-16)
if [ "$(cat "$proj/.deps" 2>/dev/null)" != "$lock_sum" ]; then
  phase "node_modules for $narch (npm ci --cpu=$narch --os=linux)"
  rm -rf "$proj"
  mkdir -p "$proj"
  cp package.json package-lock.json "$proj/"
  (cd "$proj" && timeout 600 npm ci --cpu=$narch --os=linux --libc=glibc --ignore-scripts --no-audit --no-fund >/dev/null)
  echo "$lock_sum" >"$proj/.deps"
fi
# this checkout's files (tracked and new, not ignored) + its built TypeScript
[ -f dist/index.js ] || npm run build:ts >/dev/null
find "$proj" -mindepth 1 -maxdepth 1 ! -name node_modules ! -name .deps ! -name package.json ! -name package-lock.json -exec rm -rf {} +
git ls-files -co --exclude-standard -z | grep -zv '^package\(-lock\)\?\.json$' | xargs -0 cp --parents -t "$proj"
cp -r dist "$proj/dist"
phase "building the addon for $arch from the current sources"
if [ $arch = arm64 ]; then tools=(CC=$triple-gcc CXX=$triple-g++ LINK=$triple-g++ AR=$triple-ar); else tools=(); fi
(cd "$proj" && env "${tools[@]}" timeout 600 node "$root/node_modules/node-gyp/bin/node-gyp.js" rebuild \
  --arch=$narch --nodedir="$node_dir" >"$acache/node-gyp.log" 2>&1) || { tail -30 "$acache/node-gyp.log"; exit 1; }
want_elf=$([ $arch = arm64 ] && echo 'ARM aarch64' || echo 'x86-64')
file "$proj/build/Release/userfaultfd.node" | grep -q "$want_elf" || { say "the addon built is not $want_elf"; exit 1; }

# --- boot and run -----------------------------------------------------------------------------
ctl=$acache/ctl
rm -rf "$ctl"
mkdir -p "$ctl"
# Tests not sane under emulation: the two load tests (a million faults, ~1 s natively, far
# beyond any timeout there; 100 000 faults, ~1 s natively, 2 minutes emulated and over 6 when
# the host is busy), the 512 MiB demo (2-4 minutes emulated; the smaller demo tests take the
# same kernel paths) and the TypeDoc build (no kernel in it; a minute emulated, and TypeDoc's
# WebAssembly fails now and then under QEMU's TCG with "memory access out of bounds", on both
# architectures). VM_EXCLUDE (a regex of test names; empty: none) overrides.
exclude=${VM_EXCLUDE-${ARM64_EXCLUDE-1,000,000 faults|100 000 faults|512 MiB|API reference \\(TypeDoc\\)}}
args=""
[ -n "$exclude" ] && args="-t '^(?!.*(${exclude//\'/}))'"
for a in "$@"; do args="$args '${a//\'/\'\\\'\'}'"; done
write_run() { # write_run SCALE
  cat >"$ctl/run.sh" <<RUN
export PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp LD_LIBRARY_PATH=/lib/$triple:/usr/lib/$triple
export USERFAULTFD_TEST_TIME_SCALE=$1 CI=1
cd /work
echo "guest: \$(uname -m) \$(uname -r), node \$(node -v), \$(cat /proc/sys/vm/nr_hugepages) huge pages"
# The kernel probe (README's table): what the package reports, and what a real try of each finds.
node dist/cli/index.js doctor --json > /ctl/doctor.json
node scripts/vm/kernel-probe.js > /ctl/probe.json || echo "guest: kernel-probe failed"
${vm_cmd:-node node_modules/vitest/vitest.mjs run --reporter=verbose $args}
echo \$? > /ctl/rc
RUN
}

# KVM where it works. This machine has /dev/kvm without vmx/svm (kvm-pvm, a paravirtual KVM that
# runs only guests built for it), so "does KVM exist" is not enough: try to boot, and fall back
# to TCG when the guest did not reach its /init within VM_KVM_BOOT_WAIT seconds (or quit early).
accel=${VM_ACCEL:-}
if [ -z "$accel" ]; then
  if [ $arch = x86_64 ] && [ -w /dev/kvm ]; then accel=kvm; else accel=tcg; fi
fi
log=$acache/last-run.log
run_qemu() { # run_qemu ACCEL -> qemu's exit status; 125: the guest never booted
  local acc=$1 cpu qemu scale qpid booted=0 waited=0
  if [ $arch = arm64 ]; then
    # cortex-a72: with `-cpu max,pauth-impdef=on` QEMU 7.2's emulation of some newer feature
    # crashed Node's main process now and then under load (not with cortex-a72).
    cpu=${VM_CPU:-${ARM64_CPU:-cortex-a72}}
    qemu=(qemu-system-aarch64 -M virt -cpu "$cpu" -append "console=ttyAMA0 panic=-1 quiet")
  elif [ "$acc" = kvm ]; then
    cpu=${VM_CPU:-host}
    qemu=(qemu-system-x86_64 -M q35 -enable-kvm -cpu "$cpu" -append "console=ttyS0 panic=-1 quiet")
  else
    cpu=${VM_CPU:-max}
    qemu=(qemu-system-x86_64 -M q35 -accel tcg,thread=multi -cpu "$cpu" -append "console=ttyS0 panic=-1 quiet")
  fi
  scale=${USERFAULTFD_TEST_TIME_SCALE:-$([ "$acc" = kvm ] && echo 2 || echo 6)}
  write_run "$scale"
  rm -f "$ctl/booted" "$ctl/rc"
  say "booting $kpkg ($kver) under ${qemu[0]} ($acc, -cpu $cpu -smp 2), node v$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$node_dir/package.json" | head -1), time scale x$scale"
  timeout --kill-after=10s "${VM_TIMEOUT:-${ARM64_TIMEOUT:-3600}}" "${qemu[@]}" -smp 2 -m 4096 \
    -nographic -nic none -no-reboot -kernel "$vmlinuz" -initrd "$initrd" \
    -virtfs "local,path=$rootfs,mount_tag=root,security_model=none,readonly=on" \
    -virtfs "local,path=$proj,mount_tag=work,security_model=none" \
    -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none" </dev/null >"$log" 2>&1 &
  qpid=$!
  tail -n +1 --pid=$qpid -f "$log" &
  if [ "$acc" = kvm ]; then
    while kill -0 $qpid 2>/dev/null && [ ! -e "$ctl/booted" ] && [ $waited -lt "${VM_KVM_BOOT_WAIT:-60}" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    if [ ! -e "$ctl/booted" ]; then
      kill $qpid 2>/dev/null || true
      wait $qpid 2>/dev/null || true
      return 125
    fi
  fi
  wait $qpid
}
b0=$SECONDS
set +e
run_qemu $accel
qrc=$?
if [ $qrc = 125 ] && [ $accel = kvm ] && [ -z "${VM_ACCEL:-}" ]; then
  why=$(grep -v '^\s*$' "$log" | tail -3 | tr '\n' ' ')
  say "KVM: the guest did not boot in $((SECONDS - b0)) s ($why); falling back to TCG"
  accel=tcg
  b0=$SECONDS
  run_qemu tcg
  qrc=$?
fi
set -e
cp "$log" "$acache/last-run-$kver.log"
rc=$(cat "$ctl/rc" 2>/dev/null || echo "none (the guest did not finish; qemu exit $qrc)")
for p in doctor probe; do
  [ -s "$ctl/$p.json" ] && cp "$ctl/$p.json" "$cache/probes/$arch-$kver.$p.json"
done
say "accelerator: $accel; guest suite exit code: $rc; $((SECONDS - b0)) s in the guest, $((SECONDS - t0)) s in all"
say "log: $acache/last-run-$kver.log; kernel probe: $cache/probes/$arch-$kver.probe.json"
[ "$rc" = 0 ]
exit
}
