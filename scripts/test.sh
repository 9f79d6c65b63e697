#!/usr/bin/env bash
# Runs the whole test suite: lint, then every unit, integration and end-to-end test.
# Needs root (eBPF, network namespaces, cgroups); installs system packages first.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# A clean checkout gains nothing from incremental compilation, and its caches double the
# target directory; a CI machine with little free disk then fails at link (ld: Bus error).
[ "${CI:-}" = "true" ] && export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== shellcheck"
shellcheck scripts/*.sh fuzz/*.sh .ci/run
# -x: the kind scripts source multicluster-kind/lib.sh.
shellcheck -x multicluster-kind/*.sh
echo "== fuzz targets (2 s each; scripts/fuzz.sh --time 600 for a real run)"
bash scripts/fuzz.sh --time 2
echo "== tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
# nextest prints its summary as the last line.
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --profile "$profile"
fi
echo "cargo-nextest not found: falling back to cargo test"
exec cargo test --workspace
