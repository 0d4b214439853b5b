set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
G=generated
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv | tee $OUT/gpu.txt
b() { timeout 70 python3 -m apex4gen bench $G/$1 --ms 1,4,16,64 --baselines fp16 --json $OUT/bench-$1.json > $OUT/bench-$1.log 2>&1; echo "bench $1 rc=$?"; }
b main-g128; b h100-sxm-llama2-70b-g128
APEX4GEN_TEST_BUILDS=$G/h100-sxm-llama2-70b-g128:$G/h100-sxm-llama2-70b-channel timeout 90 python3 -m pytest -q -ra -m gpu tests > $OUT/gpu-tests.log 2>&1; echo "tests rc=$?"; tail -n 8 $OUT/gpu-tests.log
b main-channel; b h100-sxm-llama2-70b-channel
for f in $OUT/bench-*.log; do echo "== $f"; grep -E "proj" $f | cut -c1-200; done
