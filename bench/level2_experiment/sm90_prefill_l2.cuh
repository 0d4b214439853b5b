// EXPERIMENT: W4A4 with integer level-2 group scales on Hopper. Y^T = W . X^T with W[n, k] = sw[n] * r[n, g] * q,
// q int4, r in 1..16 (int8 [K/g, N]), X int8 (q_x * r_x, per-token scale sx). The int4 weights are widened to
// int8 q * r through a per-channel byte table (PRMT), so every K tile accumulates in int32 across all of K: no
// per-group promotion. Epilogue as the per-channel kernel: (P * sw[n]) * sx[m] + bias[n].
#pragma once
#include "kernels/sm90_prefill_group.cuh"
namespace apex4gen::kernels::sm90_prefill_l2 {
using namespace cute;
using namespace cutlass::epilogue::fusion;
using sm90_prefill_group::GroupScaledPolicy;
using sm90_prefill_group::copy_async_or_zero;

// q * r as int8 for 4 int4 values at once. Tables: pos[j] = r*j (j = 0..7), neg[j] = r*(j-8); each as two words.
struct Table { uint32_t pos0, pos1, neg0, neg1; };
CUTLASS_DEVICE Table make_table(uint32_t r) {
  Table t;
  t.pos0 = r * 0x03020100u;
  t.pos1 = r * 0x07060504u;
  t.neg0 = ~(r * 0x05060708u) + 0x01010101u;   // bytes r*j <= 128: no byte of ~x is 0xff, no carry
  t.neg1 = ~(r * 0x01020304u) + 0x01010101u;
  return t;
}
// 8 int4 (one word, nibble i = value i) -> 8 int8 (two words); values 0..3 through t0, 4..7 through t1.
CUTLASS_DEVICE void widen8(uint32_t src, const Table& t0, const Table& t1, uint32_t& lo, uint32_t& hi) {
  const uint32_t idx = src & 0x77777777u;
  uint32_t sel;  // per output byte j: j (pos) or j + 4 (neg) when the value's sign bit is set
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(sel) : "r"(src), "n"(0x88888888), "n"(0x64206420));
  sel >>= 1;
  uint32_t p, n;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(p) : "r"(t0.pos0), "r"(t0.pos1), "r"(idx));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(n) : "r"(t0.neg0), "r"(t0.neg1), "r"(idx));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(lo) : "r"(p), "r"(n), "r"(sel));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(p) : "r"(t1.pos0), "r"(t1.pos1), "r"(idx >> 16));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(n) : "r"(t1.neg0), "r"(t1.neg1), "r"(idx >> 16));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(hi) : "r"(p), "r"(n), "r"(sel >> 16));
}

template <class Config>
struct Gemm : Sm90Prefill<Config> {
  using Types = Sm90Prefill<Config>;
  using typename Types::ElementW, typename Types::ElementX, typename Types::ElementAcc, typename Types::ElementCompute,
      typename Types::ElementOut, typename Types::TileShape, typename Types::ChannelVector, typename Types::LayoutW;
  using Types::kAlignY, Types::kRound;
  static constexpr int kStages = Config::kStages;
  static constexpr int kGroup = 128;
  static_assert(Config::kTileK == kGroup && Config::kClusterN == 1, "one K tile a group; no clusters");

  using TokenVector = Sm90RowBroadcast<0, TileShape, ElementCompute, ElementCompute, Stride<_0, _1, int64_t>, 1>;
  using ScaledByChannel = Sm90EVT<Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, kRound>,
                                  Sm90AccFetch, ChannelVector>;
  using Fusion = Sm90EVT<Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, ElementCompute, kRound>,
                         ScaledByChannel, TokenVector, ChannelVector>;
  using EpilogueCollective = typename Types::template Epilogue<Fusion>;
  using BuiltMainloop = typename Types::template Mainloop<LayoutW, cutlass::gemm::collective::StageCountAutoCarveout<0>>;
  using MixedInputMainloop = typename BuiltMainloop::type;

