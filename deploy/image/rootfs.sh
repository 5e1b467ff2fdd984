#!/usr/bin/env bash
# Assembles the root filesystem of the lunanode-csi image into DEST: the driver binary, the
# programs the node runs (src/volumes/tools.txt), exactly the shared libraries they load,
# the few files they read, and nothing else: no shell, no interpreter, no package manager.
#
#   deploy/image/rootfs.sh DEST [BINARY]
#
# Run as root on Debian bookworm (the Dockerfile's rootfs stage, or any such machine), with
# the release binary built (BINARY, default target/release/lunanode-csi). DEST must be
# empty or absent. Everything but the binary comes from Debian packages fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into a scratch directory: nothing is
# installed on this machine and nothing from it is copied. The Dockerfile's last stage is
# `FROM scratch` plus DEST, so this script alone decides what the image holds.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${1:?usage: $0 DEST [BINARY]}"
binary="${2:-$repo/target/release/lunanode-csi}"
tools_file="${LUNANODE_CSI_TOOLS_FILE:-$repo/src/volumes/tools.txt}"

# The libraries the binary and the tools link, by Debian bookworm package. A library that
# is missing here stops the script, naming it; see `needed` below.
lib_packages=(
  libc6 libgcc-s1                                  # lunanode-csi, and everything
  libblkid1 libuuid1                               # blkid, mkfs.*, e2fsck, dumpe2fs
  libext2fs2 libcom-err2                           # e2fsprogs (libext2fs, libe2p)
  libinih1 liburcu8                                # mkfs.xfs, xfs_growfs
  libedit2 libtinfo6 libbsd0 libmd0                # xfs_spaceman
)
# Packages fetched only for the licence text of another (its /usr/share/doc links there).
doc_packages=(
  gcc-12-base                                      # libgcc-s1
)
# Files the tools read at run time, from their packages.
data_files=(
  /etc/mke2fs.conf                                 # mkfs.ext4's defaults (e2fsprogs)
)

die() { echo "rootfs.sh: $*" >&2; exit 1; }

[ -x "$binary" ] || die "no driver binary at $binary (cargo build --release --locked)"
[ -r "$tools_file" ] || die "no tool list at $tools_file"
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
  die "$dest is not empty"
fi
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] ||
  die "needs Debian bookworm (the package names above are bookworm's), not ${PRETTY_NAME:-unknown}"

# program -> package, from the tool list.
declare -A tool_package=()
while read -r program package _; do
  [ -n "$program" ] || continue
  [ -n "${package:-}" ] || die "$tools_file: no package for $program"
  tool_package[$program]="$package"
