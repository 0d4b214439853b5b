// Activation quantization: x [M, K] (f16/bf16, row stride ldx) -> qx (packed s4 / s8 / e4m3) and sx [M, K/group]
// fp32, with the numerics of apex4gen/reference.py quantize_activation: fp32 absmax, s = absmax / qmax (IEEE
// division), q = clamp(rint(x / s), -qmax - 1, qmax), s == 0 -> q = 0; qmax = 7 for 4-bit activations, 127 for
// 8-bit ones (act_bits, a run-time argument: one more kernel argument, no more instantiations; s8 storage only).
// Must be compiled without fast-math; the divisions are spelled __fdiv_rn so that a stray -use_fast_math cannot
// change them.
// A value is quantized with one multiply by RN(1/s) and rounded with FP32 adds (quantize_value) instead of an
// IEEE division and int <-> float conversions (quarter-rate pipes); the division runs only for values near a
// rounding boundary. Measured on the H100 at M = 4096, K = 8192: per-channel 41.4 -> 39.4 us, g128 1% faster.
//
// Kernels, by the size of a (token, group) chunk:
// - chunks of up to kBlockMaxVectors vectors from kBlockMinVectors up (per-channel: one chunk per token row):
//   one block per chunk, so x is read from DRAM once and the row's loads are all in flight at once (a warp per
//   row, looping over K, left M <= 256 latency-bound). 16-byte vectors are staged in shared memory by cp.async
//   (nothing held in registers across the wait: as many blocks per SM as shared memory allows, which overlap
//   one another's load, reduce and store phases); 4-byte vectors are held in registers;
// - smaller chunks (g64..g1024) and huge ones: a run of T lanes per chunk, T a power of two up to 32 that
//   divides the chunk's vectors. Pass 1 reduces absmax with shuffles; pass 2 re-reads the chunk (an L1/L2 hit).
//   It is issue-bound (ncu, M = 4096, K = 8192, g128: 81% of issue slots, DRAM 42%); 32-bit index arithmetic
//   took it from 67.1 to 62.4 us. Measured alternatives (then 67-68 us): the chunk held in registers, 62 us
//   (not kept: a second kernel for 1% end to end); several chunks a thread with all loads issued first, 65-116
//   us; a resident grid striding over chunks with the next vector loaded ahead, 65.9 us; the near-boundary
//   divisions of a whole vector behind one branch, 65.8 us (against 62.8 for the index change alone).
// Both let the dependent GEMM launch at once (programmatic dependent launch, sm_90): it waits for this grid's
// completion (griddepcontrol.wait) before reading qx/sx, so only its launch and prologue overlap this grid.
#include "apex4gen.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_pipeline.h>

#include <algorithm>

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kBlockMinVectors = 256;     // 2048 values of 16 bits (vectors of 8): smaller chunks go to warps
constexpr int kVectorsPerThread = 4;      // target loads in flight per thread in the block kernel
constexpr int kMaxBlockThreads = 512;
// 4-byte vectors a thread holds in registers (the register kernel): 4 up to 2048 vectors a chunk (holding 8
// costs occupancy, and with it loads in flight), 8 (no spills at 512 threads) up to 4096.
constexpr int kHeldFew = 4;
constexpr int kHeldMost = 8;
constexpr int kBlockMaxVectors = kHeldMost * kMaxBlockThreads;
constexpr int kStagedThreads = 256;       // the staged kernel: a chunk of 32K 16-bit values is 64 KB of shared memory

// Programmatic dependent launch: let the next grid in the stream (the GEMM) start its prologue now.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// kVec consecutive values of one row, loaded in one access (16 bytes for kVec = 8, 4 bytes for kVec = 2).
template <typename T, int kVec>
struct alignas(kVec * sizeof(T)) Vector {
  T v[kVec];
};

template <int kVec>
struct QuantizedVector {
  int q[kVec];
};