  struct L2Mainloop : MixedInputMainloop {
    using Base = MixedInputMainloop;
    using DispatchPolicy = GroupScaledPolicy<typename BuiltMainloop::Policy>;
    using typename Base::MainloopPipeline;
    using typename Base::PipelineState;
    using typename Base::TiledMma;
    static constexpr int kTileChannels = size<0>(TileShape{});
    static constexpr int kAuxThreads = 32;
    static constexpr int NumProducerThreadEvents = 1 + kAuxThreads;
    struct TensorStorage : Base::TensorStorage {
      alignas(16) int8_t level2[kStages][kTileChannels];
    };
    using PipelineStorage = typename Base::PipelineStorage;
    struct SharedStorage { TensorStorage tensors; PipelineStorage pipeline; };
    struct Arguments : Base::Arguments { const int8_t* level2 = nullptr; };   // r transposed, [K/g, N]
    struct Params : Base::Params { const int8_t* level2; int channels; };

    template <class ProblemShape>
    static Params to_underlying_arguments(ProblemShape const& problem, Arguments const& args, void* workspace) {
      return Params{Base::to_underlying_arguments(problem, args, workspace), args.level2, int(get<0>(problem))};
    }
    template <class ProblemShape>
    static bool can_implement(ProblemShape const& problem, Arguments const& args) {
      return get<2>(problem) % kGroup == 0 && get<0>(problem) % 16 == 0 && Base::can_implement(problem, args);
    }

