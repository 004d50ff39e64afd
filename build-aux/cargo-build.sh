#!/bin/sh
# Used by meson.build: cargo-build.sh SRCDIR TARGETDIR OUTPUT CARGO [CARGO_ARGS...]
# Runs `cargo build --release` and copies the plugin to OUTPUT.
set -eu
src=$1
target=$2
out=$3
cargo=$4
shift 4
"$cargo" build --release --manifest-path "$src/Cargo.toml" --target-dir "$target" "$@"
cp "$target/release/libgstcodiff.so" "$out"
