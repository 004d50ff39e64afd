#!/bin/sh
# Used by meson.build:
#   cargo-build.sh SRCDIR TARGETDIR PROFILEDIR DATADIR OUTPUT CARGO [CARGO_ARGS...]
# Runs `cargo build --lib CARGO_ARGS` (which name the profile) with
# CODIFF_DATADIR=DATADIR, the folder the installed plugin takes its default
# weights from, and copies the plugin from TARGETDIR/PROFILEDIR to OUTPUT.
set -eu
src=$1
target=$2
profile_dir=$3
datadir=$4
out=$5
cargo=$6
shift 6
CODIFF_DATADIR=$datadir "$cargo" build --lib --manifest-path "$src/Cargo.toml" --target-dir "$target" "$@"
cp "$target/$profile_dir/libgstcodiff.so" "$out"
