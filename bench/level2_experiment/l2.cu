// The level-2 experiment's one kernel instance: the shipped 256 x 128 per-channel tile and weight layout, one CTA a
// cluster (the auxiliary producer warp copies each CTA's own r), the data-parallel persistent scheduler, STAGES
// stages (build.sh). Exported: l2_workspace(args) and l2_run(args, r, stream), r int8 [K/128, N].
#include "apex4gen.h"
#include "sm90_prefill_l2.cuh"
namespace {

struct Config {
  using ElementW = cutlass::int4b_t;
  using ElementX = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using ElementOut = cutlass::half_t;
  using ArchTag = cutlass::arch::Sm90;
  using Scheduler = cutlass::gemm::PersistentScheduler;
  // W's memory order: apex4gen/kernels/layouts.py SM90_PREFILL_ATOM (what pack_sm90_prefill writes)
  using WeightAtom = cute::Layout<cute::Shape<cute::Shape<cute::Int<8>, cute::Int<2>>, cute::Shape<cute::Int<4>, cute::Int<4>, cute::Int<2>>>, cute::Stride<cute::Stride<cute::Int<64>, cute::Int<4>>, cute::Stride<cute::Int<1>, cute::Int<16>, cute::Int<8>>>>;
  static constexpr int kTileM = 256, kTileN = 128, kTileK = 128;
  static constexpr int kStages = STAGES;
  static constexpr int kClusterN = 1;
};

}  // namespace
template struct apex4gen::kernels::sm90_prefill_l2::Gemm<Config>;
using G = apex4gen::kernels::sm90_prefill_l2::Gemm<Config>;
extern "C" APEX4GEN_EXPORT size_t l2_workspace(const apex4gen_gemm_args* a) { return G::workspace(*a); }
extern "C" APEX4GEN_EXPORT int l2_run(const apex4gen_gemm_args* a, const int8_t* r, cudaStream_t s) { return G::run(a, r, s); }
