#!/usr/bin/env bash
# No slower? Runs the bench built at BASE (a commit) and at the working tree
# in interleaved rounds on the same machine, so that drift hits both alike.
#
#   bash examples/bench_versions.sh BASE ROUNDS [-- BENCH OPTIONS...]
#   bash examples/bench_versions.sh 921f3cb 3 -- --model compact --sizes 1280x720
#
# BASE builds in target/same-outputs-base (as examples/same_outputs.sh), the
# working tree in CARGO_TARGET_DIR or ./target. Prints each run's line with
# its side, then the median total of each side and their ratio.
set -euo pipefail
base=${1:?usage: bench_versions.sh BASE ROUNDS [-- BENCH OPTIONS...]}
rounds=${2:?usage: bench_versions.sh BASE ROUNDS [-- BENCH OPTIONS...]}
shift 2
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
(cd "$work/base" && CARGO_TARGET_DIR=$target/same-outputs-base cargo build --release --example bench -q)
cp "$target/same-outputs-base/release/examples/bench" "$work/bench-base"
CARGO_TARGET_DIR=$target cargo build --release --example bench -q
cp "$target/release/examples/bench" "$work/bench-head"
# the compact model is found from the build's source tree: point both at this one
export CODIFF_WEIGHTS=${CODIFF_WEIGHTS:-$root/weights/codiff-cave-compact.safetensors}
for k in $(seq 1 "$rounds"); do
    for side in base head; do
        "$work/bench-$side" "$@" | grep -E '^[0-9]+x[0-9]+: total' | sed "s/^/$side $k: /" | tee -a "$work/lines"
    done
done
python3 - "$work/lines" <<'EOF'
import re, statistics, sys
t = {"base": [], "head": []}
for line in open(sys.argv[1]):
    m = re.match(r"(base|head) \d+: \S+: total ([0-9.]+) s", line)
    if m:
        t[m.group(1)].append(float(m.group(2)))
b, h = statistics.median(t["base"]), statistics.median(t["head"])
print(f"median total: base {b:.3f} s, head {h:.3f} s, head/base {h / b:.3f}")
EOF
