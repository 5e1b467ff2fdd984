#!/usr/bin/env bash
# The runtime image, proven without Docker. Builds the release binary, assembles the image's
# root with deploy/image/rootfs.sh (the script the Dockerfile runs) into a temporary
# directory, and checks it:
#   - at most 40 MiB; no shell, interpreter, package manager or script; every file is the
#     driver, a program of src/volumes/tools.txt, a library one of them loads, or one of the
#     few data files; every library is loaded by one of them (resolved inside the image);
#   - chrooted into it, with only /dev, /proc and /sys from the host as a container has
#     them: `lunanode-csi --version`, then every program of tools.txt on real loop devices
#     with the arguments the driver uses: probe with blkid, make ext4 and xfs, read their
#     sizes, grow both after growing the device (ext4 online and offline), check with
#     e2fsck; the test fails if tools.txt lists a program it did not run;
#   - `lunanode-csi preflight` inside the image, against the simulator on loop devices, for
#     ext4 and xfs: the node's own code finding, probing, formatting, mounting (mount(2)),
#     writing, reading and unmounting a volume with the image's tools.
# Needs root, loop devices and apt (Debian bookworm); without root it prints `skipped`.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
started=$SECONDS
limit=$((40 << 20))

if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/loop-control ]; then
  echo "image: skipped: needs root and loop devices"
  exit 0
fi
for program in apt-get dpkg-deb chroot losetup mount blockdev python3; do
  command -v "$program" >/dev/null || { echo "image: FAILED: $program is missing" >&2; exit 1; }
done

chroot="$(command -v chroot)"

fail() {
  echo "image: FAILED: $*" >&2
  exit 1
}

echo "image: cargo build --release --locked"
cargo build --release --locked --quiet
bin="$repo/target/release/lunanode-csi"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
# The PATH the image runs with, as the Dockerfile sets it.
image_path="$(sed -n 's/^ENV PATH=//p' Dockerfile)"
[ -n "$image_path" ] || fail "the Dockerfile sets no ENV PATH="
mapfile -t tools < <(sed -e 's/#.*//' src/volumes/tools.txt | awk 'NF { print $1 }')

root="$(mktemp -d /tmp/lunanode-csi-image.XXXXXX)"
dest="$root/rootfs"
work="$root/work"
mkdir -p "$work"
loops=()
sim_pid=""

