#!/usr/bin/env bash
# GPU check, run on the GPU machine from the repo root with gpu-bundle/ (made by
# build-aux/build-cuda.sh on any x86-64 Linux machine) next to the tracked files:
#
#   bash build-aux/gpu-check.sh
#
# Needs no Rust and no network: the CUDA 13 libraries come from the machine's
# PyTorch nvidia-* wheels (and/or /usr/local/cuda/lib64), libcuda from the driver.
# Steps, each under its own timeout (about 7 minutes in all): library check,
# nvidia-smi, parity test on cuda:0 (f32, the CPU tolerances), full-size CODiff
# bench in f16 at 512x512, 1024x1024 and 1920x1080, compact CaVE model at
# 1280x720 (frames/s). All output also goes to $OUT/gpu-check.log when $OUT is set.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu-check.log") 2>&1
fi
BUNDLE=gpu-bundle
DEVICE=${CODIFF_GPU_DEVICE:-cuda:0}
FAILED=()
T0=$SECONDS
step() { printf '\n=== [%3ds] %s\n' $((SECONDS - T0)) "$*"; }
# run NAME SECONDS CMD...: run under a timeout, remember failures
run() {
    local name=$1 secs=$2
    shift 2
    timeout -k 10 "$secs" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED+=("$name (rc $rc$([ $rc -eq 124 ] && echo ", timed out after ${secs}s"))")
    fi
    return $rc
}

step "bundle"
TARBALL=$BUNDLE/codiff-cuda-bin.tar.xz
[ -s "$TARBALL" ] || { echo "missing $TARBALL: run build-aux/build-cuda.sh first and carry gpu-bundle/"; exit 1; }
cat "$BUNDLE/BUILD-INFO.txt" 2>/dev/null
echo "repo HEAD: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
command -v "$PY" >/dev/null 2>&1 || PY=python3
B=$(mktemp -d "${TMPDIR:-/tmp}/codiff-gpu-bin.XXXXXX")
trap 'rm -rf "$B"' EXIT
if command -v xz >/dev/null 2>&1; then
    tar -C "$B" -xJf "$TARBALL"
else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$TARBALL" "$B"
fi || { echo "cannot unpack $TARBALL"; exit 1; }
ls -l "$B"

step "CUDA libraries"
LIBDIRS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os
import nvidia  # namespace package of the nvidia-* wheels
dirs = []
for base in nvidia.__path__:
    dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "lib")) if os.path.isdir(d))
print(":".join(dirs))
EOF
)
echo "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo 'no torch'))"
echo "nvidia wheel lib folders: ${LIBDIRS:-none found}"
for d in /usr/local/cuda/lib64; do
    if [ -d "$d" ]; then
        echo "also: $d"
        LIBDIRS=${LIBDIRS:+$LIBDIRS:}$d
    fi
done
export LD_LIBRARY_PATH=$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$B/parity-test" | grep -E 'cuda|cublas|curand|nvrtc|cudart|stdc|not found'
if ldd -r "$B/bench" 2>&1 | grep -E 'not found|undefined symbol'; then
    FAILED+=("libraries (see above)")
    echo "!!! unresolved libraries or symbols: the steps below will fail"
fi

step "nvidia-smi"
run nvidia-smi 20 nvidia-smi

step "parity test on $DEVICE (f32, CPU tolerances)"
# The test binary finds tests/fixtures through CARGO_MANIFEST_DIR, as under cargo.
CARGO_MANIFEST_DIR=$ROOT CODIFF_TEST_DEVICE=$DEVICE run parity 120 \
    "$B/parity-test" --test-threads=1 --nocapture

step "bench: full-size CODiff, f16, $DEVICE"
run bench-full 230 "$B/bench" --model full --device "$DEVICE" --precision f16 \
    --sizes 512x512,1024x1024,1920x1080 --warmup --runs 2

step "bench: compact model (CaVE), 1280x720, $DEVICE"
LOG=$(mktemp)
CODIFF_WEIGHTS=$ROOT/weights/codiff-cave-compact.safetensors run bench-compact 80 \
    "$B/bench" --model compact --device "$DEVICE" --sizes 1280x720 --warmup --runs 10 > "$LOG"
cat "$LOG"
awk '/^1280x720: total/ { s += $3; n++ } END { if (n) printf "compact 1280x720: %.1f frames/s (mean of %d runs, %.4f s/frame)\n", n / s, n, s / n }' "$LOG"
rm -f "$LOG"

step "summary (${SECONDS}s)"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu-check: all steps passed"
else
    printf 'gpu-check: FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
