#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer; see ARCHITECTURE.md "Fuzzing") and
# prints, per target, the executions and crashes from libFuzzer's final stats.
#
# Usage: scripts/fuzz.sh [TARGET...] [--time SECONDS | --runs N] [--list]
#   no TARGET: every target, one after the other. Default: --time 60.
#   --runs N stops each target after N executions (e.g. --runs 1000000).
# Needs the nightly toolchain and cargo-fuzz (scripts/setup.sh --fuzz installs them).
# Seeds are read from fuzz/corpus/TARGET (committed, never written); what libFuzzer finds is
# kept in fuzz/target/corpus/TARGET; crashes go to fuzz/artifacts/TARGET/ and make the
# script exit 1, naming the reproducer (`cargo +nightly fuzz run TARGET FILE` replays it).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
# Always fuzz/target: its ASan builds share nothing with the workspace's target dir.
export CARGO_TARGET_DIR="$PWD/target"

limit=(-max_total_time=60)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) limit=("-max_total_time=$2"); shift 2 ;;
    --runs) limit=("-runs=$2"); shift 2 ;;
    --list) cargo +nightly fuzz list; exit 0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: needs the nightly toolchain and cargo-fuzz: run scripts/setup.sh --fuzz" >&2
  exit 1
fi
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

# libFuzzer options per target, besides the limit.
extra_args() {
  case "$1" in
    # crd.rs promotes each registered CRD's names to 'static (Box::leak, as served types are
    # `&'static ResourceType`): by design, once per CRD in the lab, once per input here.
    lab_object) echo "-detect_leaks=0" ;;
  esac
}
asan_options() {
  case "$1" in
    lab_object) echo "detect_leaks=0" ;;
  esac
}

echo "== building the fuzz targets (nightly, release, ASan)"
if ! build_log=$(cargo +nightly fuzz build -O 2>&1); then
  echo "$build_log" | grep -E '^error' -A8 >&2
  echo "fuzz.sh: build failed" >&2
  exit 1
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
rows=()
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t" "corpus/$t"
  log="$logs/$t.log"
  set +e
  # shellcheck disable=SC2046 # extra_args is a list of words
  ASAN_OPTIONS="$(asan_options "$t")" cargo +nightly fuzz run -O "$t" "target/corpus/$t" "corpus/$t" -- \
    "${limit[@]}" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 $(extra_args "$t") >"$log" 2>&1
  rc=$?
  set -e
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  execs=$(stat number_of_executed_units)
  speed=$(stat average_exec_per_sec)
  corpus=$(grep -oE 'corp: [0-9]+/' "$log" | tail -1 | tr -dc 0-9)
  crashes=0
  result=ok
  if [ "$rc" -ne 0 ]; then
    crashes=1
    result="CRASH: $(grep -m1 -oE 'Test unit written to [^ ]+' "$log" | sed 's/Test unit written to //')"
    failed=1
    echo "---- $t failed (exit $rc); last lines of its log:"
    grep -E 'panicked|ERROR|SUMMARY|Test unit' "$log" | head -8
  fi
  rows+=("$(printf '%-15s %12s %8s %7s %8s  %s' "$t" "${execs:-?}" "${speed:-?}" "${corpus:-?}" "$crashes" "$result")")
done

printf '%-15s %12s %8s %7s %8s  %s\n' target executions exec/s corpus crashes result
printf '%s\n' "${rows[@]}"
exit $failed
