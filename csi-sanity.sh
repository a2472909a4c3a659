#!/usr/bin/env bash
# Runs the community CSI conformance suite (csi-sanity) against localvol, once per
# volume type. Usage: ./csi-sanity.sh [extra csi-sanity flags, e.g. -ginkgo.focus=Node]
# csi-sanity is taken from $CSI_SANITY or PATH.
set -euo pipefail
cd "$(dirname "$0")"

sanity=${CSI_SANITY:-$(command -v csi-sanity || true)}
if [ -z "$sanity" ] || [ ! -x "$sanity" ]; then
  cat >&2 <<'MSG'
csi-sanity is not installed. Install it with Go:
  go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest
then put it on PATH or point CSI_SANITY at it.
MSG
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "csi-sanity.sh must run as root: the driver mounts and attaches loop devices." >&2
  exit 2
fi

cargo build --release --bin localvol
bin=target/release/localvol

work=$(mktemp -d /tmp/localvol-sanity.XXXXXX)
driver_pid=
cleanup() {
  [ -n "$driver_pid" ] && kill -TERM "$driver_pid" 2>/dev/null && wait "$driver_pid" 2>/dev/null || true
  # Unmount whatever is left below the work directory, deepest first.
  awk -v w="$work" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # Detach loop devices whose backing file is below the work directory.
  for b in /sys/block/loop*/loop/backing_file; do
    [ -r "$b" ] || continue
    case "$(cat "$b")" in "$work"/*)
      dev=/dev/$(basename "$(dirname "$(dirname "$b")")")
      losetup -d "$dev" 2>/dev/null || true;;
    esac
  done
  rm -rf "$work"
}
trap cleanup EXIT

status=0
# One run per volume type: directory volumes, ext4 and xfs on loop devices.
for variant in "dir" "loop-ext4" "loop-xfs"; do
  size=$((64 << 20))
  case $variant in
    dir) params="type: dir" ;;
    loop-ext4) params=$'type: loop\nfsType: ext4' ;;
    # mkfs.xfs needs 300 MiB at least.
    loop-xfs) params=$'type: loop\nfsType: xfs'; size=$((320 << 20)) ;;
  esac
  root=$work/$variant/root
  mkdir -p "$root" "$work/$variant/k"
  printf '%s\n' "$params" > "$work/$variant/params.yaml"
  sock=$work/$variant/csi.sock
  "$bin" serve --endpoint "unix://$sock" --root "$root" --node-id sanity-node \
    2> "$work/$variant/driver.log" &
  driver_pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  echo "== csi-sanity: $variant"
  if ! "$sanity" \
      --csi.endpoint "$sock" \
      --csi.stagingdir "$work/$variant/k/staging" \
      --csi.mountdir "$work/$variant/k/target" \
      --csi.testvolumeparameters "$work/$variant/params.yaml" \
      --csi.testvolumesize "$size" \
      --csi.testvolumeexpandsize $((size * 2)) \
      "$@"; then
    status=1
    echo "csi-sanity failed for $variant; driver log: $work/$variant/driver.log (kept below)" >&2
    tail -n 50 "$work/$variant/driver.log" >&2
  fi
  kill -TERM "$driver_pid"; wait "$driver_pid" || true; driver_pid=
done
exit $status
