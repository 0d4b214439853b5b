// Group-wise W4A4 GEMM for sm_80/86/89 on native INT4 tensor cores (mma m16n8k64 s4).
//   Y[m,n] = sum_g sx[m,g] * sw[n,g] * P[m,n,g] + bias[n], P exact in int32, the sum in fp32.
// No stock CUTLASS sm80 mainloop promotes int32 partials per K-group with both scales, so the mainloop is
// hand-tiled on CuTe's sm80 instruction atoms (cp.async, ldmatrix, mma).
// Config (a rendered templates/sm80_group.cu.jinja; values from apex4gen/kernels/sm80.py render_group):
//   Out; kTileM, kTileN, kTileK, kWarpsM, kWarpsN, kStages, kGroup, kAlignN; kSmemBytes (the Python mirror's
//   size, checked against the layout below).
#pragma once

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "kernels/common.cuh"

namespace apex4gen::kernels {

template <class Config>
struct Sm80GroupGemm {
  using Out = typename Config::Out;
  static constexpr int kTileM = Config::kTileM;
  static constexpr int kTileN = Config::kTileN;
  static constexpr int kTileK = Config::kTileK;
  static constexpr int kWarpsM = Config::kWarpsM;
  static constexpr int kWarpsN = Config::kWarpsN;
  static constexpr int kStages = Config::kStages;
  static constexpr int kGroup = Config::kGroup;
  static constexpr int kAlignN = Config::kAlignN;

  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 64;
  static constexpr int kWarpTileM = kTileM / kWarpsM;
  static constexpr int kWarpTileN = kTileN / kWarpsN;
  static constexpr int kFragsM = kWarpTileM / kMmaM;
  static constexpr int kFragsN = kWarpTileN / kMmaN;
  static constexpr int kKSteps = kTileK / kMmaK;
  static constexpr int kRowBytes = kTileK / 2;  // packed int4, two values a byte
  static constexpr int kChunksPerRow = kRowBytes / 16;

  // A group either spans whole K tiles (promoted after the tile that ends it) or several groups share a tile
  // (promoted after the mma k-step that ends each one).
  static constexpr bool kGroupSpansTiles = kGroup > kTileK;
  static constexpr int kGroupsPerTile = kGroupSpansTiles ? 1 : kTileK / kGroup;
  static constexpr int kStepsPerGroup = kGroupSpansTiles ? kKSteps : kGroup / kMmaK;
  static constexpr int kTilesPerGroup = kGroupSpansTiles ? kGroup / kTileK : 1;

  // One pipeline stage: A tile, B tile, then the scales of the groups the tile ends, one 32-bit word each
  // (sx as fp32; sw as the aligned word holding the 16-bit scale, since cp.async moves 4 bytes at least).
  static constexpr int kABytes = kTileM * kRowBytes;
  static constexpr int kBBytes = kTileN * kRowBytes;
  static constexpr int kSxBytes = kGroupsPerTile * kTileM * 4;
  static constexpr int kSwBytes = kGroupsPerTile * kTileN * 4;
  static constexpr int kStageBytes = kABytes + kBBytes + kSxBytes + kSwBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;

  // int32 -> fp32 at full rate: the first mma of a group starts from the bits of 1.5 * 2^23, so the
  // accumulator ends as the float 1.5 * 2^23 + P (exact while |P| < 2^22) and one FADD recovers P.
  static constexpr uint32_t kMagicBits = 0x4B400000u;
  static constexpr float kMagicFloat = 12582912.0f;

  static_assert(kSmemBytes == Config::kSmemBytes, "smem_bytes() in apex4gen/kernels/sm80.py disagrees with the kernel");
  static_assert(kTileM % (kWarpsM * kMmaM) == 0 && kTileN % (kWarpsN * 2 * kMmaN) == 0, "warp tiling");
  static_assert(kTileK % kMmaK == 0 && kGroup % kMmaK == 0, "K tiling");
  static_assert(kGroupSpansTiles ? kGroup % kTileK == 0 : kTileK % kGroup == 0, "group and tile_k must nest");
  static_assert(64 * kGroup < (1 << 22), "|P| <= 64 * group must stay under 2^22 for the magic-number convert");
  static_assert(kTileN % kAlignN == 0 && kAlignN % 8 == 0, "N is handled in whole 8-column mma blocks");

