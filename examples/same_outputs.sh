#!/usr/bin/env bash
# Behaviour unchanged? Restores the same images with the still command built
# at BASE (a commit) and at the working tree, and compares every output byte
# for byte. For refactors that must not change a pixel.
#
#   bash examples/same_outputs.sh BASE [-- RESTORE OPTIONS...]
#
# The images: the README sample (examples/data/astronaut-q10.jpg) and the
# evaluation photos (data/eval, fetched by examples/get_images.py when
# missing) as JPEG at quality 10 and 30. BASE builds in a target dir of its
# own, target/same-outputs-base (cargo gives a workspace's crates the same
# hashes wherever the checkout is, so the two builds must not share one), the
# working tree in CARGO_TARGET_DIR or ./target. Exit status 0 when all
# outputs are identical.
set -euo pipefail
base=${1:?usage: same_outputs.sh BASE [-- RESTORE OPTIONS...]}
shift
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

[ -d data/eval ] || python3 examples/get_images.py data
mkdir -p "$work/in"
cp examples/data/astronaut-q10.jpg "$work/in/"
python3 - "$work/in" data/eval/*.png <<'EOF'
import sys, os
from PIL import Image
out = sys.argv[1]
for p in sys.argv[2:]:
    im = Image.open(p).convert("RGB")
    stem = os.path.splitext(os.path.basename(p))[0]
    for q in (10, 30):
        im.save(os.path.join(out, f"{stem}-q{q}.jpg"), quality=q)
EOF

build() { # folder, target dir, binary copy
    (cd "$1" && CARGO_TARGET_DIR=$2 cargo build --release --example restore -q)
    cp "$2/release/examples/restore" "$3"
}
git worktree add --detach "$work/base" "$base" >/dev/null
echo "same_outputs: building $base"
build "$work/base" "$target/same-outputs-base" "$work/restore-base"
echo "same_outputs: building the working tree"
build "$root" "$target" "$work/restore-head"

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
[ "$n" -gt 0 ] || { echo "same_outputs: no outputs" >&2; exit 1; }
[ "$(ls "$work/out-head" | wc -l)" -eq "$n" ] || { echo "same_outputs: output counts differ" >&2; exit 1; }
echo "same_outputs: $n images, $differ differ ($base vs working tree)"
[ "$differ" -eq 0 ]