// Adding 1.5 * 2^23 rounds |y| < 2^22 to an integer (round to nearest even, as rint) held in the low
// mantissa bits: t's bits are kRoundBits + rint(y).
constexpr float kRoundMagic = 12582912.0f;
constexpr int kRoundBits = 0x4B400000;
// 4-bit: y = x * RN(1/s) is within |x/s| * 2^-23 (1 + 2^-25) <= 8.4e-7 of x / s (|x / s| <= 7 / (1 - 2^-24)), and
// RN(x / s) within 4.2e-7 of it: where y is more than 2^-19 (1.9e-6) from every half-integer, RN(x / s) lies
// on the same side of every rounding boundary, so rint(y) == rint(RN(x / s)). The margin below is 8x that.
// 8-bit: |x / s| <= 127 / (1 - 2^-24): y within 1.52e-5 of x / s, RN(x / s) within 3.9e-6 (half an ulp below
// 128), together under 2^-15.7; kFastMargin8 is 12x that (tests/test_quantize_fast_path.py checks these distances
// and the fast path on boundary values, for both).
constexpr float kFastMargin = 1.0f / 65536.0f;
constexpr float kFastMargin8 = 1.0f / 4096.0f;

// The integer range of one activation precision: qmax = 7 or 127, values -qmax - 1 .. qmax.
struct Levels {
  int qmax;
  float margin;  // the fast path's distance from a rounding boundary (above)
};

__host__ __device__ inline Levels levels_of(int act_bits) {
  return act_bits == 8 ? Levels{127, kFastMargin8} : Levels{7, kFastMargin};
}

__device__ __forceinline__ int quantize_value(float x, float scale, float inv_scale, Levels lv) {
  if (scale == 0.f) return 0;
  // _rn intrinsics: no multiply-add contraction, y and t are the rounded values the bound is about
  const float y = __fmul_rn(x, inv_scale);
  const float t = __fadd_rn(y, kRoundMagic);
  int q;
  if (fabsf(__fsub_rn(y, __fsub_rn(t, kRoundMagic))) <= 0.5f - lv.margin) {  // false for a non-finite y
    q = __float_as_int(t) - kRoundBits;
  } else {
    q = __float2int_rn(__fdiv_rn(x, scale));  // the reference's division, for values near a boundary
  }
  return min(max(q, -lv.qmax - 1), lv.qmax);
}

// absmax / qmax, the reference's IEEE division.
__device__ __forceinline__ float scale_of(float absmax, Levels lv) {
  return __fdiv_rn(absmax, static_cast<float>(lv.qmax));
}

// RN(1/s), the multiplier quantize_value's error bound assumes (inf for s == 0, never used: quantize_value returns
// 0 first).
__device__ __forceinline__ float inverse_scale(float scale) { return __frcp_rn(scale); }

// -8..7 as float with an integer add and an FP32 add (no int -> float conversion).
__device__ __forceinline__ float small_int_to_float(int q) { return __int_as_float(q + kRoundBits) - kRoundMagic; }

template <int kVec>
__device__ __forceinline__ void store_s4(uint8_t* row, int k, const QuantizedVector<kVec>& q) {
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) packed |= static_cast<uint32_t>(q.q[i] & 0xF) << (4 * i);
  if constexpr (kVec == 8) {
    *reinterpret_cast<uint32_t*>(row + k / 2) = packed;
  } else {
    row[k / 2] = static_cast<uint8_t>(packed);
  }
}

template <typename Byte, int kVec>
__device__ __forceinline__ void store_bytes(Byte* row, int k, const Byte (&bytes)[kVec]) {
  struct alignas(kVec * sizeof(Byte)) Bytes { Byte b[kVec]; } out;
#pragma unroll
  for (int i = 0; i < kVec; ++i) out.b[i] = bytes[i];
  *reinterpret_cast<Bytes*>(row + k) = out;
}

template <apex4gen_act_format kFormat, int kVec>
__device__ __forceinline__ void store_quantized(void* qx, int64_t row_index, int k_total, int k,
                                                const QuantizedVector<kVec>& q) {
  if constexpr (kFormat == APEX4GEN_ACT_S4) {
    store_s4<kVec>(static_cast<uint8_t*>(qx) + row_index * (k_total / 2), k, q);
  } else if constexpr (kFormat == APEX4GEN_ACT_S8) {
    int8_t bytes[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) bytes[i] = static_cast<int8_t>(q.q[i]);
    store_bytes<int8_t, kVec>(static_cast<int8_t*>(qx) + row_index * k_total, k, bytes);
  } else {
    // -8..7 are exact in e4m3; converted two at a time (one instruction a pair)
    static_assert(kVec % 2 == 0, "e4m3 values are converted in pairs");
    __nv_fp8x2_storage_t pairs[kVec / 2];
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 v = make_float2(small_int_to_float(q.q[2 * i]), small_int_to_float(q.q[2 * i + 1]));
      pairs[i] = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
    }
    store_bytes<__nv_fp8x2_storage_t, kVec / 2>(
        reinterpret_cast<__nv_fp8x2_storage_t*>(static_cast<__nv_fp8_storage_t*>(qx) + row_index * k_total), k / 2,
        pairs);
  }
}