  struct Problem {
    const uint8_t* qx;     // [M, K/2] packed s4
    const float* sx;       // [M, G]
    const uint8_t* qw;     // [N, K/2] packed s4
    const uint32_t* sw;    // [N, G] 16-bit scales, read as the 32-bit words holding them
    const Out* bias;       // [N] or null
    Out* y;                // [M, N]
    int m, n, k, groups;   // groups = K / group
  };

  struct Accumulators {
    uint32_t part[kFragsM][kFragsN][4];  // the current group's int32 partials (magic-biased)
    float sum[kFragsM][kFragsN][4];      // the fp32 sum over finished groups
  };

  // XOR swizzle of 16-byte chunks inside each 128-byte line (Swizzle<3,4,3>): the 8 rows one ldmatrix
  // reads (64- or 128-byte rows) and the chunks cp.async writes land in distinct banks.
  static __device__ __forceinline__ int swizzle(int offset) {
    return offset ^ (((offset >> 7) & 7) << 4);
  }

  template <int kRows>
  static __device__ __forceinline__ void load_operand_tile(uint8_t* dst, const uint8_t* src, int row0, int rows,
                                                           int kt, int ld_bytes) {
    constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
    for (int j = 0; j < (kChunks + kThreads - 1) / kThreads; ++j) {
      const int c = threadIdx.x + j * kThreads;
      if (kChunks % kThreads == 0 || c < kChunks) {
        const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
        const bool valid = row0 + row < rows;
        // rows past the edge read nothing (zero-fill) but still need a valid address
        const uint8_t* from = src + (valid ? static_cast<size_t>(row0 + row) * ld_bytes : 0) +
                              static_cast<size_t>(kt) * kRowBytes + chunk * 16;
        cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(from),
            *reinterpret_cast<cute::uint128_t*>(dst + swizzle(row * kRowBytes + chunk * 16)), valid);
      }
    }
  }

  // Scales of groups g0 .. g0 + kGroupsPerTile - 1 for the tile's rows (sx) and columns (sw).
  static __device__ __forceinline__ void load_scales(uint32_t* sx_s, uint32_t* sw_s, const Problem& p, int m0, int n0,
                                                     int g0) {
    constexpr int kSx = kGroupsPerTile * kTileM, kSw = kGroupsPerTile * kTileN;
#pragma unroll
    for (int j = 0; j < (kSx + kThreads - 1) / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (kSx % kThreads == 0 || i < kSx) {
        const int gi = i / kTileM, row = i % kTileM;
        const bool valid = m0 + row < p.m;
        const float* from = p.sx + (valid ? static_cast<size_t>(m0 + row) * p.groups + g0 + gi : 0);
        cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(*reinterpret_cast<const uint32_t*>(from),
                                                             sx_s[i], valid);
      }
    }
#pragma unroll
    for (int j = 0; j < (kSw + kThreads - 1) / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (kSw % kThreads == 0 || i < kSw) {
        const int gi = i / kTileN, col = i % kTileN;
        const bool valid = n0 + col < p.n;
        const size_t element = valid ? static_cast<size_t>(n0 + col) * p.groups + g0 + gi : 0;
        cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(p.sw[element >> 1], sw_s[i], valid);
      }
    }
  }

  static __device__ __forceinline__ void load_stage(uint8_t* stage, const Problem& p, int kt, int m0, int n0) {
    const int ld_bytes = p.k / 2;
    load_operand_tile<kTileM>(stage, p.qx, m0, p.m, kt, ld_bytes);
    load_operand_tile<kTileN>(stage + kABytes, p.qw, n0, p.n, kt, ld_bytes);
    uint32_t* sx_s = reinterpret_cast<uint32_t*>(stage + kABytes + kBBytes);
    uint32_t* sw_s = reinterpret_cast<uint32_t*>(stage + kABytes + kBBytes + kSxBytes);
    if (kGroupSpansTiles) {
      // only the tile that ends a group needs its scales
      if ((kt + 1) % kTilesPerGroup == 0) load_scales(sx_s, sw_s, p, m0, n0, (kt + 1) / kTilesPerGroup - 1);
    } else {
      load_scales(sx_s, sw_s, p, m0, n0, kt * kGroupsPerTile);
    }
  }

  static __device__ __forceinline__ float scale_to_float(uint32_t word, bool high) {
    return static_cast<float>(Out::bitcast(static_cast<uint16_t>(high ? word >> 16 : word & 0xFFFFu)));
  }