mounts_under() {
  awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
cleanup() {
  set +e
  if [ -n "$sim_pid" ]; then
    kill -TERM "$sim_pid" 2>/dev/null
    wait "$sim_pid" 2>/dev/null
  fi
  for m in $(mounts_under); do
    umount "$m" || echo "image: cannot unmount $m" >&2
  done
  for l in "${loops[@]}"; do
    losetup -d "$l" 2>/dev/null
  done
  # /dev and /sys are bound into the root: never remove anything while a mount is left.
  if [ -n "$(mounts_under)" ]; then
    echo "image: mounts are left under $root; not removing it" >&2
    return
  fi
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "image: deploy/image/rootfs.sh $dest"
bash deploy/image/rootfs.sh "$dest"

# ---------------------------------------------------------------- what the image holds
used="$(du -s --block-size=1 "$dest" | cut -f1)"
apparent="$(du -s --apparent-size --block-size=1 "$dest" | cut -f1)"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "image: $(find "$dest" -type f | wc -l) files, $(find "$dest" -type l | wc -l) symlinks; du $(mib "$used"), apparent $(mib "$apparent") (limit 40 MiB)"
[ "$used" -le "$limit" ] && [ "$apparent" -le "$limit" ] || fail "the image root is larger than 40 MiB"

forbidden="$(find "$dest" \( -name sh -o -name 'bash*' -o -name 'dash*' -o -name busybox -o -name 'python*' \
  -o -name 'perl*' -o -name 'ruby*' -o -name 'lua*' -o -name 'apt*' -o -name 'dpkg*' \) -printf '/%P\n')"
[ -z "$forbidden" ] || fail "the image holds a shell, an interpreter or a package manager: $forbidden"

# Follow symlinks inside the image (absolute targets are image paths); prints the image path.
resolve() {
  local path="$1" target n=0
  while [ -L "$dest$path" ]; do
    target="$(readlink "$dest$path")"
    case "$target" in /*) path="$target" ;; *) path="$(dirname "$path")/$target" ;; esac
    n=$((n + 1))
    [ $n -lt 20 ] || fail "symlink loop at $1"
  done
  [ -f "$dest$path" ] || fail "$1 leads to nothing in the image"
  realpath -m -s "$path"
}

declare -A programs=() # image path of every program, resolved -> its name
programs[/usr/local/bin/lunanode-csi]=lunanode-csi
for tool in "${tools[@]}"; do
  found=""
  IFS=: read -ra dirs <<<"$image_path"
  for dir in "${dirs[@]}"; do
    if [ -e "$dest$dir/$tool" ]; then
      found="$dir/$tool"
      break
    fi
  done
  [ -n "$found" ] || fail "$tool (src/volumes/tools.txt) is not on the image's PATH ($image_path)"
  programs[$(resolve "$found")]="$tool"
done

while read -r path; do
  [ -n "$path" ] || continue
  path="/$path"
  if head -c 4 "$dest$path" | grep -q $'^\x7fELF'; then
    case "$path" in
      *.so | *.so.*) ;;
      *) [ -n "${programs[$path]:-}" ] || fail "$path is a program that is neither the driver nor in tools.txt" ;;
    esac
  else
    case "$path" in
      /etc/mke2fs.conf | /etc/nsswitch.conf | /usr/share/doc/*/copyright) ;;
      *) fail "$path is neither a program, a library nor a known data file" ;;
    esac
    head -c 2 "$dest$path" | grep -q '^#!' && fail "$path is a script"
  fi
done < <(find "$dest" -type f -printf '%P\n')
while read -r link; do
  [ -n "$link" ] && resolve "/$link" >/dev/null
done < <(find "$dest" -type l -printf '%P\n')

# ---------------------------------------------------------------- a container's mounts
# What a container runtime gives the node plugin: /proc, /sys and (the chart) the host's
# /dev. The mount points exist only while the test runs.
for d in dev proc sys mnt/ext4 mnt/xfs; do
  mkdir -p "$dest/$d"
done
mount --bind /dev "$dest/dev"
mount -t proc proc "$dest/proc"
mount --bind /sys "$dest/sys"

# Every library of the image is loaded by the driver or a tool, resolved by the image's own
# loader (no ld.so.cache there: what would run is what is listed).
loader=""
for l in /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.*; do
  for f in "$dest"$l; do [ -e "$f" ] && loader="${f#"$dest"}"; done
done
[ -n "$loader" ] || fail "no dynamic loader in the image"
declare -A loaded=()
for program in "${!programs[@]}"; do
  out="$(env -i "$chroot" "$dest" "$loader" --list "$program")" || fail "$program: $out"
  grep -q 'not found' <<<"$out" && fail "$program cannot load a library in the image: $out"
  while read -r name arrow path _; do
    case "$name" in /*) loaded[$(resolve "$name")]=1 ;; esac
    [ "$arrow" = "=>" ] && loaded[$(resolve "$path")]=1
  done <<<"$out"
done
while read -r lib; do
  [ -n "$lib" ] || continue
  [ -n "${loaded[/$lib]:-}" ] || fail "/$lib is loaded by nothing in the image"
done < <(find "$dest" \( -path "$dest/proc" -o -path "$dest/sys" -o -path "$dest/dev" \) -prune \
  -o -type f \( -name '*.so' -o -name '*.so.*' \) -printf '%P\n')
echo "image: ${#programs[@]} programs, ${#loaded[@]} libraries (with the loader), all loaded in the image"

# ---------------------------------------------------------------- every tool, in the image
declare -A ran=()
out=""
# image_run CODE PROGRAM ARGS...: run PROGRAM in the image, as the driver does (LC_ALL=C,
# no stdin); it must exit with CODE. Its output is left in $out.
image_run() {
  local want="$1" program="$2" code=0
  shift 2
  echo "  [image] $program $*"
  env -i PATH="$image_path" LC_ALL=C "$chroot" "$dest" "$program" "$@" \
    </dev/null >"$work/stdout" 2>"$work/stderr" || code=$?
  out="$(cat "$work/stdout")"
  if [ "$code" != "$want" ]; then
    cat "$work/stdout" "$work/stderr" >&2
    fail "$program $* exited $code, not $want"
  fi
  ran[$program]=1
}

version_out="$(env -i PATH="$image_path" "$chroot" "$dest" /usr/local/bin/lunanode-csi --version)"
[ "$version_out" = "lunanode-csi $version" ] || fail "--version said '$version_out'"
echo "  [image] lunanode-csi --version: $version_out"

loop() { # loop FILE SIZE: $dev, a loop device on a new sparse file
  truncate -s "$2" "$1"
  dev="$(losetup -f --show "$1")"
  loops+=("$dev")
}
grow() { # grow FILE DEVICE SIZE: the disk grows, as after an expansion
  truncate -s "$3" "$1"
  losetup -c "$2"
  [ "$(blockdev --getsize64 "$2")" -eq $(($3)) ] || fail "$2 did not grow to $3"
}
# ext4_size DEVICE WANT / xfs_size MOUNTPOINT WANT: the filesystem's size, read in the image
# as src/volumes/resize.rs reads it (dumpe2fs -h; xfs_spaceman's info, which is xfs_info),
# must be WANT bytes.
ext4_size() {
  image_run 0 dumpe2fs -h "$1"
  local got
  got="$(awk -F: '/^Block count:/ { c = $2 } /^Block size:/ { s = $2 } END { print c * s }' <<<"$out")"
  [ "$got" = "$2" ] || fail "ext4 on $1 is $got bytes, not $2"
}
xfs_size() {
  image_run 0 xfs_spaceman -p xfs_info -c info "$1"
  local got
  got="$(sed -n 's/^data .*bsize=\([0-9]*\) *blocks=\([0-9]*\),.*/\1 \2/p' <<<"$out" | awk '{ print $1 * $2 }')"
  [ "$got" = "$2" ] || fail "xfs at $1 is $got bytes, not $2"
}
expect() { # expect WHAT GOT WANT
  [ "$2" = "$3" ] || fail "$1: $2, not $3"
}

