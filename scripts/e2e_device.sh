#!/usr/bin/env bash
# End to end on an H100 (bench/results/h100/e2e.md), in two invocations of at most ~9 minutes each (logs under $OUT):
#   scripts/e2e_device.sh build   # the four builds (two at a time), the engine's GPU tests, the ops' tests on one build
#   scripts/e2e_device.sh bench   # apex4gen e2e-bench for every case, then a short table
# `bench` builds whatever `build` did not leave (a no-op for builds already there, e.g. carried in generated/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
a4g() { python3 -m apex4gen "$@"; }
L7=generated/e2e-h100-llama2-7b
L7CH=generated/e2e-h100-llama2-7b-channel
L8=generated/e2e-h100-llama3-8b
L70=generated/e2e-h100-llama2-70b
# 16-bit llama2-70b layers that fit an 80 GB H100 with the decode cache of batch 64 (1.67 GiB a layer)
FP_LAYERS_70B=40

builds() {
  # llama3-8b and llama2-70b share no kernel; the llama2-7b plans' kernels are theirs but one, so they build
  # second, from the object cache. 2 builds x 10 nvcc (~4 GB each) at a time on 16 cores.
  local start=$SECONDS
  a4g build --gpu h100-sxm --model llama3-8b --out $L8 -j 10 > "$out/build-a.log" 2>&1 &
  a4g build --gpu h100-sxm --model llama2-70b --out $L70 -j 10 > "$out/build-b.log" 2>&1 &
  wait
  a4g build --gpu h100-sxm --model llama2-7b --out $L7 -j 8 > "$out/build-c.log" 2>&1 &
  a4g build --gpu h100-sxm --model llama2-7b --budget specs/budgets/budget-channel.yaml --out $L7CH -j 8 > "$out/build-d.log" 2>&1 &
  wait
  cat "$out"/build-[abcd].log > "$out/build.log"
  rm -f "$out"/build-[abcd].log
  echo "builds: $((SECONDS - start)) s" >> "$out/build.log"
  grep -E "compiled|up to date|error|builds:" "$out/build.log"
}

case "${1:-}" in
build)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  builds
  APEX4GEN_TEST_BUILDS=$L7:$L8:$L7CH python3 -m pytest -v -ra tests/test_engine_gpu.py > "$out/gpu-tests.log" 2>&1
  # the ops' 2-D entry points after the [..., K] change: graph capture, opcheck (fake shapes), errors
  APEX4GEN_TEST_BUILDS=$L7 python3 -m pytest -q -ra tests/test_kernels_gpu.py -k "graph or opcheck or unplanned or routed" \
    >> "$out/gpu-tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu-tests.log" | tail -n 12
  ;;
bench)
  builds > /dev/null
  bench() { local name=$1; shift; a4g e2e-bench "$@" --json "$out/e2e-$name.json" >> "$out/e2e-bench.log" 2>&1; }
  bench llama2-7b llama2-7b --build $L7
  bench llama2-7b-channel llama2-7b --build $L7CH
  bench llama3-8b llama3-8b --build $L8
  bench llama2-70b-${FP_LAYERS_70B}l llama2-70b --build $L70 --layers $FP_LAYERS_70B
  bench llama2-70b-80l-w4a4 llama2-70b --build $L70 --no-baseline
  grep -vE "^  (prefill|decode)|decoder weights [0-9.]+ GiB$" "$out/e2e-bench.log"
  python3 scripts/e2e_summary.py "$out"/e2e-*.json | tee "$out/summary.txt"
  ;;
*)
  echo "usage: $0 build|bench" >&2
  exit 2
  ;;
esac
