#!/usr/bin/env bash
# Backs up the benchmark image series with cairn, restic and borg side by side, in one run,
# and prints one table: backup time of v1, v2, v3; stored bytes after each; restore time of
# v3 (checked byte for byte against the original). Page caches are dropped before every
# timed step when this runs as root, so every tool starts cold.
#   usage: bench/compare.sh [IMAGES_DIR] [WORK_DIR]
#   IMAGES_DIR holds server-v{1,2,3}.img; they are built with ../shared/bench/make-images.sh
#   when missing (needs root). WORK_DIR holds the repositories (default /tmp/cairn-bench).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
images=${1:-$here/bench/out/images}
work=${2:-/tmp/cairn-bench}

if [ ! -f "$images/server-v3.img" ]; then
  echo "building the image series in $images (a few minutes)..." >&2
  bash "$here/../shared/bench/make-images.sh" "$images" >&2
fi
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null
fi
(cd "$here" && cargo build --release --locked -q -p cairn-node)
cairn=$here/target/release/cairn

rm -rf "$work"; mkdir -p "$work"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes CAIRN_DATA_DIR=$work/cairn
drop_caches() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }
# timed CMD...: runs CMD with caches dropped, prints elapsed seconds
timed() { drop_caches; local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$work/last.err" || { cat "$work/last.err" >&2; exit 1; }; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
size() { du -sb "$1" | cut -f1; }

declare -A T S
"$cairn" init --site-name bench >/dev/null
restic init -q --repo "$work/restic"
borg init --encryption repokey "$work/borg" >/dev/null 2>&1
for v in 1 2 3; do
  img=$images/server-v$v.img
  T[cairn,$v]=$(timed "$cairn" backup server "$img");                 S[cairn,$v]=$(size "$work/cairn/store")
  T[restic,$v]=$(timed restic -q --repo "$work/restic" backup "$img"); S[restic,$v]=$(size "$work/restic")
  T[borg,$v]=$(timed borg create --compression zstd,3 "$work/borg::v$v" "$img"); S[borg,$v]=$(size "$work/borg")
done

mkdir -p "$work/out"
T[cairn,r]=$(timed "$cairn" restore server "$work/out/cairn.img")
cmp "$work/out/cairn.img" "$images/server-v3.img"
T[restic,r]=$(timed restic -q --repo "$work/restic" restore latest --target "$work/out/restic")
cmp "$work/out/restic$images/server-v3.img" "$images/server-v3.img"
mkdir -p "$work/out/borg"
T[borg,r]=$(cd "$work/out/borg" && timed borg extract --sparse "$work/borg::v3")
cmp "$work/out/borg${images}/server-v3.img" "$images/server-v3.img"

mib() { echo "scale=1; $1 / 1048576" | bc; }
printf '%-7s %12s %12s %12s %12s %12s %12s %12s\n' tool "backup v1 s" "backup v2 s" "backup v3 s" "stored v1 MiB" "stored v2 MiB" "stored v3 MiB" "restore v3 s"
for tool in cairn restic borg; do
  printf '%-7s %12.2f %12.2f %12.2f %12s %12s %12s %12.2f\n' "$tool" "${T[$tool,1]}" "${T[$tool,2]}" "${T[$tool,3]}" \
    "$(mib "${S[$tool,1]}")" "$(mib "${S[$tool,2]}")" "$(mib "${S[$tool,3]}")" "${T[$tool,r]}"
done
ratio() { # cairn time / fastest other tool's time
  local best; best=$(printf '%s\n%s\n' "$2" "$3" | sort -g | head -1); echo "scale=3; $1 / $best" | bc; }
echo
for v in 1 2 3; do echo "backup v$v: cairn takes $(ratio "${T[cairn,$v]}" "${T[restic,$v]}" "${T[borg,$v]}") of the faster other tool's time (target <= 0.25)"; done
echo "restore v3: cairn takes $(ratio "${T[cairn,r]}" "${T[restic,r]}" "${T[borg,r]}") of the faster other tool's time (target <= 0.25)"
echo "stored after v3: cairn $(mib "${S[cairn,3]}") MiB, borg $(mib "${S[borg,3]}") MiB (target: cairn <= borg)"
echo "all three restores matched server-v3.img byte for byte"