// (row, group index) of a chunk: a 32-bit division wherever the index fits, which is every shape short of 2^32
// chunks. A 64-bit division is a software routine, and quantize_kernel is issue-bound (see the head of the file).
__device__ __forceinline__ int split_chunk(int64_t chunk, int groups, int64_t& row_index) {
  if (chunk <= 0xFFFFFFFFll) {
    const uint32_t c = static_cast<uint32_t>(chunk);
    const uint32_t row = c / static_cast<uint32_t>(groups);
    row_index = row;
    return static_cast<int>(c - row * static_cast<uint32_t>(groups));
  }
  row_index = chunk / groups;
  return static_cast<int>(chunk - row_index * groups);
}

template <typename T, int kVec, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
quantize_kernel(const T* __restrict__ x, int ldx, int m, int k, int group, int lanes_shift, Levels lv,
                void* __restrict__ qx, float* __restrict__ sx) {
  allow_dependents();
  const int groups = k / group;
  const int lanes_per_chunk = 1 << lanes_shift;
  const int lane_in_chunk = threadIdx.x & (lanes_per_chunk - 1);
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> lanes_shift;
  const bool valid = chunk < static_cast<int64_t>(m) * groups;
  int64_t row_index = 0;
  int k0 = 0;
  if (valid) {
    const int group_index = split_chunk(chunk, groups, row_index);
    k0 = group_index * group;
  }
  const T* row = x + row_index * ldx;
  const int vectors = valid ? group / kVec : 0;
  using Vec = Vector<T, kVec>;

  float absmax = 0.f;
  for (int v = lane_in_chunk; v < vectors; v += lanes_per_chunk) {
    const Vec in = *reinterpret_cast<const Vec*>(row + k0 + v * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) absmax = fmaxf(absmax, fabsf(to_float(in.v[i])));
  }
  // every lane takes part: shuffles need the whole warp, and xor offsets < lanes_per_chunk stay in the run
  for (int offset = lanes_per_chunk / 2; offset > 0; offset /= 2) {
    absmax = fmaxf(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, offset));
  }
  if (!valid) return;
  const float scale = scale_of(absmax, lv);
  const float inv_scale = inverse_scale(scale);
  if (lane_in_chunk == 0) sx[row_index * groups + k0 / group] = scale;

  for (int v = lane_in_chunk; v < vectors; v += lanes_per_chunk) {
    const int kk = k0 + v * kVec;
    const Vec in = *reinterpret_cast<const Vec*>(row + kk);
    QuantizedVector<kVec> q;
#pragma unroll
    for (int i = 0; i < kVec; ++i) q.q[i] = quantize_value(to_float(in.v[i]), scale, inv_scale, lv);
    store_quantized<kFormat, kVec>(qx, row_index, k, kk, q);
  }
}

// The block's absmax from each thread's: warp shuffles, then one warp over the per-warp maxima (every thread
// gets it). warp_absmax: shared, one float per warp.
__device__ float block_absmax(float absmax, float* warp_absmax) {
  for (int offset = 16; offset > 0; offset /= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) warp_absmax[warp] = absmax;
  __syncthreads();
  absmax = lane < warps ? warp_absmax[lane] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, offset));
  return absmax;
}

// One block per chunk of 16-byte vectors staged in shared memory; thread t copies and later reads back its own
// vectors t, t + blockDim.x, ... (coalesced), so cp.async's wait makes them visible without a block barrier.
template <typename T, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kStagedThreads)
quantize_chunk_staged_kernel(const T* __restrict__ x, int ldx, int k, int group, Levels lv, void* __restrict__ qx,
                             float* __restrict__ sx) {
  allow_dependents();
  using Vec = Vector<T, 8>;
  extern __shared__ __align__(16) unsigned char staged_bytes[];
  Vec* staged = reinterpret_cast<Vec*>(staged_bytes);
  __shared__ float warp_absmax[kStagedThreads / 32];
  const int groups = k / group;
  const int64_t row_index = blockIdx.x / groups;
  const int k0 = static_cast<int>(blockIdx.x % groups) * group;
  const T* row = x + row_index * ldx + k0;
  const int vectors = group / 8;

  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    __pipeline_memcpy_async(staged + v, row + v * 8, sizeof(Vec));
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  float absmax = 0.f;
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Vec in = staged[v];
#pragma unroll
    for (int j = 0; j < 8; ++j) absmax = fmaxf(absmax, fabsf(to_float(in.v[j])));
  }
  const float scale = scale_of(block_absmax(absmax, warp_absmax), lv);
  const float inv_scale = inverse_scale(scale);
  if (threadIdx.x == 0) sx[row_index * groups + k0 / group] = scale;

  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Vec in = staged[v];
    QuantizedVector<8> q;
