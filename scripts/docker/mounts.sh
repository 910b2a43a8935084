# Sourced by standin-image.sh. debootstrap mounts /proc (and more) inside the root it builds and
# can leave them mounted when it fails or is killed; tar would then read the host's /proc and
# `rm -rf` would delete through the mount. release_mounts DIR unmounts whatever is mounted at or
# under DIR (deepest first) and fails, naming them, if anything stays mounted.

# Mount points at or under $1 (a real path), deepest first; /proc/mounts escapes spaces as \040.
mounts_under() {
  local dir=$1
  awk -v d="$dir" '{
    m = $2; gsub(/\\040/, " ", m); gsub(/\\011/, "\t", m); gsub(/\\012/, "\n", m); gsub(/\\134/, "\\", m)
    if (m == d || index(m, d "/") == 1) print length(m) "\t" m
  }' /proc/mounts | sort -rn | cut -f2-
}

release_mounts() {
  local dir m left
  dir=$(readlink -f "$1") || return 0
  [ -d "$dir" ] || return 0
  while IFS= read -r m; do
    [ -n "$m" ] && umount "$m" 2>/dev/null
  done < <(mounts_under "$dir")
  left=$(mounts_under "$dir")
  if [ -n "$left" ]; then
    echo "standin: refusing to archive or delete $dir: still mounted there:" >&2
    printf '  %s\n' "$left" >&2
    echo "standin: unmount them (umount -R $dir), then run again" >&2
    return 1
  fi
}

# rm -rf DIR, but only once nothing is mounted under it, and never across file systems.
safe_remove() {
  release_mounts "$1" || return 1
  rm -rf --one-file-system "$1"
}
