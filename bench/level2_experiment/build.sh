#!/bin/sh
# Builds the level-2 experiment kernel (libl2_s4.so, libl2_s5.so) from the repository root:
#   sh bench/level2_experiment/build.sh
# then, on a Hopper GPU, with a per-channel build of llama2-70b (the budget-channel.yaml plan) for the comparison:
#   MS=256,1024,4096 python3 bench/level2_experiment/harness.py BUILD libl2_s5.so libl2_s4.so
set -e
CU=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
for s in 4 5; do
  nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -Xcompiler=-fPIC -Xcompiler=-fvisibility=hidden \
    -gencode=arch=compute_90a,code=sm_90a -I"$CU/include" -I"$CU/tools/util/include" -Iruntime \
    -Ibench/level2_experiment -DSTAGES=$s -diag-suppress 177 -Xptxas -v -shared -o libl2_s$s.so \
    bench/level2_experiment/l2.cu
done
