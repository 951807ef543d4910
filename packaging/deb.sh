#!/usr/bin/env bash
# Builds the Debian package, target/debian/cairn_VERSION_ARCH.deb, with cargo-deb
# ([package.metadata.deb] in node/Cargo.toml), from the cairn binary of PROFILE (built
# here if it is not there yet). It stages, in target/deb-stage/: that binary stripped,
# and the man pages and completions its hidden `cairn assets` writes, the pages gzipped
# as Debian wants (-n: no name or time inside, so rebuilds are byte-identical).
#   packaging/deb.sh [release|dev]     (dev packages the binary the tests built)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
case $profile in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) echo "usage: packaging/deb.sh [release|dev]" >&2; exit 2 ;;
esac
target=${CARGO_TARGET_DIR:-$PWD/target}
binary=$target/$profile_dir/cairn
if [[ ! -x $binary ]]; then
  cargo build --locked -p cairn-node --profile "$profile"
fi
# Fixed, since the asset paths in Cargo.toml cannot follow CARGO_TARGET_DIR.
stage=$PWD/target/deb-stage
rm -rf "$stage"
mkdir -p "$stage"
strip --strip-unneeded -o "$stage/cairn" "$binary"
"$stage/cairn" assets "$stage"
gzip -9n "$stage"/man/*.1
# --no-build: the staged files are what is packaged (cargo-deb only copies them).
cargo deb --locked -p cairn-node --no-build --no-strip --output "$target/debian/"