#pragma unroll
    for (int j = 0; j < 8; ++j) q.q[j] = quantize_value(to_float(in.v[j]), scale, inv_scale, lv);
    store_quantized<kFormat, 8>(qx, row_index, k, k0 + v * 8, q);
  }
}

// One block per chunk; thread t holds vectors t, t + blockDim.x, ... (coalesced), at most kHeld.
template <typename T, int kVec, int kHeld, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kMaxBlockThreads)
quantize_chunk_per_block_kernel(const T* __restrict__ x, int ldx, int k, int group, Levels lv,
                                void* __restrict__ qx, float* __restrict__ sx) {
  allow_dependents();
  __shared__ float warp_absmax[kMaxBlockThreads / 32];
  const int groups = k / group;
  const int64_t row_index = blockIdx.x / groups;
  const int k0 = static_cast<int>(blockIdx.x % groups) * group;
  const T* row = x + row_index * ldx + k0;
  const int vectors = group / kVec;
  using Vec = Vector<T, kVec>;

  Vec held[kHeld];
  float absmax = 0.f;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vectors) {
      held[i] = *reinterpret_cast<const Vec*>(row + v * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) absmax = fmaxf(absmax, fabsf(to_float(held[i].v[j])));
    }
  }
  const float scale = scale_of(block_absmax(absmax, warp_absmax), lv);
  const float inv_scale = inverse_scale(scale);
  if (threadIdx.x == 0) sx[row_index * groups + k0 / group] = scale;

#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vectors) {
      QuantizedVector<kVec> q;
#pragma unroll
      for (int j = 0; j < kVec; ++j) q.q[j] = quantize_value(to_float(held[i].v[j]), scale, inv_scale, lv);
      store_quantized<kFormat, kVec>(qx, row_index, k, k0 + v * kVec, q);
    }
  }
}

// log2 of the largest power of two up to 32 that divides the chunk's vector count: whole runs, no idle tail.
int lanes_shift(int vectors) {
  int shift = 5;
  while (vectors % (1 << shift)) --shift;
  return shift;
}

template <typename T, int kVec, apex4gen_act_format kFormat>
int launch(const void* x, int ldx, int m, int k, int group, Levels lv, void* qx, float* sx, cudaStream_t stream) {
  const int vectors = group / kVec;
  if (vectors >= kBlockMinVectors && vectors <= kBlockMaxVectors) {
    const int64_t blocks = static_cast<int64_t>(m) * (k / group);
    if (blocks > 0x7FFFFFFF) return APEX4GEN_BAD_SHAPE;
    if constexpr (kVec == 8) {
      const int smem = group * static_cast<int>(sizeof(T));
      const auto kernel = quantize_chunk_staged_kernel<T, kFormat>;
      if (smem > 48 * 1024 &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
        return APEX4GEN_CUDA_ERROR;
      }
      kernel<<<static_cast<unsigned>(blocks), kStagedThreads, smem, stream>>>(static_cast<const T*>(x), ldx, k,
                                                                              group, lv, qx, sx);
    } else {
      // threads: a multiple of 32 giving ~kVectorsPerThread vectors each (at most kHeld by the bounds)
      const int per_thread = (vectors + kVectorsPerThread - 1) / kVectorsPerThread;
      const int threads = std::min(kMaxBlockThreads, (per_thread + 31) / 32 * 32);
      const auto kernel = vectors <= kHeldFew * kMaxBlockThreads
                              ? quantize_chunk_per_block_kernel<T, kVec, kHeldFew, kFormat>
                              : quantize_chunk_per_block_kernel<T, kVec, kHeldMost, kFormat>;
      kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(static_cast<const T*>(x), ldx, k, group, lv,
                                                                    qx, sx);
    }
    return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
  }
  const int shift = lanes_shift(group / kVec);
  const int64_t threads = (static_cast<int64_t>(m) * (k / group)) << shift;
  const int block = kWarpsPerBlock * 32;
  const int64_t blocks = (threads + block - 1) / block;
  if (blocks > 0x7FFFFFFF) return APEX4GEN_BAD_SHAPE;
  quantize_kernel<T, kVec, kFormat><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const T*>(x), ldx, m, k, group, shift, lv, qx, sx);
  return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
}