done < <(sed -e 's/#.*//' "$tools_file")
[ ${#tool_package[@]} -gt 0 ] || die "$tools_file lists no programs"
mapfile -t tool_packages < <(printf '%s\n' "${tool_package[@]}" | sort -u)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
mkdir -p "$work/debs" "$stage"
# apt drops privileges to _apt for downloads; let it write here.
chown _apt "$work/debs" 2>/dev/null || true

packages=("${tool_packages[@]}" "${lib_packages[@]}" "${doc_packages[@]}")
echo "rootfs.sh: fetching ${packages[*]}"
if ! (cd "$work/debs" && apt-get download -q "${packages[@]}" >/dev/null 2>"$work/apt.err"); then
  echo "rootfs.sh: apt-get download failed, updating the package lists" >&2
  apt-get update -qq
  (cd "$work/debs" && apt-get download -q "${packages[@]}" >/dev/null) ||
    die "apt-get download ${packages[*]} failed"
fi
for deb in "$work/debs"/*.deb; do
  dpkg-deb -x "$deb" "$stage"
done

# Follow a path inside the staged packages to the file it names (absolute link targets are
# relative to the stage, as they will be in the image). Prints the image path.
resolve() {
  local path="$1" target n=0
  while [ -L "$stage$path" ]; do
    target="$(readlink "$stage$path")"
    case "$target" in
      /*) path="$target" ;;
      *) path="$(dirname "$path")/$target" ;;
    esac
    n=$((n + 1))
    [ $n -lt 20 ] || die "symlink loop at $1"
  done
  [ -f "$stage$path" ] || die "$1 is not in the staged packages"
  realpath -m -s "$path"
}

# Copy the image path $1 from the stage into DEST: a symlink as a symlink plus what it
# points to, a file as a file. Directories on the way must be directories in the stage.
install_path() {
  local path="$1" target
  [ -d "$stage$(dirname "$path")" ] && [ ! -L "$stage$(dirname "$path")" ] ||
    die "$(dirname "$path") is not a plain directory in the staged packages"
  mkdir -p "$dest$(dirname "$path")"
  if [ -L "$stage$path" ]; then
    [ -L "$dest$path" ] || cp -P "$stage$path" "$dest$path"
    target="$(readlink "$stage$path")"
    case "$target" in
      /*) install_path "$target" ;;
      *) install_path "$(realpath -m -s "$(dirname "$path")/$target")" ;;
    esac
  elif [ -f "$stage$path" ]; then
    [ -e "$dest$path" ] || cp -p "$stage$path" "$dest$path"
  else
    die "$path is not in the staged packages"
  fi
}

# The staged dynamic loader (the same path in every binary's PT_INTERP, resolved here).
loader=""
for l in /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.*; do
  for f in "$stage"$l; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    loader="${f#"$stage"}"
  done
done
[ -n "$loader" ] || die "no dynamic loader in the staged libc6"
loader_file="$stage$(resolve "$loader")"
lib_dirs="$(find "$stage" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)"

# The shared libraries an ELF file loads, as image paths, resolved among the staged
# packages by the staged loader (`ld.so --list` maps them, it runs nothing of the file).
# A library found only on this machine, or nowhere, is an error naming it.
needed() {
  local file="$1" out
  out="$("$loader_file" --library-path "$lib_dirs" --list "$file")" ||
    die "cannot list the libraries of $file: $out"
  while read -r name arrow path _; do
    if [ "${name#/}" != "$name" ]; then
      echo "$name" # the loader, by the path in the file's PT_INTERP
    elif [ "$arrow" = "=>" ]; then
      case "$path" in
        "$stage"/*) echo "${path#"$stage"}" ;;
        not) die "$file needs $name, which no staged package has: add its package to lib_packages" ;;
        *) die "$file needs $name, found only at $path on this machine: add its package to lib_packages" ;;
      esac
    fi
  done <<<"$out"
}

mkdir -p "$dest"
chmod 0755 "$dest"

# The driver.
install -D -m 0755 "$binary" "$dest/usr/local/bin/lunanode-csi"
libs=()
mapfile -t -O ${#libs[@]} libs < <(needed "$binary")

# The tools, where their packages put them.
for program in "${!tool_package[@]}"; do
  path=""
  for dir in /usr/sbin /usr/bin /sbin /bin; do
    if [ -e "$stage$dir/$program" ] || [ -L "$stage$dir/$program" ]; then
      path="$dir/$program"
      break
    fi
  done
  [ -n "$path" ] || die "$program is not in package ${tool_package[$program]}"
  file="$stage$(resolve "$path")"
  head -c 4 "$file" | grep -q $'^\x7fELF' ||
    die "$path in ${tool_package[$program]} is not an ELF program (a script needs a shell, which the image does not have)"
  install_path "$path"
  mapfile -t -O ${#libs[@]} libs < <(needed "$file")
done

for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  install_path "$lib"
done
for f in "${data_files[@]}"; do
  install_path "$f"
done

# Every package must have given the image something (a library no longer loaded is taken
# off lib_packages, not shipped), and its licence goes with it, as Debian gives it.
shipped="$work/shipped"
(cd "$dest" && find . ! -type d) | sort >"$shipped"
for deb in "$work/debs"/*.deb; do
  package="$(dpkg-deb -f "$deb" Package)"
  case " ${doc_packages[*]} " in *" $package "*) continue ;; esac
  dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's,/$,,' | sort | comm -12 - "$shipped" |
    grep -q . || die "package $package gives the image nothing: take it off the lists"
  copyright="/usr/share/doc/$package/copyright"
  [ -f "$stage$copyright" ] || die "no $copyright in the staged packages (add the package its doc directory links to, to doc_packages)"
  install -D -m 0644 "$stage$copyright" "$dest$copyright"
done

# Name lookups read /etc/hosts before DNS, as on any Debian system (the API and the
# metadata service are reached by name and address; glibc resolves both itself).
install -d -m 0755 "$dest/etc"
printf 'hosts: files dns\n' >"$dest/etc/nsswitch.conf"
# std::env::temp_dir() for `lunanode-csi preflight`'s default work directory.
install -d -m 1777 "$dest/tmp"

chown -R 0:0 "$dest"
echo "rootfs.sh: $dest holds $(find "$dest" -type f | wc -l) files, $(du -sh --apparent-size "$dest" | cut -f1)"