    template <class LoadInputs, class BlockCoord, class KTileIterator>
    CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                       LoadInputs const&, BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                                       int k_tile_count, int lane, uint32_t, TensorStorage& shared) {
      const int channel0 = int(get<0>(blk_coord)) * kTileChannels;
      for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter, ++smem_pipe_write) {
        pipeline.producer_acquire(smem_pipe_write);
        const int g = int(*k_tile_iter);
        const int stage = smem_pipe_write.index();
        CUTLASS_PRAGMA_UNROLL
        for (int c = lane * 16; c < kTileChannels; c += kAuxThreads * 16) {
          const bool valid = channel0 + c < params.channels;  // N % 16 == 0
          const auto* src = params.level2 + (valid ? size_t(g) * params.channels + channel0 + c : 0);
          copy_async_or_zero<16>(&shared.level2[stage][c], src, valid);
        }
        pipeline.producer_commit(smem_pipe_write, cutlass::arch::cpasync_barrier_arrive_noinc);
      }
    }

    template <class FrgTensorC>
    CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                            int k_tile_count, int thread_idx, TensorStorage& shared, Params const&) {
      const int warp_group_thread_idx = thread_idx % cutlass::NumThreadsPerWarpGroup;
      Tensor sA = as_position_independent_swizzle_tensor(
          make_tensor(make_smem_ptr(shared.smem_A.begin()), typename Base::SmemLayoutA{}));
      Tensor sB = make_tensor(make_smem_ptr(shared.smem_B.begin()), typename Base::SmemLayoutB{});
      TiledMma tiled_mma;
      constexpr int kMmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
      Layout warp_group_thread_layout = make_layout(Int<kMmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
      const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
      auto mma_thread_slice = tiled_mma.get_thread_slice(thread_idx);
      auto mma_warpgroup_slice = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
      Tensor tCsA = mma_thread_slice.partition_A(sA);
      Tensor tCrA0 = mma_thread_slice.partition_fragment_A(sA(_, _, Int<0>{}));
      Tensor tCrA1 = make_fragment_like(tCrA0);
      Tensor tCrA_load = make_tensor_like<typename Base::RealSwappedElementA>(tCsA(_, _, _, Int<0>{}));
      Tensor tCrB = mma_warpgroup_slice.make_fragment_B(mma_warpgroup_slice.partition_B(sB));
      auto smem_tiled_copy_A = make_tiled_copy_A(typename Base::SwappedSmemCopyAtomA{}, tiled_mma);
      auto smem_thr_copy_A = smem_tiled_copy_A.get_thread_slice(warp_group_thread_idx);
      Tensor tCrA_copy_view = smem_thr_copy_A.retile_D(tCrA_load);
      // the channel (within the CTA tile) of each 4-value run of a thread's k block: word j of the widened
      // fragment holds values 4j..4j+3
      Tensor tCcA = mma_thread_slice.partition_A(make_identity_tensor(select<0, 2>(TileShape{})));
      constexpr int kBlocks = size<2>(tCrA_load);
      constexpr int kWordsPerBlock = decltype(size(tCrA0(_, _, 0)))::value / 4;
      static_assert(kWordsPerBlock % 2 == 0, "8 values per int4 word");
      static_assert(decltype(max_common_vector(tCrA_load(_, _, 0).layout(), tCrA0(_, _, 0).layout()))::value ==
                        4 * kWordsPerBlock, "packed and widened k blocks must both be in fragment order");
      int channel_of[kWordsPerBlock];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kWordsPerBlock; ++j) channel_of[j] = get<0>(tCcA(_, _, 0)(4 * j));

      auto widen = [&](auto& dst, int stage) {
        Table tables[kWordsPerBlock];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kWordsPerBlock; ++j) tables[j] = make_table(uint32_t(shared.level2[stage][channel_of[j]]));
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < kBlocks; ++k_block) {
          copy(smem_tiled_copy_A, tCsA(_, _, k_block, stage), tCrA_copy_view(_, _, k_block));
          auto src = recast<uint32_t>(tCrA_load(_, _, k_block));
          auto out = recast<uint32_t>(dst(_, _, k_block));
          CUTLASS_PRAGMA_UNROLL
          for (int w = 0; w < kWordsPerBlock / 2; ++w) {
            uint32_t lo, hi;
            widen8(src(w), tables[2 * w], tables[2 * w + 1], lo, hi);
            out(2 * w) = lo;
            out(2 * w + 1) = hi;
          }
        }
      };
      auto issue = [&](auto const& a, int stage) {
        warpgroup_fence_operand(accum);
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < kBlocks; ++k_block) {
          cute::gemm(tiled_mma, a(_, _, k_block), tCrB(_, _, k_block, stage), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
      };
      auto step = [&](auto& cur, auto& nxt) {
        issue(cur, smem_pipe_read.index());
        if (k_tile_count > 1) {
          PipelineState next_read = smem_pipe_read;
          ++next_read;
          pipeline.consumer_wait(next_read, pipeline.consumer_try_wait(next_read));
          widen(nxt, next_read.index());
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(accum);
        pipeline.consumer_release(smem_pipe_read);
        ++smem_pipe_read;
        --k_tile_count;
      };
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      if (k_tile_count <= 0) { clear(accum); return; }
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      widen(tCrA0, smem_pipe_read.index());
      while (true) {
        step(tCrA0, tCrA1);
        if (k_tile_count == 0) break;
        step(tCrA1, tCrA0);
        if (k_tile_count == 0) break;
      }
    }
    CUTLASS_DEVICE void mma_tail(MainloopPipeline, PipelineState, int) {}
  };

  using Adapter = typename Types::template AdapterOf<L2Mainloop, EpilogueCollective>;

  static typename Adapter::Arguments make_arguments(const apex4gen_gemm_args& a, const int8_t* r) {
    typename L2Mainloop::Arguments mainloop{};
    mainloop.ptr_A = static_cast<const ElementW*>(a.qw);
    mainloop.dA = Types::weight_layout(a.n, a.k);
    mainloop.ptr_B = static_cast<const ElementX*>(a.qx);
    mainloop.dB = Types::template x_stride<Adapter>(a);
    mainloop.level2 = r;
    auto args = Types::template arguments<Adapter>(a, mainloop);
    args.epilogue.thread = {
        { {}, {static_cast<const ElementOut*>(a.sw), ElementOut(0), {}}, {} },
        {a.sx, ElementCompute(0), {}},
        {static_cast<const ElementOut*>(a.bias), ElementOut(0), {}},
        {}};
    return args;
  }
  static size_t workspace(const apex4gen_gemm_args& a) { return Adapter::get_workspace_size(make_arguments(a, nullptr)); }
  static int run(const apex4gen_gemm_args* args, const int8_t* r, cudaStream_t stream) {
    const auto arguments = make_arguments(*args, r);
    if (args->workspace_bytes < Adapter::get_workspace_size(arguments)) return APEX4GEN_WORKSPACE;
    Adapter gemm;
    if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return APEX4GEN_BAD_SHAPE;
    if (gemm.initialize(arguments, args->workspace, stream) != cutlass::Status::kSuccess ||
        gemm.run(stream, nullptr, false) != cutlass::Status::kSuccess) return APEX4GEN_CUDA_ERROR;
    return cudaPeekAtLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
  }
};
}  // namespace apex4gen::kernels::sm90_prefill_l2
