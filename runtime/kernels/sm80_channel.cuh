// Per-channel W4A4 GEMM for sm_80/86/89: CUTLASS 2.x int4 tensor-core GEMM (TN, int32 accumulators) whose EVT
// epilogue applies the per-token scale (column broadcast of sx[m]), the per-channel scale (row broadcast of
// sw[n]) and the bias, after examples/47_ampere_gemm_universal_streamk/*broadcast*.
//   Y[m,n] = sx[m] * sw[n] * P[m,n] + bias[n], P = the exact int32 dot product over all of K.
// Config (a rendered templates/sm80_channel.cu.jinja; values from apex4gen/kernels/sm80.py render_channel):
//   Out, ElementOperand, ElementAccumulator, ElementCompute, ArchTag; kTileM, kTileN, kTileK, kWarpsM, kWarpsN,
//   kStages, kAlignK, kAlignOut; kSmemBytes (the Python mirror's size, checked against CUTLASS's).
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
// after the GEMM headers: the visitors use their names without including them
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>

#include "kernels/common.cuh"

namespace apex4gen::kernels {

template <class Config>
struct Sm80ChannelGemm {
  using _0 = cute::_0;
  using _1 = cute::_1;
  using Out = typename Config::Out;
  using ElementOperand = typename Config::ElementOperand;
  using ElementAccumulator = typename Config::ElementAccumulator;
  using ElementCompute = typename Config::ElementCompute;

  using ThreadblockShape = cutlass::gemm::GemmShape<Config::kTileM, Config::kTileN, Config::kTileK>;
  using WarpShape = cutlass::gemm::GemmShape<Config::kTileM / Config::kWarpsM, Config::kTileN / Config::kWarpsN,
                                             Config::kTileK>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 64>;
  static constexpr int kAlignmentK = Config::kAlignK;      // 32 int4 = 16 bytes a cp.async
  static constexpr int kAlignmentOut = Config::kAlignOut;  // 8 x 16 bits = 16 bytes a store
  static constexpr int kEpilogueStages = 1;

  using OutputTileThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<
      ThreadblockShape, WarpShape, Out, kAlignmentOut, kEpilogueStages>;

  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  using TokenScale = cutlass::epilogue::threadblock::VisitorColBroadcast<
      OutputTileThreadMap, ElementCompute, cute::Stride<_1, _0, int32_t>>;
  using ChannelScale = cutlass::epilogue::threadblock::VisitorRowBroadcast<
      OutputTileThreadMap, Out, cute::Stride<_0, _1, int32_t>>;
  using Bias = cutlass::epilogue::threadblock::VisitorRowBroadcast<
      OutputTileThreadMap, Out, cute::Stride<_0, _1, int32_t>>;

  // float(P) * sx[m]: the int32 accumulator converts exactly (|P| <= 64 K < 2^24)
  using ScaleByToken = cutlass::epilogue::threadblock::VisitorCompute<
      cutlass::multiplies, ElementCompute, ElementCompute, cutlass::FloatRoundStyle::round_to_nearest>;
  using EVTTokenScaled = cutlass::epilogue::threadblock::Sm80EVT<ScaleByToken, Accum, TokenScale>;

  // (float(P) * sx[m]) * sw[n] + bias[n] in one fma, rounded once to the output type
  using ScaleByChannelAddBias = cutlass::epilogue::threadblock::VisitorCompute<
      cutlass::homogeneous_multiply_add, Out, ElementCompute, cutlass::FloatRoundStyle::round_to_nearest>;
  using EVTScaled =
      cutlass::epilogue::threadblock::Sm80EVT<ScaleByChannelAddBias, EVTTokenScaled, ChannelScale, Bias>;

  using StoreY = cutlass::epilogue::threadblock::VisitorAuxStore<
      OutputTileThreadMap, Out, cutlass::FloatRoundStyle::round_to_nearest, cute::Stride<int64_t, _1, int64_t>>;
  using EVTY = cutlass::epilogue::threadblock::Sm80EVT<StoreY, EVTScaled>;

  using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementOperand, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignmentK,
      ElementOperand, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignmentK,
      Out, cutlass::layout::RowMajor, kAlignmentOut,
      ElementAccumulator, ElementCompute,
      cutlass::arch::OpClassTensorOp, typename Config::ArchTag,
      ThreadblockShape, WarpShape, InstructionShape,
      EVTY,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>,
      Config::kStages,
      cutlass::arch::OpMultiplyAddSaturate,
      kEpilogueStages>::GemmKernel;

  static constexpr int kSmemBytes = static_cast<int>(sizeof(typename GemmKernel::SharedStorage));
  static_assert(kSmemBytes == Config::kSmemBytes, "smem_bytes() in apex4gen/kernels/sm80.py disagrees with CUTLASS");

  static typename EVTY::Arguments epilogue_arguments(const apex4gen_gemm_args& a) {
    const Out* sw = static_cast<const Out*>(a.sw);
    const Out* bias = static_cast<const Out*>(a.bias);
    return {
        {
            {
                {},                                           // Accum
                {a.sx, ElementCompute(0), {_1{}, _0{}, a.m}}, // TokenScale
                {}                                            // ScaleByToken
            },
            {sw, Out(0), {_0{}, _1{}, a.n}},                 // ChannelScale
            {bias, Out(0), {_0{}, _1{}, a.n}},               // Bias: null reads as 0
            {}                                                // ScaleByChannelAddBias
        },
        {static_cast<Out*>(a.y), {int64_t(a.n), _1{}, int64_t(a.m) * a.n}}  // StoreY
    };
  }

  static size_t workspace(int, int, int) { return 0; }

  static int run(const apex4gen_gemm_args* args, cudaStream_t stream) {
    if (!has_operands(args)) return APEX4GEN_BAD_ARGUMENT;
    if (args->m < 0 || args->n <= 0 || args->k <= 0 || args->group != args->k || args->k % kAlignmentK ||
        args->n % kAlignmentOut) {
      return APEX4GEN_BAD_SHAPE;
    }
    if (args->m == 0) return APEX4GEN_OK;
    // the row broadcasts (sw, bias) and the stores move 8 values (16 bytes) at a time
    if (!aligned(args->qx, 16) || !aligned(args->qw, 16) || !aligned(args->y, 16) || !aligned(args->sx, 4) ||
        !aligned(args->sw, 16) || !aligned(args->bias, 16)) {
      return APEX4GEN_BAD_ARGUMENT;
    }
    typename GemmKernel::Arguments arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {args->m, args->n, args->k}, /*batch_count=*/1,
        epilogue_arguments(*args), args->qx, args->qw, /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,
        /*batch strides=*/0, 0, 0, 0, /*lda=*/args->k, /*ldb=*/args->k, /*ldc=*/0, /*ldd=*/0);
    // Identity swizzle: the SM count and occupancy only matter to stream-K, which this kernel is not.
    const typename GemmKernel::Params params(arguments, /*device_sms=*/0, /*sm_occupancy=*/0);
    const dim3 grid = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>().get_grid_shape(
        params.grid_tiled_shape);
    if (grid.y > 65535 || grid.z > 65535) return APEX4GEN_BAD_SHAPE;
    if (kSmemBytes > 48 * 1024 &&
        cudaFuncSetAttribute(cutlass::Kernel2<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmemBytes) != cudaSuccess) {
      return APEX4GEN_CUDA_ERROR;
    }
    cutlass::Kernel2<GemmKernel><<<grid, GemmKernel::kThreadCount, kSmemBytes, stream>>>(params);
    return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
  }
};

}  // namespace apex4gen::kernels
