// The kernel bodies of `apex4gen probe`: throughput loops for one instruction each, and the pure weight stream.
// templates/probe.cu.jinja renders, per GPU arch, the instruction wrappers (the MMA structs below and the wgmma
// ones), the instantiations and the C ABI launchers; apex4gen/probe/ times them and turns counts into rates.
//
// Every loop is built so that the number is issue throughput, not latency: each thread (warp, warpgroup) keeps
// several independent chains, the grid fills every SM (as many CTAs as fit, from the occupancy API), and the
// operands depend on a seed so that nothing folds. Results are folded into one word that is stored only when it
// equals a value the seed makes practically impossible, so the loops stay and memory traffic is nil.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_runtime.h>

#include "apex4gen.h"

namespace apex4gen::probe {

// ------------------------------------------------------------------------------------------------ mma.sync
// One warp-level MMA: A is 4 registers, B 2, the accumulator 4 (of Acc) for every shape measured here.
struct MmaS4 {  // m16n8k64, INT4 (native on sm_80/86/89; emulated through INT8 IMMA on sm_90)
  using Acc = uint32_t;
  static __device__ __forceinline__ void fma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct MmaS8 {  // m16n8k32, INT8
  using Acc = uint32_t;
  static __device__ __forceinline__ void fma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct MmaF16 {  // m16n8k16, FP16 inputs, FP32 accumulation (what PyTorch's FP16 GEMMs run)
  using Acc = float;
  static __device__ __forceinline__ void fma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct MmaE4M3 {  // m16n8k32, FP8 e4m3 inputs, FP32 accumulation (sm_89 and newer)
  using Acc = float;
  static __device__ __forceinline__ void fma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// Operand bits from the seed: 0x3C00 halves (1.0 in fp16, 1.5 in e4m3) with a few low bits varied, so every
// type sees finite, non-zero values.
__device__ __forceinline__ uint32_t operand_bits(uint32_t seed, int i) {
  return 0x3C003C00u ^ ((seed * (2u * i + 3u)) & 0x00070007u);
}

template <typename Acc>
__device__ __forceinline__ uint32_t bits_of(Acc v) {
  if constexpr (std::is_floating_point_v<Acc>) return __float_as_uint(v);
  else return static_cast<uint32_t>(v);
}

// Keeps the loop's results alive: one store per thread that practically never happens.
__device__ __forceinline__ void keep(uint32_t folded, uint32_t seed, int* sink) {
  if (folded == (seed ^ 0x9E3779B9u)) sink[0] = static_cast<int>(folded);
}

// Each warp issues kChains independent MMAs per iteration.
template <typename Mma, int kChains>
__global__ void mma_sync_loop(long long iters, uint32_t seed, int* sink) {
  const uint32_t v = seed ^ (threadIdx.x * 0x01000193u);
  uint32_t a[4], b[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = operand_bits(v, i);
#pragma unroll
  for (int i = 0; i < 2; ++i) b[i] = operand_bits(v, 4 + i);
  typename Mma::Acc acc[kChains][4] = {};
  for (long long it = 0; it < iters; ++it) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) Mma::fma(acc[c], a, b);
  }
  uint32_t folded = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) folded ^= bits_of(acc[c][e]);
  keep(folded, seed, sink);
}

// ------------------------------------------------------------------------------------------------ wgmma (sm_90a)
// Both operands from shared memory, K-major without swizzle: 8-row x 16-byte core matrices stored one after
// another, the two of a row block's 32 bytes of K first (leading byte offset 128), row blocks 256 bytes apart
// (stride byte offset). A is 64 rows, B 256 rows, each row 32 bytes (k32 of 8-bit types, k16 of fp16).
constexpr int kWgmmaABytes = 64 * 32;
constexpr int kWgmmaBBytes = 256 * 32;

__device__ __forceinline__ uint64_t smem_descriptor(const void* smem) {
  const uint64_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint64_t leading = 128, stride = 256;  // bytes; the descriptor holds them >> 4 (layout type 0: none)
  return ((address >> 4) & 0x3FFF) | (((leading >> 4) & 0x3FFF) << 16) | (((stride >> 4) & 0x3FFF) << 32);
}

// One warpgroup (128 threads) per CTA; each iteration issues kPerCommit wgmmas on one accumulator, commits them
// as a group and waits until at most one group is in flight, as a GEMM mainloop does (wgmmas on the same
// accumulator registers are ordered by the hardware, so the next group queues behind the running one).
template <typename Wgmma, int kPerCommit>
__global__ void __launch_bounds__(128) wgmma_loop(long long iters, uint32_t seed, int* sink) {
  __shared__ alignas(128) uint8_t smem[kWgmmaABytes + kWgmmaBBytes];
  for (int i = threadIdx.x; i < (kWgmmaABytes + kWgmmaBBytes) / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = operand_bits(seed, i & 7);
  __syncthreads();
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic-proxy writes seen by wgmma
  const uint64_t da = smem_descriptor(smem), db = smem_descriptor(smem + kWgmmaABytes);
  // Distinct start values and a loop left rolled: otherwise ptxas serialises the wgmmas (C7511: all-zero
  // accumulators share registers; C7514: the unrolled loop's exits read them inside a pipeline stage).
  typename Wgmma::Acc acc[Wgmma::kRegisters];
#pragma unroll
  for (int i = 0; i < Wgmma::kRegisters; ++i) acc[i] = static_cast<typename Wgmma::Acc>(seed + i);
#pragma unroll 1
  for (long long it = 0; it < iters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < kPerCommit; ++j) Wgmma::fma(acc, da, db);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  uint32_t folded = 0;
#pragma unroll
  for (int i = 0; i < Wgmma::kRegisters; ++i) folded ^= bits_of(acc[i]);
  keep(folded, seed, sink);
}

// ------------------------------------------------------------------------------------------------ CUDA cores
// One step of each CUDA-core loop; the state carries a dependency from step to step (so nothing is hoisted out
// of the loop) and the chains of one thread are independent (so their latencies overlap).
constexpr uint32_t kMagicBits = 0x4B400000u;  // 1.5 * 2^23: the kernels' exact int -> float for |v| < 2^22
constexpr float kMagicFloat = 12582912.0f;

struct Ffma {  // the FP32 rate: one FFMA
  static __device__ __forceinline__ void step(float& x, float a, float b) { x = fmaf(x, a, b); }
};

struct I2f {  // cvt.rn.f32.s32, the conversion a promotion would issue without the magic number
  static __device__ __forceinline__ void step(float& x, float, float) {
    x = __int2float_rn(static_cast<int>(__float_as_uint(x)));
  }
};

struct MagicConvert {  // the kernels' int -> float: IADD + FADD (sm90_decode.cuh's exact_float)
  static __device__ __forceinline__ void step(float& x, float, float) {
    x = __uint_as_float(__float_as_uint(x) + kMagicBits) - kMagicFloat;
  }
};

struct PromoteInt {  // one int32 group partial into the fp32 sum: magic convert, scale product, FFMA
  static __device__ __forceinline__ void step(float& acc, float sx, float) {
    const uint32_t partial = __float_as_uint(acc);
    const float scale = sx * __uint_as_float(partial);  // sx * sw, both varying as in the kernels
    acc = fmaf(__uint_as_float(partial + kMagicBits) - kMagicFloat, scale, acc);
  }
};

struct PromoteFloat {  // one float group partial (FP8 wgmma) into the fp32 sum: scale product, FFMA
  static __device__ __forceinline__ void step(float& acc, float sx, float sw) { acc = fmaf(acc, sx * acc, sw); }
};

template <typename Op, int kChains, int kUnroll>
__global__ void cuda_core_loop(long long iters, uint32_t seed, float a, float b, int* sink) {
  float x[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) x[c] = static_cast<float>((seed ^ threadIdx.x) & 0xFF) + c;
  for (long long it = 0; it < iters; ++it) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int c = 0; c < kChains; ++c) Op::step(x[c], a, b);
  }
  uint32_t folded = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) folded ^= __float_as_uint(x[c]);
  keep(folded, seed, sink);
}

// ------------------------------------------------------------------------------------------------ weight stream
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Reads `vecs` 16-byte vectors once (the decode kernels' load: non-caching, 16 bytes, kDepth in flight a
// thread, the oldest consumed and replaced) and folds them with XOR. kStride false: each block reads one
// contiguous range (the decode kernels' partition); true: 16 KB pieces dealt to the blocks in turn.
constexpr long long kPieceVecs = 1024;

template <int kDepth, bool kStride>
__global__ void stream_loop(const uint4* __restrict__ src, long long vecs, int* sink) {
  const long long T = blockDim.x;
  const long long per_block = kStride ? 0 : ((vecs + gridDim.x - 1) / gridDim.x + T - 1) / T * T;
  const long long pieces = (vecs + kPieceVecs - 1) / kPieceVecs;
  const long long loads_per_piece = kPieceVecs / T;
  const long long iters = kStride ? (pieces + gridDim.x - 1) / gridDim.x * loads_per_piece : per_block / T;
  auto index = [&](long long i) -> long long {
    if (kStride) {
      const long long piece = (i / loads_per_piece) * gridDim.x + blockIdx.x;
      return piece * kPieceVecs + (i % loads_per_piece) * T + threadIdx.x;
    }
    return blockIdx.x * per_block + i * T + threadIdx.x;
  };
  uint4 buf[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    const long long v = index(d);
    buf[d] = d < iters && v < vecs ? load_stream(src + v) : make_uint4(0, 0, 0, 0);
  }
  uint32_t acc = 0;
  for (long long i0 = 0; i0 < iters; i0 += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const uint4 v = buf[d];
      const long long next = i0 + d + kDepth, vi = index(next);
      if (next < iters && vi < vecs) buf[d] = load_stream(src + vi);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  keep(acc, 0x12345678u, sink);
}

// ------------------------------------------------------------------------------------------------ launching
// As many CTAs as fit on every SM (capped at max_per_sm), one wave: the grid the rates are counted over.
template <typename Kernel>
int full_grid(Kernel kernel, int threads, int max_per_sm, int* blocks) {
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess || per_sm < 1)
    return APEX4GEN_CUDA_ERROR;
  *blocks = sms * (per_sm < max_per_sm ? per_sm : max_per_sm);
  return APEX4GEN_OK;
}

inline int launched() { return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR; }

}  // namespace apex4gen::probe
