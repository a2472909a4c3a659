#!/bin/sh
# Builds the libFuzzer target with the stable toolchain (coverage instrumentation
# only, no sanitizer: the code under test is safe Rust) and runs it for
# ${1:-60} seconds. cargo-fuzz is not needed. The --target flag keeps the
# instrumentation away from build scripts.
set -eu
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo build --release --target "$triple" --bin validation
mkdir -p corpus/validation
"$CARGO_TARGET_DIR/$triple/release/validation" -max_total_time="${1:-60}" \
  -max_len=4096 corpus/validation
