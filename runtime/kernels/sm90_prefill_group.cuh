// W4A4 group-wise prefill GEMM for Hopper (sm_90a), see apex4gen/kernels/sm90_prefill.py.
// Runs Y^T[N, M] = W[N, K] . X[M, K]^T on CUTLASS's warp-specialized cooperative kernel with a custom mainloop:
// CUTLASS's mixed-input collective (TMA loads of packed int4 W, pre-reordered so that each thread reads its wgmma
// fragment with 64-bit loads, and e4m3 X; int4 -> e4m3 in registers; register-sourced fp8 wgmma), extended with
//   * an auxiliary producer warp that cp.asyncs each K tile's scales (sx[m, g] fp32, sw[g, n] 16-bit) into
//     shared memory, arriving on the same pipeline stage as the TMA operands, and
//   * per-group promotion: one K tile is one group, its wgmma partials P are exact in fp32 (|P| <= 8192), and
//     the CUDA cores add P * (sw[n, g] * sx[m, g]) into a separate fp32 accumulator.
//   * token tiles of one or two 128-token wgmma blocks: a 256-token tile runs its blocks one after the other
//     through one partial buffer, so the widened weights serve twice the tokens; with one block, the next K
//     tile's int4 -> e4m3 widening is issued between this tile's wgmmas and their wait (two widened buffers);
//   * a stream-K tile scheduler for grids that do not fill whole waves.
// The epilogue adds bias[n] and rounds once to the output type.
// Config (a rendered templates/sm90_prefill_group.cu.jinja; values from render_group): ElementW, ElementX,
//   ElementAcc, ElementCompute, ElementOut, ArchTag, Scheduler, WeightAtom (apex4gen/kernels/layouts.py's atom);
//   kGroup, kTileM, kTileN, kTileK, kStages, kClusterN, kAlignN, kAlignK, kWgmmaTokens, kWidenAhead,
//   kSmemBytes.
#pragma once

#include "kernels/sm90_cutlass.cuh"

namespace apex4gen::kernels::sm90_prefill_group {

// Its own policy type, so that the kernel runs the auxiliary (scale) producer warp for this mainloop only.
template <class MixedInputPolicy>
struct GroupScaledPolicy : MixedInputPolicy {};

}  // namespace apex4gen::kernels::sm90_prefill_group

namespace cutlass::gemm::kernel::detail {
template <class MixedInputPolicy>
struct HasAuxiliaryLoad<apex4gen::kernels::sm90_prefill_group::GroupScaledPolicy<MixedInputPolicy>>
    : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

namespace apex4gen::kernels::sm90_prefill_group {

using namespace cute;
using namespace cutlass::epilogue::fusion;

// cp.async of 4 or 16 bytes that writes zeros when `valid` is false (rows past M or N).
template <int Bytes>
CUTLASS_DEVICE void copy_async_or_zero(void* smem, const void* gmem, bool valid) {
  const auto dst = cute::cast_smem_ptr_to_uint(smem);
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
  } else {
    static_assert(Bytes == 4, "cp.async copies 4, 8 or 16 bytes; scales use 4 and 16");
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 4 : 0));
  }
}

template <class Config>
struct Gemm : Sm90Prefill<Config>, AdapterLauncher<Gemm<Config>> {
  using Types = Sm90Prefill<Config>;
  using typename Types::ElementW, typename Types::ElementX, typename Types::ElementAcc,
      typename Types::ElementCompute, typename Types::ElementOut, typename Types::TileShape,
      typename Types::ChannelVector, typename Types::LayoutW;
  using Types::kAlignY, Types::kRound;
  static constexpr bool kPdl = false;

  static constexpr int kGroup = Config::kGroup;
  static constexpr int kStages = Config::kStages;
  static_assert(Config::kTileK == kGroup, "one K tile must be exactly one group");
  static_assert(Config::kClusterN == 1, "the auxiliary producer copies each CTA's own scales: no clusters");
  static_assert(Config::kAlignN % kAlignY == 0, "align_n of the family must allow the output's 16-byte stores");

  // Epilogue: the mainloop already applied both scales; add bias[n] (a column vector of D; NULL reads 0).
  using Fusion = Sm90EVT<Sm90Compute<cutlass::plus, ElementOut, ElementCompute, kRound>, Sm90AccFetch, ChannelVector>;
  using EpilogueCollective = typename Types::template Epilogue<Fusion>;