  // acc.sum += float(P) * sx[m] * sw[n] for the finished group gi of this stage: FADD, FMUL, FFMA an element.
  static __device__ __forceinline__ void promote(Accumulators& acc, const uint8_t* stage, int gi, int g,
                                                 const Problem& p, int warp_row, int warp_col, int n0) {
    const float* sx_s = reinterpret_cast<const float*>(stage + kABytes + kBBytes) + gi * kTileM;
    const uint32_t* sw_s = reinterpret_cast<const uint32_t*>(stage + kABytes + kBBytes + kSxBytes) + gi * kTileN;
    const int lane = threadIdx.x % 32;
    float sx[kFragsM][2], sw[kFragsN][2];
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) sx[mi][h] = sx_s[warp_row + mi * kMmaM + lane / 4 + 8 * h];
    }
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = warp_col + ni * kMmaN + 2 * (lane % 4) + j;
        const size_t element = static_cast<size_t>(n0 + col) * p.groups + g;
        sw[ni][j] = scale_to_float(sw_s[col], element & 1);
      }
    }
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float partial = __uint_as_float(acc.part[mi][ni][e]) - kMagicFloat;
          acc.sum[mi][ni][e] = fmaf(partial, sx[mi][e / 2] * sw[ni][e % 2], acc.sum[mi][ni][e]);
        }
      }
    }
  }

  // All mma k-steps of one stage. kStartsGroup: the stage's first k-step opens a group spanning tiles.
  template <bool kStartsGroup>
  static __device__ __forceinline__ void mma_stage(Accumulators& acc, const uint8_t* stage, const Problem& p, int kt,
                                                   int warp_row, int warp_col, int n0) {
    const int lane = threadIdx.x % 32;
    const uint8_t* a_s = stage;
    const uint8_t* b_s = stage + kABytes;
    const uint32_t magic = kMagicBits;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kFragsM][4], b[kFragsN][2];
#pragma unroll
      for (int mi = 0; mi < kFragsM; ++mi) {
        // x4: rows 0-7 / 8-15 of k bytes 0-15, then of k bytes 16-31 -> a0..a3 of m16n8k64
        const int row = warp_row + mi * kMmaM + lane % 16;
        const int chunk = ks * 2 + lane / 16;
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(a_s + swizzle(row * kRowBytes + chunk * 16)),
            a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
      }
#pragma unroll
      for (int ni = 0; ni < kFragsN; ni += 2) {
        // x4: columns 0-7 (k bytes 0-15, 16-31), then columns 8-15 -> b0, b1 of two n8 blocks
        const int col = warp_col + ni * kMmaN + lane % 8 + 8 * (lane / 16);
        const int chunk = ks * 2 + (lane / 8) % 2;
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(b_s + swizzle(col * kRowBytes + chunk * 16)),
            b[ni][0], b[ni][1], b[ni + 1][0], b[ni + 1][1]);
      }
      const bool opens_group = kGroupSpansTiles ? (kStartsGroup && ks == 0) : (ks % kStepsPerGroup == 0);
