#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what they need first. Idempotent:
# safe to run again and again, on a fresh machine or in CI (.ci/run calls it).
#
# What the tests need today: the Rust toolchain with rustfmt and clippy. No external server:
# integration tests start the real `sextant` binary on loopback ports with temporary data dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs, then run this again" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== all tests passed"
