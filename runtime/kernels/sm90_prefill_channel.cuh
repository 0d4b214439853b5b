// W4A4 per-channel prefill GEMM for Hopper (sm_90a), see apex4gen/kernels/sm90_prefill.py.
// Runs Y^T[N, M] = W[N, K] . X[M, K]^T: the int4 weights are CUTLASS's operand A (pre-reordered so that each thread
// reads its wgmma fragment with 64-bit loads, widened to int8 in registers by the mixed-input mainloop), the int8
// activations operand B, int32 accumulators (exact), then the EVT epilogue
// y = (P * sw[n]) * sx[m] + bias[n] rounded once to the output type.
// Config (a rendered templates/sm90_prefill_channel.cu.jinja; values from render_channel):
//   ElementW, ElementX, ElementAcc, ElementCompute, ElementOut, ArchTag, Scheduler, WeightAtom; kTileM, kTileN, kTileK,
//   kStages, kClusterN, kAlignN, kAlignK, kMaxK, kSmemBytes; kPdl (launched with programmatic dependent launch:
//   the source defines CUTLASS_ENABLE_GDC_FOR_SM90 before any CUTLASS header); schedule(SchedulerArguments&).
#pragma once

#include "kernels/sm90_cutlass.cuh"

// CUTLASS's kernel waits (griddepcontrol.wait) before its first global read only when GDC is enabled.
#if defined(CUTLASS_ENABLE_GDC_FOR_SM90) && defined(__CUDA_ARCH__) && !defined(CUTLASS_GDC_ENABLED)
#error "programmatic dependent launch needs CUTLASS's griddepcontrol.wait (CUTLASS_GDC_ENABLED)"
#endif

namespace apex4gen::kernels::sm90_prefill_channel {

using namespace cute;
using namespace cutlass::epilogue::fusion;

template <class Config>
struct Gemm : Sm90Prefill<Config>, AdapterLauncher<Gemm<Config>> {
  using Types = Sm90Prefill<Config>;
  using typename Types::ElementW, typename Types::ElementX, typename Types::ElementCompute,
      typename Types::ElementOut, typename Types::TileShape, typename Types::ChannelVector, typename Types::LayoutW;
  using Types::kAlignY, Types::kRound;
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
  static_assert(!Config::kPdl, "define CUTLASS_ENABLE_GDC_FOR_SM90 before the CUTLASS headers to launch with PDL");
#endif
  static constexpr bool kPdl = Config::kPdl;
  static_assert(kAlignY == Config::kAlignN, "align_n of the family must match the output's 16-byte stores");

  // Epilogue: per-channel scale and bias are column vectors of D (one value per row n), the token scale a row
  // vector (one per column m). sx has no alignment promise beyond 4 bytes (any M), hence alignment 1.
  using TokenVector = Sm90RowBroadcast<0, TileShape, ElementCompute, ElementCompute, Stride<_0, _1, int64_t>, 1>;
  using ScaledByChannel = Sm90EVT<Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, kRound>,
                                  Sm90AccFetch, ChannelVector>;
  using Fusion = Sm90EVT<Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, ElementCompute, kRound>,
                         ScaledByChannel, TokenVector, ChannelVector>;
  using CollectiveEpilogue = typename Types::template Epilogue<Fusion>;

  using CollectiveMainloop = typename Types::template Mainloop<
      LayoutW, cutlass::gemm::collective::StageCountAutoCarveout<
                   static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>>::type;

  using Adapter = typename Types::template AdapterOf<CollectiveMainloop, CollectiveEpilogue>;
  using GemmKernel = typename Adapter::GemmKernel;
  static_assert(sizeof(typename GemmKernel::SharedStorage) == Config::kSmemBytes,
                "apex4gen/kernels/sm90_prefill.py channel_smem_bytes disagrees with the kernel's layout");

  static bool shape_ok(int m, int n, int k) {
    return m >= 1 && n >= 1 && k >= 1 && n % Config::kAlignN == 0 && k % Config::kAlignK == 0 &&
           k <= Config::kMaxK;
  }
  static int group_of(int k) { return k; }

  static typename Adapter::Arguments make_arguments(const apex4gen_gemm_args& a) {
    typename CollectiveMainloop::Arguments mainloop{static_cast<const ElementW*>(a.qw), Types::weight_layout(a.n, a.k),
                                                    static_cast<const ElementX*>(a.qx),
                                                    Types::template x_stride<Adapter>(a)};
    auto args = Types::template arguments<Adapter>(a, mainloop);
    Config::schedule(args.scheduler);
    args.epilogue.thread = {
        { {}, {static_cast<const ElementOut*>(a.sw), ElementOut(0), {}}, {} },  // P * sw[n]
        {a.sx, ElementCompute(0), {}},                                        // * sx[m]
        {static_cast<const ElementOut*>(a.bias), ElementOut(0), {}},          // + bias[n] (NULL reads 0)
        {}};
    return args;
  }
};

}  // namespace apex4gen::kernels::sm90_prefill_channel
