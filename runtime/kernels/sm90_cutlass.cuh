// What both Hopper prefill families (sm90_prefill_channel.cuh, sm90_prefill_group.cuh) build alike from their
// Config: the types of a swapped-operand GEMM on CUTLASS 3.x's warp-specialized cooperative kernel with the
// mixed-input mainloop (re-instantiated with the plan's stage count) and a TMA epilogue, and the C ABI pair of
// its GemmUniversalAdapter.
#pragma once

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/util/packed_stride.hpp>

#include "kernels/common.cuh"

namespace apex4gen::kernels {

// The builder sizes mixed-input pipelines only from a byte carveout; the plan names a stage count, so the built
// mainloop is re-instantiated with it (everything else as the builder chose).
template <int Stages, class Collective> struct WithStages;
template <int Stages, int BuiltStages, class Cluster, class Schedule, class... Rest>
struct WithStages<Stages, cutlass::gemm::collective::CollectiveMma<
    cutlass::gemm::MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInput<BuiltStages, Cluster, Schedule>, Rest...>> {
  using Policy = cutlass::gemm::MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInput<Stages, Cluster, Schedule>;
  using type = cutlass::gemm::collective::CollectiveMma<Policy, Rest...>;
};

// W's memory order for both prefill families (layout `sm90_prefill`, apex4gen/kernels/layouts.py): CUTLASS's
// offline reordering for mixed-input wgmma (cutlass::compute_memory_reordering_atom in util/mixed_dtype_utils.hpp,
// defaults; that header needs curand, so its few lines are restated here). One atom is a warp's 16 x 32 A fragment
// of an 8-bit wgmma (int8 and e4m3 alike) with each thread's 16 values contiguous (one 64-bit shared-memory load per
// thread per wgmma instead of 16-bit ones); atoms tile N first, then K. The pack function's formula is checked
// against this layout by tests.
template <class ElementMma, class ElementAccumulator>
constexpr auto weight_reorder_atom() {
  using namespace cute;
  using MmaAtom =
      decltype(SM90::GMMA::rs_op_selector<ElementMma, ElementMma, ElementAccumulator, Shape<_64, _16, _32>>());
  using MmaTraits = MMA_Traits<MmaAtom>;
  auto mk_shape_mma = select<0, 2>(typename MmaTraits::Shape_MNK{});
  auto tv_layout_mma = typename MmaTraits::ALayout{};
  auto tv_tiler_warp = make_shape(Int<32>{}, size<1>(tv_layout_mma));
  auto mk_shape_warp = shape_div(mk_shape_mma, size(typename MmaTraits::ThrID{}) / Int<32>{});
  auto tv_layout_mma_warp = make_layout_like(composition(tv_layout_mma, tv_tiler_warp));
  auto mk_layout_mma_warp = right_inverse(tv_layout_mma_warp).with_shape(mk_shape_warp);
  auto tv_to_offset = select<1, 0>(logical_product(make_layout(size<1>(tv_layout_mma)),
                                                   make_layout(size<0>(tv_layout_mma_warp))));
  return composition(tv_to_offset, mk_layout_mma_warp);
}

// Config gives ElementW, ElementX, ElementAcc, ElementCompute, ElementOut, ArchTag, WeightAtom, kTileM, kTileN,
// kTileK, kStages and kClusterN (CTAs a cluster holds along N: they compute neighbouring channel tiles of one token
// tile, which TMA multicasts to them). CUTLASS's (M, N, K) is apex4gen's (N, M, K): channels x tokens; W [N, K] is
// operand A, X [M, K] is B [K, M] and Y [M, N] is D [N, M].
template <class Config>
struct Sm90Prefill {
  using ElementW = typename Config::ElementW;
  using ElementX = typename Config::ElementX;
  using ElementAcc = typename Config::ElementAcc;
  using ElementCompute = typename Config::ElementCompute;
  using ElementOut = typename Config::ElementOut;
  using ArchTag = typename Config::ArchTag;
  using TileShape = cute::Shape<cute::Int<Config::kTileN>, cute::Int<Config::kTileM>, cute::Int<Config::kTileK>>;
  using ClusterShape = cute::Shape<cute::Int<Config::kClusterN>, cute::_1, cute::_1>;
  using LayoutX = cutlass::layout::ColumnMajor;   // X [M, K] seen as B [K, M]
  using LayoutY = cutlass::layout::ColumnMajor;   // Y [M, N] seen as D [N, M]
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementW>::value;
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<ElementX>::value;
  static constexpr int kAlignY = 128 / cutlass::sizeof_bits<ElementOut>::value;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // W [N, K] in the reordered layout (weight_reorder_atom), as apex4gen/kernels/layouts.py packs it.
  using WeightAtom = decltype(weight_reorder_atom<ElementX, ElementAcc>());
  static_assert(cute::is_same_v<WeightAtom, typename Config::WeightAtom>,
                "apex4gen/kernels/layouts.py SM90_PREFILL_ATOM (what pack_sm90_prefill writes) is not CUTLASS's atom");
  using LayoutW = decltype(cute::tile_to_shape(
      WeightAtom{}, cute::Layout<cute::Shape<int, int, int>, cute::Stride<int64_t, cute::_1, int64_t>>{}));
  static LayoutW weight_layout(int n, int k) { return cute::tile_to_shape(WeightAtom{}, cute::make_shape(n, k, 1)); }

