#!/usr/bin/env bash
# Runs `systemd-analyze verify` on cairn.service as it would be installed: in a temporary
# root holding the system's own units, the unit at /usr/lib/systemd/system and the binary
# at /usr/bin/cairn, so the real file is checked (ExecStart must exist) without touching
# this machine's /usr. Any message from verify fails, not just its exit code, since it
# only warns about unknown keys and bad values.
#   packaging/verify-unit.sh UNIT BINARY [MANDIR]
set -euo pipefail
unit=$1 binary=$2 mandir=${3:-}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$binary" "$root/usr/bin/cairn"
cp "$unit" "$root/usr/lib/systemd/system/cairn.service"
man=(--man=no)
if [[ -n $mandir ]]; then
  # verify runs man(1) on each Documentation= page; point it at the package's pages.
  export MANPATH=$mandir
  man=(--man=yes)
fi
out=$(systemd-analyze --root="$root" "${man[@]}" verify "$root/usr/lib/systemd/system/cairn.service" 2>&1) || {
  echo "$out" >&2
  echo "systemd-analyze verify failed on $unit" >&2
  exit 1
}
if [[ -n $out ]]; then
  echo "$out" >&2
  echo "systemd-analyze verify complained about $unit (above)" >&2
  exit 1
fi
echo "systemd-analyze verify: $unit is clean"
