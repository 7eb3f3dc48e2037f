#!/usr/bin/env bash
# Runs every test: unit tests, the simulator, and the namespace end-to-end tests
# (these need root; without it they say so and skip).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# The end-to-end tests drive the release binary.
cargo build --release --locked -p meshnet
cargo test --release --locked --workspace -- --test-threads="${MESHNET_TEST_THREADS:-2}"