  // The stage count comes from the plan (WithStages), so the builder's carveout is a placeholder.
  using BuiltMainloop =
      typename Types::template Mainloop<LayoutW, cutlass::gemm::collective::StageCountAutoCarveout<0>>;
  using MixedInputMainloop = typename BuiltMainloop::type;

  using MixedInputTensorStorage = typename MixedInputMainloop::TensorStorage;
  using MixedInputParams = typename MixedInputMainloop::Params;
  using MixedInputArguments = typename MixedInputMainloop::Arguments;

  struct GroupScaledMainloop : MixedInputMainloop {
    using Base = MixedInputMainloop;
    using DispatchPolicy = GroupScaledPolicy<typename BuiltMainloop::Policy>;
    using typename Base::MainloopPipeline;
    using typename Base::PipelineState;
    using Utils = cutlass::gemm::collective::detail::MixedInputUtils<Base>;

    // One wgmma covers kWgmmaTokens of the tile's tokens; a wider tile runs its token blocks one after the other
    // through one partial buffer, so that a warpgroup's sum (64 x tile_m) and partial (64 x kWgmmaTokens) fit its
    // registers while the widened weights serve every block.
    static constexpr int kWgmmaTokens = Config::kWgmmaTokens;
    using TiledMma = decltype(make_tiled_mma(
        SM90::GMMA::rs_op_selector<ElementX, ElementX, ElementAcc,
                                   Shape<_64, Int<kWgmmaTokens>, Int<Config::kTileK>>>(),
        Layout<Shape<_2, _1, _1>>{}));
    static constexpr int kTileChannels = size<0>(TileShape{});
    static constexpr int kTileTokens = size<1>(TileShape{});
    static_assert(kTileTokens % kWgmmaTokens == 0, "token blocks must tile the token tile");
    static constexpr int kChannelsPerCopy = 16 / sizeof(ElementOut);
    static constexpr int kAuxThreads = 32;
    // Full-barrier arrivals per stage: the TMA leader plus every auxiliary-warp lane (cp.async arrive).
    static constexpr int NumProducerThreadEvents = 1 + kAuxThreads;

    struct TensorStorage : MixedInputTensorStorage {
      alignas(16) ElementCompute token_scale[kStages][kTileTokens];
      alignas(16) ElementOut channel_scale[kStages][kTileChannels];
    };
    using PipelineStorage = typename Base::PipelineStorage;
    struct SharedStorage {
      TensorStorage tensors;
      PipelineStorage pipeline;
    };

    struct Arguments : MixedInputArguments {
      const ElementCompute* token_scale = nullptr;    // sx [M, K/g]
      const ElementOut* channel_scale = nullptr;      // sw transposed, [K/g, N]
    };
    struct Params : MixedInputParams {
      const ElementCompute* token_scale;
      const ElementOut* channel_scale;
      int channels, tokens, groups;
    };

    template <class ProblemShape>
    static Params to_underlying_arguments(ProblemShape const& problem, Arguments const& args, void* workspace) {
      return Params{Base::to_underlying_arguments(problem, args, workspace), args.token_scale, args.channel_scale,
                    int(get<0>(problem)), int(get<1>(problem)), int(get<2>(problem)) / kGroup};
    }

    template <class ProblemShape>
    static bool can_implement(ProblemShape const& problem, Arguments const& args) {
      return get<2>(problem) % kGroup == 0 && Base::can_implement(problem, args);
    }

