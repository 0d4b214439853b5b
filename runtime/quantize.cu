// Activation quantization: x [M, K] (f16/bf16, row stride ldx) -> qx (packed s4 / s8 / e4m3) and sx [M, K/group]
// fp32, with the numerics of apex4gen/reference.py quantize_activation, value by value in quantize.cuh (shared
// with the producers that quantize their own output, fused_quantize.cu). act_bits (4 or 8) is a run-time
// argument: one more kernel argument, no more instantiations; s8 storage only. quantize.cuh's multiply-and-round
// fast path, measured on the H100 at M = 4096, K = 8192: per-channel 41.4 -> 39.4 us, g128 1% faster.
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
#include "quantize.cuh"

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

using namespace apex4gen_quant;

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
    absmax = fold_absmax(absmax, *reinterpret_cast<const Vec*>(row + k0 + v * kVec));
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
    const auto q = quantize_vector(*reinterpret_cast<const Vec*>(row + kk), scale, inv_scale, lv);
    store_quantized<kFormat, kVec>(qx, row_index, k, kk, q);
  }
}

// The chunk of a kernel that gives each chunk a block: block b is group b % groups of row b / groups.
struct BlockChunk {
  int64_t row_index;
  int k0, groups;

  __device__ static BlockChunk of_block(int k, int group) {
    const int groups = k / group;
    return {blockIdx.x / groups, static_cast<int>(blockIdx.x % groups) * group, groups};
  }
};

// The chunk's scale from every thread's absmax (the block's maximum); one thread writes it to sx.
__device__ float chunk_scale(float absmax, float* warp_absmax, Levels lv, const BlockChunk& c, int group, float* sx) {
  const float scale = scale_of(block_reduce(absmax, warp_absmax, MaxOp{}), lv);
  if (threadIdx.x == 0) sx[c.row_index * c.groups + c.k0 / group] = scale;
  return scale;
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
  const BlockChunk chunk = BlockChunk::of_block(k, group);
  const T* row = x + chunk.row_index * ldx + chunk.k0;
  const int vectors = group / 8;

  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    __pipeline_memcpy_async(staged + v, row + v * 8, sizeof(Vec));
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  float absmax = 0.f;
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) absmax = fold_absmax(absmax, staged[v]);
  const float scale = chunk_scale(absmax, warp_absmax, lv, chunk, group, sx);
  const float inv_scale = inverse_scale(scale);

  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    store_quantized<kFormat, 8>(qx, chunk.row_index, k, chunk.k0 + v * 8,
                                quantize_vector(staged[v], scale, inv_scale, lv));
  }
}

// One block per chunk; thread t holds vectors t, t + blockDim.x, ... (coalesced), at most kHeld.
template <typename T, int kVec, int kHeld, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kMaxBlockThreads)
quantize_chunk_per_block_kernel(const T* __restrict__ x, int ldx, int k, int group, Levels lv,
                                void* __restrict__ qx, float* __restrict__ sx) {
  allow_dependents();
  __shared__ float warp_absmax[kMaxBlockThreads / 32];
  const BlockChunk chunk = BlockChunk::of_block(k, group);
  const T* row = x + chunk.row_index * ldx + chunk.k0;
  const int vectors = group / kVec;
  using Vec = Vector<T, kVec>;

  Vec held[kHeld];
  float absmax = 0.f;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vectors) {
      held[i] = *reinterpret_cast<const Vec*>(row + v * kVec);
      absmax = fold_absmax(absmax, held[i]);
    }
  }
  const float scale = chunk_scale(absmax, warp_absmax, lv, chunk, group, sx);
  const float inv_scale = inverse_scale(scale);

#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < vectors) {
      store_quantized<kFormat, kVec>(qx, chunk.row_index, k, chunk.k0 + v * kVec,
                                     quantize_vector(held[i], scale, inv_scale, lv));
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
