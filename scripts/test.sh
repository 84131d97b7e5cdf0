#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, checks formatting and
# lints, builds every binary, then runs every test against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads="${GRID_TEST_THREADS:-4}"
