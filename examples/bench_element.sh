#!/usr/bin/env bash
# Throughput of the codiff element in a real pipeline: a 1280x720 stream of N
# JPEG-compressed frames (videotestsrc -> jpegenc quality 20 -> jpegdec) through
# codiff into fakesink, against the same pipeline without codiff.
#   bash examples/bench_element.sh [FRAMES] [extra codiff properties...]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}; shift || true
cargo build --release --lib -q
export GST_PLUGIN_PATH=${CARGO_TARGET_DIR:-$PWD/target}/release
src="videotestsrc num-buffers=$n pattern=smpte ! video/x-raw,width=1280,height=720,format=I420,framerate=30/1 ! jpegenc quality=20 ! jpegdec"
run() {
    local t0 t1
    t0=$(date +%s.%N)
    gst-launch-1.0 -q $src ! "$@" ! fakesink sync=false >/dev/null
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'
}
base=$(run identity)
with=$(run codiff "$@")
awk -v n="$n" -v a="$base" -v b="$with" 'BEGIN {
    printf "1280x720, %d frames: without codiff %.2f s, with codiff %.2f s -> %.2f fps (%.3f s per frame)\n", n, a, b, n / (b - a), (b - a) / n }'