#pragma unroll
      for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kFragsN; ++ni) {
          uint32_t* d = acc.part[mi][ni];
          const uint32_t* c = opens_group ? nullptr : d;
          cute::SM80_16x8x64_S32S4S4S32_TN::fma(
              d[0], d[1], d[2], d[3], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1],
              c ? c[0] : magic, c ? c[1] : magic, c ? c[2] : magic, c ? c[3] : magic);
        }
      }
      if (!kGroupSpansTiles && (ks + 1) % kStepsPerGroup == 0) {
        const int gi = ks / kStepsPerGroup;
        promote(acc, stage, gi, kt * kGroupsPerTile + gi, p, warp_row, warp_col, n0);
      }
    }
  }

  static __device__ __forceinline__ void store_output(const Accumulators& acc, const Problem& p, int m0, int n0,
                                                      int warp_row, int warp_col) {
    const int lane = threadIdx.x % 32;
    cutlass::NumericArrayConverter<Out, float, 2, cutlass::FloatRoundStyle::round_to_nearest> convert;
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni) {
      const int col = n0 + warp_col + ni * kMmaN + 2 * (lane % 4);
      if (col >= p.n) continue;  // N is a multiple of 8: an 8-column block is all in or all out
      float bias0 = 0.f, bias1 = 0.f;
      if (p.bias) {
        bias0 = static_cast<float>(p.bias[col]);
        bias1 = static_cast<float>(p.bias[col + 1]);
      }
#pragma unroll
      for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = m0 + warp_row + mi * kMmaM + lane / 4 + 8 * h;
          if (row < p.m) {
            cutlass::Array<float, 2> v;
            v[0] = acc.sum[mi][ni][2 * h] + bias0;
            v[1] = acc.sum[mi][ni][2 * h + 1] + bias1;
            *reinterpret_cast<cutlass::Array<Out, 2>*>(p.y + static_cast<size_t>(row) * p.n + col) = convert(v);
          }
        }
      }
    }
  }

  static __device__ __forceinline__ void gemm(const Problem& p) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int n0 = blockIdx.x * kTileN;
    const int m0 = blockIdx.y * kTileM;
    const int warp = threadIdx.x / 32;
    const int warp_row = (warp / kWarpsN) * kWarpTileM;
    const int warp_col = (warp % kWarpsN) * kWarpTileN;
    const int k_tiles = p.k / kTileK;

    Accumulators acc;
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.sum[mi][ni][e] = 0.f;
      }
    }

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(smem + s * kStageBytes, p, s, m0, n0);
      cute::cp_async_fence();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cute::cp_async_wait<kStages - 2>();
      __syncthreads();  // stage kt is visible, and every warp is done with the stage refilled below
      const int next = kt + kStages - 1;
      if (next < k_tiles) load_stage(smem + (next % kStages) * kStageBytes, p, next, m0, n0);
      cute::cp_async_fence();

      const uint8_t* stage = smem + (kt % kStages) * kStageBytes;
      if (kGroupSpansTiles) {
        if (kt % kTilesPerGroup == 0) {
          mma_stage<true>(acc, stage, p, kt, warp_row, warp_col, n0);
        } else {
          mma_stage<false>(acc, stage, p, kt, warp_row, warp_col, n0);
        }
        if ((kt + 1) % kTilesPerGroup == 0) {
          promote(acc, stage, 0, (kt + 1) / kTilesPerGroup - 1, p, warp_row, warp_col, n0);
        }
      } else {
        mma_stage<false>(acc, stage, p, kt, warp_row, warp_col, n0);
      }
    }
    cute::cp_async_wait<0>();
    store_output(acc, p, m0, n0, warp_row, warp_col);
  }

  static size_t workspace(int, int, int) { return 0; }
  static int run(const apex4gen_gemm_args* args, cudaStream_t stream);
};

template <class Gemm>
__global__ void __launch_bounds__(Gemm::kThreads) sm80_group_kernel(const typename Gemm::Problem p) {
  Gemm::gemm(p);
}

template <class Config>
int Sm80GroupGemm<Config>::run(const apex4gen_gemm_args* args, cudaStream_t stream) {
  if (!has_operands(args)) return APEX4GEN_BAD_ARGUMENT;
  if (args->m < 0 || args->n <= 0 || args->k <= 0 || args->group != kGroup || args->k % kTileK ||
      args->n % kAlignN) {
    return APEX4GEN_BAD_SHAPE;
  }
  const long long m_tiles = (args->m + kTileM - 1LL) / kTileM;
  if (m_tiles > 65535) return APEX4GEN_BAD_SHAPE;
  if (args->m == 0) return APEX4GEN_OK;
  if (!aligned(args->qx, 16) || !aligned(args->qw, 16) || !aligned(args->sx, 4) || !aligned(args->sw, 4) ||
      !aligned(args->y, 4) || !aligned(args->bias, 2)) {
    return APEX4GEN_BAD_ARGUMENT;
  }
  const Problem p{static_cast<const uint8_t*>(args->qx), args->sx, static_cast<const uint8_t*>(args->qw),
                  static_cast<const uint32_t*>(args->sw), static_cast<const Out*>(args->bias),
                  static_cast<Out*>(args->y), args->m, args->n, args->k, args->k / kGroup};
  const auto kernel = sm80_group_kernel<Sm80GroupGemm>;
  if (kSmemBytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) != cudaSuccess) {
    return APEX4GEN_CUDA_ERROR;
  }
  const dim3 grid((args->n + kTileN - 1) / kTileN, static_cast<unsigned>(m_tiles));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
}

}  // namespace apex4gen::kernels
