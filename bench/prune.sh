#!/usr/bin/env bash
# Prunes the benchmark image series with cairn, restic and borg side by side, in one run,
# and prints one table: forget+prune seconds, repository bytes before and after, bytes
# freed. Each tool first backs up server-v1, v2, v3 (untimed), then forgets all but the
# last snapshot and gives the space back, timed with page caches dropped before every
# step (when run as root), so every tool starts cold:
#   cairn:  cairn forget server --keep-last 1; cairn prune --json
#   restic: restic forget --keep-last 1 --group-by host --prune (restic groups by host
#           and paths by default; v1, v2, v3 are three paths, so without --group-by host
#           each is the last of its own group and nothing is forgotten)
#   borg:   borg prune --keep-last 1; borg compact
# Then each tool restores v3 (untimed), checked byte for byte against the original.
#   usage: bench/prune.sh [IMAGES_DIR] [WORK_DIR]
#   IMAGES_DIR holds server-v{1,2,3}.img; they are built with ../shared/bench/make-images.sh
#   when missing (needs root). WORK_DIR holds the repositories (default /tmp/cairn-prune-bench).
#   cairn's prune report is kept in WORK_DIR/cairn-prune.json.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
images=${1:-$here/bench/out/images}
work=${2:-/tmp/cairn-prune-bench}

if [ ! -f "$images/server-v3.img" ]; then
  echo "building the image series in $images (a few minutes)..." >&2
  bash "$here/../shared/bench/make-images.sh" "$images" >&2
fi
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v bc >/dev/null || need+=(bc)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null
fi
(cd "$here" && cargo build --release --locked -q -p cairn-node)
cairn=${CARGO_TARGET_DIR:-$here/target}/release/cairn

rm -rf "$work"; mkdir -p "$work"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes CAIRN_DATA_DIR=$work/cairn
drop_caches() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }
# run CMD...: runs CMD quietly, showing its stderr only when it fails
run() { "$@" >"$work/last.out" 2>"$work/last.err" || { cat "$work/last.out" "$work/last.err" >&2; exit 1; }; }
# timed CMD...: runs CMD with caches dropped, prints elapsed seconds
timed() { drop_caches; local t0 t1; t0=$(date +%s.%N); run "$@"; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
size() { du -sb "$1" | cut -f1; }

# The whole data directory or repository counts: packs, index, snapshots, keys.
declare -A T B A
run "$cairn" init --site-name bench
run restic init -q --repo "$work/restic"
run borg init --encryption repokey "$work/borg"
for v in 1 2 3; do
  img=$images/server-v$v.img
  run "$cairn" backup server "$img"
  run restic -q --repo "$work/restic" backup "$img"
  run borg create --compression zstd,3 "$work/borg::v$v" "$img"
done
B[cairn]=$(size "$work/cairn"); B[restic]=$(size "$work/restic"); B[borg]=$(size "$work/borg")

t1=$(timed "$cairn" forget server --keep-last 1)
t2=$(timed "$cairn" prune --json); cp "$work/last.out" "$work/cairn-prune.json"
T[cairn]=$(echo "$t1 + $t2" | bc); A[cairn]=$(size "$work/cairn")
T[restic]=$(timed restic -q --repo "$work/restic" forget --keep-last 1 --group-by host --prune)
A[restic]=$(size "$work/restic")
t1=$(timed borg prune --keep-last 1 "$work/borg")
t2=$(timed borg compact "$work/borg")
T[borg]=$(echo "$t1 + $t2" | bc); A[borg]=$(size "$work/borg")

mkdir -p "$work/out"
run "$cairn" restore server "$work/out/cairn.img"
cmp "$work/out/cairn.img" "$images/server-v3.img"
run restic -q --repo "$work/restic" restore latest --target "$work/out/restic"
cmp "$work/out/restic$images/server-v3.img" "$images/server-v3.img"
mkdir -p "$work/out/borg"
(cd "$work/out/borg" && run borg extract --sparse "$work/borg::v3")
cmp "$work/out/borg${images}/server-v3.img" "$images/server-v3.img"

mib() { echo "scale=1; $1 / 1048576" | bc; }
printf '%-7s %18s %12s %12s %12s\n' tool "forget+prune s" "before MiB" "after MiB" "freed MiB"
for tool in cairn restic borg; do
  printf '%-7s %18.2f %12s %12s %12s\n' "$tool" "${T[$tool]}" "$(mib "${B[$tool]}")" \
    "$(mib "${A[$tool]}")" "$(mib $((B[$tool] - A[$tool])))"
done
best=$(printf '%s\n%s\n' "${T[restic]}" "${T[borg]}" | sort -g | head -1)
echo
echo "forget+prune: cairn takes $(echo "scale=3; ${T[cairn]} / $best" | bc) of the faster other tool's time (target <= 0.25)"
echo "left after prune: cairn $(mib "${A[cairn]}") MiB, borg $(mib "${A[borg]}") MiB (target: cairn <= borg)"
echo "cairn prune report: $work/cairn-prune.json"
echo "all three restores matched server-v3.img byte for byte"