  // Per-channel values (sw[n], bias[n]) are column vectors of D: one value per row n.
  using ChannelVector = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ElementOut, ElementCompute,
                                                                    cute::Stride<cute::_1, cute::_0, int64_t>>;

  template <class Fusion>
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutY, kAlignY, ElementOut, LayoutY, kAlignY,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  // The builder picks the mixed-input mainloop's layouts, copy atoms and the register-sourced wgmma; WithStages
  // gives it the plan's stage count (::type) and its dispatch policy (::Policy).
  template <class LayoutW, class StageCount>
  using Mainloop = WithStages<Config::kStages, typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp,
      ElementW, LayoutW, kAlignW,
      ElementX, LayoutX, kAlignX,
      ElementAcc, TileShape, ClusterShape, StageCount,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp>;

  // The persistent kernel over (N, M, K, 1) problems with Config's tile scheduler, behind CUTLASS's device adapter.
  template <class Mainloop, class Epilogue>
  using AdapterOf = cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<
      cute::Shape<int, int, int, int>, Mainloop, Epilogue, typename Config::Scheduler>>;

  // The adapter's arguments for a problem: the mainloop's (operands), D = Y with no C, the device's SMs.
  template <class Adapter, class MainloopArguments>
  static typename Adapter::Arguments arguments(const apex4gen_gemm_args& a, const MainloopArguments& mainloop) {
    using StrideY = typename Adapter::GemmKernel::StrideD;
    const auto stride_y = cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(a.n, a.m, 1));
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {a.n, a.m, a.k, 1},
            mainloop,
            { {}, nullptr, stride_y, static_cast<ElementOut*>(a.y), stride_y},
            hardware_info()};
  }

  template <class Adapter>
  static auto x_stride(const apex4gen_gemm_args& a) {
    using StrideX = typename Adapter::GemmKernel::StrideB;
    return cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(a.m, a.k, 1));
  }

  // The device's SM count sizes the persistent grid; read per call (cheap, no sync) so multi-GPU hosts work.
  static cutlass::KernelHardwareInfo hardware_info() {
    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
    return hw;
  }
};

// The C ABI pair of a GEMM that gives Adapter, kPdl, shape_ok(m, n, k), group_of(k) (the group size it serves)
// and make_arguments(args).
template <class Gemm>
struct AdapterLauncher {
  static size_t workspace(int m, int n, int k) {
    if (!Gemm::shape_ok(m, n, k)) return 0;
    apex4gen_gemm_args a{};
    a.m = m; a.n = n; a.k = k; a.group = Gemm::group_of(k);
    return Gemm::Adapter::get_workspace_size(Gemm::make_arguments(a));
  }

  static int run(const apex4gen_gemm_args* args, cudaStream_t stream) {
    using Adapter = typename Gemm::Adapter;
    if (!has_operands(args)) return APEX4GEN_BAD_ARGUMENT;
    if (!Gemm::shape_ok(args->m, args->n, args->k) || args->group != Gemm::group_of(args->k)) {
      return APEX4GEN_BAD_SHAPE;
    }
    const auto arguments = Gemm::make_arguments(*args);
    if (args->workspace_bytes < Adapter::get_workspace_size(arguments)) return APEX4GEN_WORKSPACE;
    Adapter gemm;
    if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return APEX4GEN_BAD_SHAPE;
    if (gemm.initialize(arguments, args->workspace, stream) != cutlass::Status::kSuccess ||
        gemm.run(stream, nullptr, Gemm::kPdl) != cutlass::Status::kSuccess) {
      return APEX4GEN_CUDA_ERROR;
    }
    return cudaPeekAtLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
  }
};

}  // namespace apex4gen::kernels
