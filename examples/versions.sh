#!/usr/bin/env bash
# The working tree against an earlier commit, for refactors that must change
# nothing and make nothing slower.
#
#   bash examples/versions.sh outputs BASE [-- RESTORE OPTIONS...]
#   bash examples/versions.sh bench BASE ROUNDS [-- BENCH OPTIONS...]
#
# outputs: restores the README sample (examples/data/astronaut-q10.jpg) and
#   the evaluation photos (data/eval, fetched by examples/get_images.py when
#   missing) as JPEG at quality 10 and 30 with the still command built at
#   BASE and at the working tree, and compares every output byte for byte;
#   exit status 0 when all are identical.
# bench: runs the bench of BASE and of the working tree in interleaved rounds
#   (drift hits both alike), e.g. `bench 921f3cb 3 -- --model compact --sizes
#   1280x720`; prints each run's line with its side, then the median totals
#   and their ratio.
#
# BASE builds in target/same-outputs-base (cargo gives a workspace's crates
# the same hashes wherever the checkout is, so the two builds must not share
# a target dir), the working tree in CARGO_TARGET_DIR or ./target.
set -euo pipefail
usage="usage: versions.sh outputs BASE [-- OPTIONS] | versions.sh bench BASE ROUNDS [-- OPTIONS]"
cmd=${1:?$usage}
base=${2:?$usage}
shift 2
rounds=1
if [ "$cmd" = bench ]; then
    rounds=${1:?$usage}
    shift
elif [ "$cmd" != outputs ]; then
    echo "$usage" >&2
    exit 2
fi
[ "${1:-}" = "--" ] && shift
root=$(git rev-parse --show-toplevel)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
work=$(mktemp -d)
cleanup() {
    git worktree remove --force "$work/base" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
git worktree add --detach "$work/base" "$base" >/dev/null

example=restore
[ "$cmd" = bench ] && example=bench
build() { # folder, target dir, binary copy
    (cd "$1" && CARGO_TARGET_DIR=$2 cargo build --release --example "$example" -q)
    cp "$2/release/examples/$example" "$3"
}
echo "versions: building $base"
build "$work/base" "$target/same-outputs-base" "$work/$example-base"
echo "versions: building the working tree"
build "$root" "$target" "$work/$example-head"

if [ "$cmd" = bench ]; then
    # the compact model is found from the build's source tree: point both at this one
    export CODIFF_WEIGHTS=${CODIFF_WEIGHTS:-$root/weights/codiff-cave-compact.safetensors}
    for k in $(seq 1 "$rounds"); do
        for side in base head; do
            "$work/bench-$side" "$@" | grep -E '^[0-9]+x[0-9]+: total' | sed "s/^/$side $k: /" | tee -a "$work/lines"
        done
    done
    python3 - "$work/lines" <<'EOF2'
import re, statistics, sys
t = {"base": [], "head": []}
for line in open(sys.argv[1]):
    m = re.match(r"(base|head) \d+: \S+: total ([0-9.]+) s", line)
    if m:
        t[m.group(1)].append(float(m.group(2)))
b, h = statistics.median(t["base"]), statistics.median(t["head"])
print(f"median total: base {b:.3f} s, head {h:.3f} s, head/base {h / b:.3f}")
EOF2
    exit 0
fi

[ -d data/eval ] || python3 examples/get_images.py data
mkdir -p "$work/in"
cp examples/data/astronaut-q10.jpg "$work/in/"
python3 - "$work/in" data/eval/*.png <<'EOF2'
import sys, os
from PIL import Image
out = sys.argv[1]
for p in sys.argv[2:]:
    im = Image.open(p).convert("RGB")
    stem = os.path.splitext(os.path.basename(p))[0]
    for q in (10, 30):
        im.save(os.path.join(out, f"{stem}-q{q}.jpg"), quality=q)
EOF2
for side in base head; do
    "$work/restore-$side" --out-dir "$work/out-$side" "$@" "$work/in" >/dev/null 2>"$work/log-$side" ||
        { cat "$work/log-$side" >&2; exit 1; }
done
n=0
differ=0
for f in "$work/out-base"/*; do
    name=$(basename "$f")
    n=$((n + 1))
    if ! cmp -s "$f" "$work/out-head/$name"; then
        echo "DIFFERS: $name"
        differ=$((differ + 1))
    fi
done
[ "$n" -gt 0 ] || { echo "versions: no outputs" >&2; exit 1; }
[ "$(ls "$work/out-head" | wc -l)" -eq "$n" ] || { echo "versions: output counts differ" >&2; exit 1; }
echo "versions: $n images, $differ differ ($base vs working tree)"
[ "$differ" -eq 0 ]