echo "image: ext4 on a loop device"
img="$work/ext4.img"
loop "$img" $((64 << 20))
image_run 2 blkid -p -o export "$dev" # nothing found: the driver's "blank"
image_run 0 mkfs.ext4 -F -m0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev"
image_run 0 blkid -p -o export "$dev"
grep -qx 'TYPE=ext4' <<<"$out" || fail "blkid did not see ext4: $out"
ext4_size "$dev" $((64 << 20))
mount "$dev" "$dest/mnt/ext4"
echo kept >"$dest/mnt/ext4/file"
grow "$img" "$dev" $((128 << 20))
# Online ext4 growth needs CAP_SYS_RESOURCE (the node plugin is privileged); where this
# test runs without it, resize2fs must be refused for that reason and no other.
if (($((16#$(awk '/^CapEff:/ { print $2 }' /proc/self/status))) >> 24 & 1)); then
  image_run 0 resize2fs "$dev" # online, mounted
  ext4_size "$dev" $((128 << 20))
else
  image_run 1 resize2fs "$dev"
  grep -q 'Permission denied' "$work/stderr" || fail "resize2fs failed for another reason than CAP_SYS_RESOURCE"
  echo "    (no CAP_SYS_RESOURCE here: refused as on the host; grown offline below)"
fi
umount "$dest/mnt/ext4"
grow "$img" "$dev" $((192 << 20))
image_run 0 e2fsck -f -p "$dev" # offline, as grow_ext4_offline: check, then resize
image_run 0 resize2fs "$dev"
ext4_size "$dev" $((192 << 20))
image_run 0 e2fsck -f -n "$dev"
mount -o ro "$dev" "$dest/mnt/ext4"
expect "ext4 file" "$(cat "$dest/mnt/ext4/file")" kept
umount "$dest/mnt/ext4"

echo "image: xfs on a loop device"
img="$work/xfs.img"
loop "$img" $((320 << 20))
image_run 0 mkfs.xfs -K "$dev"
image_run 1 mkfs.xfs -K "$dev" # no -f: refuses to overwrite a filesystem
image_run 0 mkfs.xfs -K -f "$dev"
image_run 0 blkid -p -o export "$dev"
grep -qx 'TYPE=xfs' <<<"$out" || fail "blkid did not see xfs: $out"
mount "$dev" "$dest/mnt/xfs"
echo kept >"$dest/mnt/xfs/file"
xfs_size /mnt/xfs $((320 << 20))
grow "$img" "$dev" $((640 << 20))
image_run 0 xfs_growfs /mnt/xfs
xfs_size /mnt/xfs $((640 << 20))
expect "xfs file" "$(cat "$dest/mnt/xfs/file")" kept
umount "$dest/mnt/xfs"

missing=()
for tool in "${tools[@]}"; do
  [ -n "${ran[$tool]:-}" ] || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || fail "src/volumes/tools.txt lists ${missing[*]}, which this test did not run in the image: add a run above"
echo "image: every tool of src/volumes/tools.txt ran in the image: ${!ran[*]}"

# ---------------------------------------------------------------- the node's own code
# The simulator runs outside, on loop devices, with its by-id links inside the image (they
# point at /dev/loopN, the host's /dev bound in); preflight runs in the image.
mkdir -p "$work/sim"
"$bin" sim --backing loop --vm toronto:node-1:virtio --by-id-dir "$dest/by-id" \
  --state-dir "$work/sim" >"$work/sim.out" 2>"$work/sim.err" &
sim_pid=$!
for _ in $(seq 100); do
  [ -s "$work/sim.out" ] && break
  sleep 0.1
done
[ -s "$work/sim.out" ] || { cat "$work/sim.err" >&2; fail "the simulator did not start"; }
sim_field() { python3 -c 'import json,sys; v=json.loads(sys.stdin.readline()); print(eval(sys.argv[1]))' "$1" <"$work/sim.out"; }
url="$(sim_field 'v["url"]')"
api_id="$(sim_field 'v["api_id"]')"
api_key="$(sim_field 'v["api_key"]')"
vm="$(sim_field 'v["vms"][0]["id"]')"
for fs in ext4 xfs; do
  echo "  [image] lunanode-csi preflight --fs-type $fs"
  code=0
  env -i PATH="$image_path" LUNANODE_API_ID="$api_id" LUNANODE_API_KEY="$api_key" \
    "$chroot" "$dest" /usr/local/bin/lunanode-csi preflight --json --api-url "$url" --qps 0 \
    --node-id "$vm" --region toronto --by-id-dir /by-id --device-wait-secs 20 --fs-type "$fs" \
    >"$work/preflight.json" 2>"$work/preflight.err" || code=$?
  summary="$(python3 - "$work/preflight.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
checks = report["checks"]
ok = report["ok"] and checks and all(c["status"] == "ok" for c in checks)
print(("" if ok else "FAILED ") + f'{len(checks)} checks: ' + "; ".join(f'{c["check"]}: {c["status"]}' for c in checks))
EOF
)" || summary="FAILED: no report"
  echo "    $summary"
  if [ "$code" -ne 0 ] || [ "${summary#FAILED}" != "$summary" ]; then
    cat "$work/preflight.json" "$work/preflight.err" >&2
    fail "preflight --fs-type $fs in the image exited $code"
  fi
done

echo "image: ok in $((SECONDS - started)) s: $(mib "$apparent") (du $(mib "$used")), no shell, interpreter or package manager; driver, ${#tools[@]} tools and preflight ran in it"
