// W4A4 per-channel prefill GEMM for Hopper (sm_90a), see apex4gen/kernels/sm90_prefill.py.
// Runs Y^T[N, M] = W[N, K] . X[M, K]^T: the int4 weights are CUTLASS's operand A (widened to int8 in registers by
// the mixed-input mainloop), the int8 activations operand B, int32 accumulators (exact), then the EVT epilogue
// y = (P * sw[n]) * sx[m] + bias[n] rounded once to the output type.
// Config (a rendered templates/sm90_prefill_channel.cu.jinja; values from render_channel):
//   ElementW, ElementX, ElementAcc, ElementCompute, ElementOut, ArchTag, Scheduler; kTileM, kTileN, kTileK,
//   kStages, kAlignN, kAlignK, kMaxK, kSmemBytes; kPdl (launched with programmatic dependent launch: the source
//   defines CUTLASS_ENABLE_GDC_FOR_SM90 before any CUTLASS header); schedule(SchedulerArguments&).
#pragma once

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "kernels/sm90_cutlass.cuh"

// CUTLASS's kernel waits (griddepcontrol.wait) before its first global read only when GDC is enabled.
#if defined(CUTLASS_ENABLE_GDC_FOR_SM90) && defined(__CUDA_ARCH__) && !defined(CUTLASS_GDC_ENABLED)
#error "programmatic dependent launch needs CUTLASS's griddepcontrol.wait (CUTLASS_GDC_ENABLED)"
#endif

namespace apex4gen::kernels::sm90_prefill_channel {

using namespace cute;
using namespace cutlass::epilogue::fusion;

template <class Config>
struct Gemm {
  using ElementW = typename Config::ElementW;
  using ElementX = typename Config::ElementX;
  using ElementAcc = typename Config::ElementAcc;
  using ElementCompute = typename Config::ElementCompute;
  using ElementOut = typename Config::ElementOut;
  using ArchTag = typename Config::ArchTag;
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
  static_assert(!Config::kPdl, "define CUTLASS_ENABLE_GDC_FOR_SM90 before the CUTLASS headers to launch with PDL");
#endif

  // CUTLASS's (M, N, K) is apex4gen's (N, M, K): channels x tokens.
  using TileShape = Shape<Int<Config::kTileN>, Int<Config::kTileM>, Int<Config::kTileK>>;
  using ClusterShape = Shape<_1, _1, _1>;
  using LayoutW = cutlass::layout::RowMajor;      // W [N, K], K contiguous
  using LayoutX = cutlass::layout::ColumnMajor;   // X [M, K] seen as B [K, M]
  using LayoutY = cutlass::layout::ColumnMajor;   // Y [M, N] seen as D [N, M]
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementW>::value;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<ElementX>::value;
  static constexpr int kAlignY = 128 / cutlass::sizeof_bits<ElementOut>::value;
  static_assert(kAlignY == Config::kAlignN, "align_n of the family must match the output's 16-byte stores");

  // Epilogue: per-channel scale and bias are column vectors of D (one value per row n), the token scale a row
  // vector (one per column m). sx has no alignment promise beyond 4 bytes (any M), hence alignment 1.
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ChannelVector = Sm90ColBroadcast<0, TileShape, ElementOut, ElementCompute, Stride<_1, _0, int64_t>>;
  using TokenVector = Sm90RowBroadcast<0, TileShape, ElementCompute, ElementCompute, Stride<_0, _1, int64_t>, 1>;
  using ScaledByChannel = Sm90EVT<Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, kRound>,
                                  Sm90AccFetch, ChannelVector>;
  using Fusion = Sm90EVT<Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, ElementCompute, kRound>,
                         ScaledByChannel, TokenVector, ChannelVector>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutY, kAlignY, ElementOut, LayoutY, kAlignY,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp,
      ElementW, LayoutW, kAlignW,
      ElementX, LayoutX, kAlignX,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using CollectiveMainloop = typename WithStages<Config::kStages, BuiltMainloop>::type;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, typename Config::Scheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  static_assert(sizeof(typename GemmKernel::SharedStorage) == Config::kSmemBytes,
                "apex4gen/kernels/sm90_prefill.py channel_smem_bytes disagrees with the kernel's layout");

  static bool shape_ok(int m, int n, int k) {
    return m >= 1 && n >= 1 && k >= 1 && n % Config::kAlignN == 0 && k % Config::kAlignK == 0 &&
           k <= Config::kMaxK;
  }

  static typename Adapter::Arguments make_arguments(const apex4gen_gemm_args& a) {
    using StrideW = typename GemmKernel::StrideA;
    using StrideX = typename GemmKernel::StrideB;
    using StrideY = typename GemmKernel::StrideD;
    const auto stride_w = cutlass::make_cute_packed_stride(StrideW{}, cute::make_shape(a.n, a.k, 1));
    const auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(a.m, a.k, 1));
    const auto stride_y = cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(a.n, a.m, 1));
    const auto* sw = static_cast<const ElementOut*>(a.sw);
    const auto* bias = static_cast<const ElementOut*>(a.bias);  // NULL: ColBroadcast reads 0 instead

    typename Adapter::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {a.n, a.m, a.k, 1},
        {static_cast<const ElementW*>(a.qw), stride_w, static_cast<const ElementX*>(a.qx), stride_x},
        { {}, nullptr, stride_y, static_cast<ElementOut*>(a.y), stride_y},
        hardware_info()};
    Config::schedule(args.scheduler);
    args.epilogue.thread = {
        { {}, {sw, ElementOut(0), {}}, {} },  // P * sw[n]
        {a.sx, ElementCompute(0), {}},      // * sx[m]
        {bias, ElementOut(0), {}},          // + bias[n]
        {}};
    return args;
  }

  static size_t workspace(int m, int n, int k) {
    if (!shape_ok(m, n, k)) return 0;
    apex4gen_gemm_args a{};
    a.m = m; a.n = n; a.k = k; a.group = k;
    return Adapter::get_workspace_size(make_arguments(a));
  }

  static int run(const apex4gen_gemm_args* args, cudaStream_t stream) {
    if (!has_operands(args)) return APEX4GEN_BAD_ARGUMENT;
    if (!shape_ok(args->m, args->n, args->k) || args->group != args->k) return APEX4GEN_BAD_SHAPE;
    return run_adapter<Adapter>(make_arguments(*args), *args, stream, Config::kPdl);
  }
};

}  // namespace apex4gen::kernels::sm90_prefill_channel
