#!/usr/bin/env bash
# On a GPU machine: the GPU tests on prebuilt builds, then `apex4gen bench --breakdown` on the builds to time.
# Builds are made beforehand (`apex4gen build ...`, also on a machine without a GPU) and passed as arguments:
#   scripts/device_check.sh TEST_BUILD[:TEST_BUILD...] [BENCH_BUILD...]
# Writes gpu.txt (GPU name and clocks), gpu-tests.log and bench-<build>.{log,json} to $OUT (default ./device-logs).
# bench/README.md says which builds and commands make each table of bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$out/gpu.txt"
test_builds=$1
shift
APEX4GEN_TEST_BUILDS=$test_builds python3 -m pytest -v -ra -m gpu tests > "$out/gpu-tests.log" 2>&1; tail -n 25 "$out/gpu-tests.log"
for b in "$@"; do
  python3 -m apex4gen bench "$b" --breakdown --json "$out/bench-$(basename "$b").json" 2>&1 | tee "$out/bench-$(basename "$b").log"
done
