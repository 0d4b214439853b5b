set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
G=generated
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
python3 splits.py 2>&1 | tee $OUT/splits.log
APEX4GEN_TEST_BUILDS=$G/h5b-g128 timeout 90 python3 -m pytest -q -ra -m gpu tests > $OUT/gpu-tests2.log 2>&1; echo "tests rc=$?"; tail -n 2 $OUT/gpu-tests2.log
for r in 1 2; do for b in main-g128 h5b-g128; do timeout 60 python3 -m apex4gen bench $G/$b --ms 1,16 --baselines fp16 --json $OUT/bench2-$b-$r.json > $OUT/bench2-$b-$r.log 2>&1; echo "== $b run $r rc=$?"; grep proj $OUT/bench2-$b-$r.log | cut -c1-90; done; done
