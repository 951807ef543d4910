#!/usr/bin/env bash
# Builds the Debian package and checks it: the binary, unit, man pages and completions
# at their Debian paths (dpkg-deb -c), lintian (errors fail, warnings printed), and
# systemd-analyze verify on the unit as the package installs it. Installs what it needs
# when missing: cargo-deb (pinned), lintian, systemd. The last step of .ci/run, where it
# packages the debug binary the tests built (PROFILE dev) instead of building a release.
#   packaging/check.sh [release|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
CARGO_DEB_VERSION=3.8.0

if [[ $(cargo deb --version 2>/dev/null) != *"$CARGO_DEB_VERSION"* ]]; then
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

target=${CARGO_TARGET_DIR:-$PWD/target}
rm -f "$target"/debian/cairn_*.deb
packaging/deb.sh "$profile"
deb=$(ls "$target"/debian/cairn_*.deb)
echo "built $deb ($(du -h "$deb" | cut -f1))"

fail=0
listing=$(dpkg-deb -c "$deb" | awk '{print $6}')
expect=(
  ./usr/bin/cairn
  ./usr/lib/systemd/system/cairn.service
  ./usr/share/man/man1/cairn.1.gz
  ./usr/share/man/man1/cairn-node.1.gz
  ./usr/share/man/man1/cairn-node-run.1.gz
  ./usr/share/man/man1/cairn-backup.1.gz
  ./usr/share/man/man1/cairn-restore.1.gz
  ./usr/share/man/man1/cairn-trust-invite.1.gz
  ./usr/share/bash-completion/completions/cairn
  ./usr/share/zsh/vendor-completions/_cairn
  ./usr/share/fish/vendor_completions.d/cairn.fish
  ./usr/share/doc/cairn/copyright
)
for path in "${expect[@]}"; do
  if ! grep -qxF "$path" <<<"$listing"; then
    echo "missing from the package: $path" >&2
    fail=1
  fi
done
# One page per visible subcommand: as many pages as `cairn help` lists commands, and more.
n_pages=$(grep -c '^\./usr/share/man/man1/cairn.*\.1\.gz$' <<<"$listing" || true)
echo "man pages: $n_pages"
if grep -q 'man1/.*\.1$' <<<"$listing"; then
  echo "a man page is not gzipped" >&2
  fail=1
fi
((fail == 0)) || { dpkg-deb -c "$deb" >&2; exit 1; }

# Errors fail; warnings and the rest are printed.
lintian_out=$(lintian --tag-display-limit 0 "$deb" 2>&1) || true
[[ -n $lintian_out ]] && echo "$lintian_out"
if grep -q '^E: ' <<<"$lintian_out"; then
  echo "lintian found errors in $deb (above)" >&2
  exit 1
fi

# The unit and binary as installed, with the package's man pages for Documentation=.
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -x "$deb" "$unpacked"
packaging/verify-unit.sh "$unpacked/usr/lib/systemd/system/cairn.service" \
  "$unpacked/usr/bin/cairn" "$unpacked/usr/share/man"
echo "package ok: $deb"
