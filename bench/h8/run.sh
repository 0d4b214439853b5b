#!/usr/bin/env bash
# h8 device call: GPU suite on the fused builds, then bench main vs h8 (same machine, interleaved).
cd "$(dirname "$0")/repo"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
B=../builds
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem --format=csv | tee $OUT/gpu.txt
APEX4GEN_TEST_BUILDS=$B/h8-g128:$B/h8-channel timeout 95 python3 -m pytest -q -ra -m gpu tests > $OUT/gpu-tests-h8.log 2>&1; echo "tests rc=$?" >> $OUT/gpu-tests-h8.log; tail -n 15 $OUT/gpu-tests-h8.log
for b in main-g128 h8-g128 main-channel h8-channel; do
  timeout 45 python3 -m apex4gen bench $B/$b --ms 1,4,16,64 --baselines fp16 --json $OUT/bench-$b.json > $OUT/bench-$b.log 2>&1; echo "$b rc=$?"; grep -iE "qkv|o_proj|gate|down| o " $OUT/bench-$b.log | head -20
done