template <typename T, apex4gen_act_format kFormat>
int launch_vectorised(const void* x, int ldx, int m, int k, int group, Levels lv, void* qx, float* sx,
                      cudaStream_t stream) {
  // 16-byte loads when every chunk starts on a 16-byte boundary (and the s4 stores on 4-byte ones)
  const bool wide = group % 8 == 0 && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(qx) % 8 == 0;
  return wide ? launch<T, 8, kFormat>(x, ldx, m, k, group, lv, qx, sx, stream)
              : launch<T, 2, kFormat>(x, ldx, m, k, group, lv, qx, sx, stream);
}

template <typename T>
int launch_format(apex4gen_act_format format, const void* x, int ldx, int m, int k, int group, Levels lv, void* qx,
                  float* sx, cudaStream_t stream) {
  switch (format) {
    case APEX4GEN_ACT_S4: return launch_vectorised<T, APEX4GEN_ACT_S4>(x, ldx, m, k, group, lv, qx, sx, stream);
    case APEX4GEN_ACT_S8: return launch_vectorised<T, APEX4GEN_ACT_S8>(x, ldx, m, k, group, lv, qx, sx, stream);
    case APEX4GEN_ACT_E4M3: return launch_vectorised<T, APEX4GEN_ACT_E4M3>(x, ldx, m, k, group, lv, qx, sx, stream);
    default: return APEX4GEN_BAD_ARGUMENT;  // RAW is quantized inside the GEMM, not here
  }
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

extern "C" APEX4GEN_EXPORT int apex4gen_quantize_act(const void* x, int ldx, apex4gen_dtype x_dtype, int m, int k,
                                                     int group, int act_bits, apex4gen_act_format format, void* qx,
                                                     float* sx, cudaStream_t stream) {
  if (!x || !qx || !sx) return APEX4GEN_BAD_ARGUMENT;
  if (x_dtype != APEX4GEN_F16 && x_dtype != APEX4GEN_BF16) return APEX4GEN_BAD_ARGUMENT;
  // 8-bit values fit only int8 storage (s4 holds -8..7, e4m3 holds integers exactly only up to +-16)
  if (act_bits != 4 && !(act_bits == 8 && format == APEX4GEN_ACT_S8)) return APEX4GEN_BAD_ARGUMENT;
  // pairs of values: one s4 byte, one 4-byte load on the narrow path
  if (m < 0 || k <= 0 || group <= 0 || group % 2 || k % group || ldx < k || ldx % 2) return APEX4GEN_BAD_SHAPE;
  if (!aligned(x, 4) || !aligned(sx, 4) || !aligned(qx, 2)) return APEX4GEN_BAD_ARGUMENT;
  if (m == 0) return APEX4GEN_OK;
  return x_dtype == APEX4GEN_F16
             ? launch_format<__half>(format, x, ldx, m, k, group, levels_of(act_bits), qx, sx, stream)
             : launch_format<__nv_bfloat16>(format, x, ldx, m, k, group, levels_of(act_bits), qx, sx, stream);
}

extern "C" APEX4GEN_EXPORT const char* apex4gen_status_string(int status) {
  switch (status) {
    case APEX4GEN_OK: return "ok";
    case APEX4GEN_BAD_SHAPE: return "bad shape: M/N/K/group not supported by this kernel (alignment or divisibility)";
    case APEX4GEN_BAD_ARGUMENT:
      return "bad argument: null or misaligned pointer, unknown format or dtype, or activation bits the format cannot hold";
    case APEX4GEN_CUDA_ERROR: return "CUDA error: a launch failed (cudaGetLastError() has the detail)";
    case APEX4GEN_NO_KERNEL: return "no kernel in this build serves the problem";
    case APEX4GEN_WORKSPACE: return "workspace too small (see the kernel's workspace size)";
    default: return "unknown apex4gen status";
  }
}
