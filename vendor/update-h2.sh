#!/usr/bin/env bash
# Re-makes vendor/h2 from crates.io's h2 VERSION and vendor/h2-authority.patch.
#
#   bash vendor/update-h2.sh 0.4.20
#
# Takes the crate with `cargo vendor` (the crates.io source, as cargo itself would build
# it), keeps what the build needs (src/, Cargo.toml, LICENSE, README.md and the upstream
# commit in .cargo_vcs_info.json), drops the [[example]] and [[bench]] targets from
# Cargo.toml because their files are not kept, and applies the patch. It stops if the patch
# does not apply; then port it by hand (docs/http2-authority.md, "Upgrading h2").
set -euo pipefail
VERSION="${1:?usage: bash vendor/update-h2.sh VERSION}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

mkdir -p "$TMP/fetch/src"
: >"$TMP/fetch/src/lib.rs"
cat >"$TMP/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-h2"
version = "0.0.0"
edition = "2021"

[dependencies]
h2 = "=$VERSION"

[workspace]
TOML
(cd "$TMP/fetch" && cargo vendor --quiet --versioned-dirs "$TMP/crates" >/dev/null)

NEW="$TMP/h2"
mkdir "$NEW"
cp -r "$TMP/crates/h2-$VERSION"/{src,Cargo.toml,LICENSE,README.md,.cargo_vcs_info.json} "$NEW/"
awk '/^\[\[(example|bench)\]\]$/ { skip = 1 } skip && /^$/ { skip = 0; next } !skip' \
    "$TMP/crates/h2-$VERSION/Cargo.toml" >"$NEW/Cargo.toml"
# Outside any git work tree, `git apply` is a strict `patch -p1`: it refuses fuzz.
(cd "$NEW" && git apply --verbose "$HERE/h2-authority.patch")

rm -rf "$HERE/h2"
mv "$NEW" "$HERE/h2"
echo "vendor/h2 is h2 $VERSION with vendor/h2-authority.patch; now set [patch.crates-io] and run cargo update -p h2"
