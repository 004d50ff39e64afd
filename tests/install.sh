#!/usr/bin/env bash
# Install test: `meson install` into a temporary prefix, then run the README's
# demo pipeline from a folder outside the checkout with only the installed
# files (GST_PLUGIN_PATH at the prefix, a private registry, no CODIFF_WEIGHTS),
# and check that the plugin takes its default weights from <prefix>/share/codiff.
#
#   bash tests/install.sh [CARGO_PROFILE]      # run by .ci/test
#
# CARGO_PROFILE (default dev) is meson's -Dcargo-profile: dev reuses the debug
# build of .ci/test's `cargo build --lib --examples`, release that of
# `cargo build --release --examples`. The plugin's cargo build also builds one
# example (-Dcargo-args=--example=restore) so that cargo resolves features with
# the dev-dependencies, as those builds did, and compiles only the plugin crate
# again (for its data directory) and that example, not every dependency.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${1:-dev}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/codiff-install.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PREFIX=$TMP/prefix
fail() { echo "install test: FAIL: $*" >&2; exit 1; }

meson setup "$TMP/build" "$ROOT" --prefix="$PREFIX" -Dcargo-target-dir="$TARGET" \
    -Dcargo-profile="$PROFILE" -Dcargo-args=--example=restore >"$TMP/setup.log" 2>&1 || { cat "$TMP/setup.log"; fail "meson setup"; }
meson install -C "$TMP/build" >"$TMP/install.log" 2>&1 || { cat "$TMP/install.log"; fail "meson install"; }

PLUGIN=$(find "$PREFIX" -name libgstcodiff.so -path '*/gstreamer-1.0/*')
WEIGHTS=$PREFIX/share/codiff/codiff-cave-compact.safetensors
[ -n "$PLUGIN" ] || fail "no libgstcodiff.so under $PREFIX"
[ -s "$WEIGHTS" ] || fail "no $WEIGHTS"
cmp -s "$WEIGHTS" "$ROOT/weights/codiff-cave-compact.safetensors" || fail "installed weights differ from weights/"
echo "installed: ${PLUGIN#$PREFIX/} and ${WEIGHTS#$PREFIX/}"

# A clean environment outside the checkout: only the installed plugin, a fresh
# registry, no weights override.
RUN=$TMP/run
mkdir -p "$RUN"
cd "$RUN"
unset CODIFF_WEIGHTS
export GST_PLUGIN_PATH=$(dirname "$PLUGIN")
export GST_REGISTRY=$TMP/registry.bin

# The installed plugin's default `weights` is the prefix's file.
gst-inspect-1.0 codiff >"$TMP/inspect.txt" 2>&1 || { cat "$TMP/inspect.txt"; fail "gst-inspect-1.0 codiff"; }
grep -q "Filename *$PLUGIN" "$TMP/inspect.txt" || { cat "$TMP/inspect.txt"; fail "codiff not loaded from $PLUGIN"; }
# Its origin is this project (Cargo.toml's repository), not the model's repository.
REPOSITORY=$(sed -n 's/^repository = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml")
grep -q "Origin URL *$REPOSITORY\$" "$TMP/inspect.txt" || { grep 'Origin URL' "$TMP/inspect.txt"; fail "origin is not $REPOSITORY"; }
grep -A3 '^  weights ' "$TMP/inspect.txt" | grep -q "Default: \"$WEIGHTS\"" ||
    { grep -A3 '^  weights ' "$TMP/inspect.txt"; fail "default weights are not $WEIGHTS"; }

# The README demo pipeline (JPEG -> jpegdec -> codiff -> PNG) on a JPEG made
# here, at quality 10, so that no file of the checkout is read.
gst-launch-1.0 -q videotestsrc num-buffers=1 pattern=smpte ! video/x-raw,width=256,height=192 ! \
    jpegenc quality=10 ! filesink location=in-q10.jpg || fail "making the input JPEG"
gst-launch-1.0 -m filesrc location=in-q10.jpg ! jpegdec ! codiff ! \
    videoconvert ! pngenc ! filesink location=restored.png >"$TMP/demo.log" 2>&1 ||
    { cat "$TMP/demo.log"; fail "demo pipeline"; }
grep -q 'codiff-qf' "$TMP/demo.log" || { cat "$TMP/demo.log"; fail "no codiff-qf message"; }
[ -s restored.png ] || fail "no restored.png"
echo "install test: ok ($(grep -o 'qf=([a-z]*)[0-9.]*' "$TMP/demo.log" | head -1); weights from $WEIGHTS)"