    // Auxiliary producer warp: for every K tile of the work tile, the tile's scales for group g = k tile.
    template <class LoadInputs, class BlockCoord, class KTileIterator>
    CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                       LoadInputs const&, BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                                       int k_tile_count, int lane, uint32_t, TensorStorage& shared) {
      const int channel0 = int(get<0>(blk_coord)) * kTileChannels;
      const int token0 = int(get<1>(blk_coord)) * kTileTokens;
      for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter, ++smem_pipe_write) {
        pipeline.producer_acquire(smem_pipe_write);
        const int g = int(*k_tile_iter);
        const int stage = smem_pipe_write.index();
        CUTLASS_PRAGMA_UNROLL
        for (int t = lane; t < kTileTokens; t += kAuxThreads) {
          const bool valid = token0 + t < params.tokens;
          const auto* src = params.token_scale + (valid ? size_t(token0 + t) * params.groups + g : 0);
          copy_async_or_zero<4>(&shared.token_scale[stage][t], src, valid);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int c = lane * kChannelsPerCopy; c < kTileChannels; c += kAuxThreads * kChannelsPerCopy) {
          const bool valid = channel0 + c < params.channels;  // N % 8 == 0: a copy is all in or all out
          const auto* src = params.channel_scale + (valid ? size_t(g) * params.channels + channel0 + c : 0);
          copy_async_or_zero<16>(&shared.channel_scale[stage][c], src, valid);
        }
        pipeline.producer_commit(smem_pipe_write, cutlass::arch::cpasync_barrier_arrive_noinc);
      }
    }

    // Consumer warpgroups: per K tile and token block, 4 wgmmas into `partial` (exact), wait, then promote with
    // both scales (see `step` for where the next tile's weights are widened).
    template <class FrgTensorC>
    CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                            int k_tile_count, int thread_idx, TensorStorage& shared, Params const&) {
      using namespace cute;
      const int warp_group_thread_idx = thread_idx % cutlass::NumThreadsPerWarpGroup;
      Tensor sA = as_position_independent_swizzle_tensor(
          make_tensor(make_smem_ptr(shared.smem_A.begin()), typename Base::SmemLayoutA{}));
      Tensor sB = make_tensor(make_smem_ptr(shared.smem_B.begin()), typename Base::SmemLayoutB{});

      constexpr int kMmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
      Layout warp_group_thread_layout = make_layout(Int<kMmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
      const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);

      TiledMma tiled_mma;
      auto mma_thread_slice = tiled_mma.get_thread_slice(thread_idx);
      auto mma_warpgroup_slice = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
      Tensor tCsA = mma_thread_slice.partition_A(sA);
      Tensor tCrA_mma = mma_thread_slice.partition_fragment_A(sA(_, _, Int<0>{}));
      // Packed weights in registers in shared memory's (reordered) order, as CUTLASS's own mma() does for a
      // reordered A: the copy vectorizes, the conversion maps values to the wgmma fragment.
      Tensor tCrA_load = make_tensor_like<typename Base::RealSwappedElementA>(tCsA(_, _, _, Int<0>{}));
      Tensor tCrB = mma_warpgroup_slice.make_fragment_B(mma_warpgroup_slice.partition_B(sB));  // (V, block, k, stage)

      auto smem_tiled_copy_A = make_tiled_copy_A(typename Base::SwappedSmemCopyAtomA{}, tiled_mma);
      auto smem_thr_copy_A = smem_tiled_copy_A.get_thread_slice(warp_group_thread_idx);
      Tensor tCrA_copy_view = smem_thr_copy_A.retile_D(tCrA_load);
      auto extra_info = Utils::partition_extra_mma_info(mma_thread_slice, shared);
      auto copy_extra_info = Utils::retile_extra_mma_info(tiled_mma, extra_info, warp_group_thread_idx);

      // (channel, token) of each accumulator inside the CTA tile, to index the stage's scales
      Tensor tCcC = mma_thread_slice.partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
      constexpr int kTokenBlocks = decltype(size<2>(accum))::value;
      static_assert(kTokenBlocks * kWgmmaTokens == kTileTokens && decltype(size<1>(accum))::value == 1,
                    "a warpgroup holds one 64-channel row of wgmma blocks");
      Tensor partial = make_fragment_like(accum(_, _, Int<0>{}));                             // (V, 1)
      Tensor partial_mn = make_tensor(partial.data(), append<3>(partial.layout(), Layout<_1, _0>{}));  // (V, 1, 1)
      clear(accum);

      Tensor tCrA_next = make_fragment_like(tCrA_mma);  // the second widened buffer (kWidenAhead)
      constexpr int kBlocks = size<2>(tCrA_load);
      auto widen = [&](auto& dst, int stage) {
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < kBlocks; ++k_block) {
          Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view, extra_info, copy_extra_info, k_block, stage);
          Utils::dequantize_A_kblock(tCrA_load, dst, extra_info, k_block);
        }
      };
      // The wgmmas of one K tile for one token block, into `partial`.
      auto issue = [&](auto const& a, int stage, int token_block) {
        tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
        warpgroup_fence_operand(partial);
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < kBlocks; ++k_block) {
          Tensor b = tCrB(_, token_block, k_block, stage);
          cute::gemm(tiled_mma, a(_, _, k_block), make_tensor(b.data(), append<2>(b.layout(), Layout<_1, _0>{})),
                     partial_mn);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
      };
      auto promote = [&](int stage, int token_block) {
        const ElementCompute* token_scale = shared.token_scale[stage];
        const ElementOut* channel_scale = shared.channel_scale[stage];
        Tensor sum = accum(_, _, token_block);
        Tensor coords = tCcC(_, _, token_block);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(partial); ++i) {
          const auto coord = coords(i);
          const ElementCompute scale = ElementCompute(channel_scale[get<0>(coord)]) * token_scale[get<1>(coord)];
          sum(i) = fmaf(partial(i), scale, sum(i));
        }
      };
      // One K tile on `cur` (widened before), widening the next tile into `nxt`, then releasing the stage. With
      // one token block the next tile is widened while this tile's wgmmas run, into a second buffer (the widening's
      // LDS + PRMT chain off the tensor cores' critical path); with two, the 128-register sum leaves no room for
      // it, and `nxt` is `cur`, widened once the last block's wgmmas are done with it (the other warpgroup's
      // wgmmas fill the tensor cores meanwhile).
      constexpr bool kWidenAhead = Config::kWidenAhead;
      auto widen_next = [&](auto& dst) {
        PipelineState next_read = smem_pipe_read;
        ++next_read;
        pipeline.consumer_wait(next_read, pipeline.consumer_try_wait(next_read));
        widen(dst, next_read.index());
      };
      auto step = [&](auto& cur, auto& nxt) {
        const int stage = smem_pipe_read.index();
        CUTLASS_PRAGMA_UNROLL
        for (int token_block = 0; token_block < kTokenBlocks; ++token_block) {
          issue(cur, stage, token_block);
          if (kWidenAhead && token_block == 0 && k_tile_count > 1) widen_next(nxt);
          warpgroup_wait<0>();
          warpgroup_fence_operand(partial);
          if (!kWidenAhead && token_block == kTokenBlocks - 1 && k_tile_count > 1) widen_next(nxt);
          promote(stage, token_block);
        }
        pipeline.consumer_release(smem_pipe_read);
        ++smem_pipe_read;
        --k_tile_count;
      };

      if (k_tile_count <= 0) return;
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      widen(tCrA_mma, smem_pipe_read.index());
      if constexpr (kWidenAhead) {
        // Unrolled by two so that both buffers stay in registers (no dynamic indexing).
        while (true) {
          step(tCrA_mma, tCrA_next);
          if (k_tile_count == 0) break;
          step(tCrA_next, tCrA_mma);
          if (k_tile_count == 0) break;
        }
      } else {
        while (k_tile_count > 0) step(tCrA_mma, tCrA_mma);
      }
    }

    // mma() waits for its wgmmas and releases every stage itself.
    CUTLASS_DEVICE void mma_tail(MainloopPipeline, PipelineState, int) {}
  };

  // Stream-K persistent scheduler (heuristic decomposition): whole waves of output tiles run data-parallel, and
  // when the last wave would leave SMs idle, its tiles' K iterations (groups) are spread over all SMs and the
  // fp32 sums are reduced through the workspace in a fixed order (deterministic).
  using Adapter = typename Types::template AdapterOf<GroupScaledMainloop, EpilogueCollective>;
  using GemmKernel = typename Adapter::GemmKernel;
  static_assert(sizeof(typename GemmKernel::SharedStorage) == Config::kSmemBytes,
                "apex4gen/kernels/sm90_prefill.py group_smem_bytes disagrees with the kernel's layout");

  static bool shape_ok(int m, int n, int k) {
    return m >= 1 && n >= 1 && k >= 1 && n % Config::kAlignN == 0 && k % Config::kAlignK == 0 && k % kGroup == 0;
  }
  static int group_of(int) { return kGroup; }

  static typename Adapter::Arguments make_arguments(const apex4gen_gemm_args& a) {
    typename GroupScaledMainloop::Arguments mainloop{};
    mainloop.ptr_A = static_cast<const ElementW*>(a.qw);
    mainloop.dA = Types::weight_layout(a.n, a.k);
    mainloop.ptr_B = static_cast<const ElementX*>(a.qx);
    mainloop.dB = Types::template x_stride<Adapter>(a);
    mainloop.token_scale = a.sx;
    mainloop.channel_scale = static_cast<const ElementOut*>(a.sw);
    auto args = Types::template arguments<Adapter>(a, mainloop);
    args.epilogue.thread = { {}, {static_cast<const ElementOut*>(a.bias), ElementOut(0), {}}, {} };
    return args;
  }
};

}  // namespace apex4gen::kernels::sm90_prefill_group
